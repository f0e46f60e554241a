# Two entry points: `make demo` and `make test`. Each builds the virtual environment
# when it is missing or older than the files that define it, then runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench study env clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[all]"
	touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	$(PY) -m hwbptt demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m hwbptt bench --quick

study: $(STAMP)
	$(PY) -m hwbptt study --quick

clean:
	rm -rf $(VENV) build *.egg-info
