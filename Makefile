# Two entry points: `make demo` and `make test`. Each builds the virtual environment
# when it is missing or older than the files that define it, then runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench study env sysdeps clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[all]"
	touch $(STAMP)

env: $(STAMP)

# espeak-ng speaks the keyword-spotting example's offline word set. Installed with
# apt-get where we are root; elsewhere that example and its test say how to install it.
sysdeps:
	@command -v espeak-ng >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null; } \
		|| echo "note: espeak-ng is not installed (apt-get install espeak-ng); the keyword-spotting example will be skipped"

demo: $(STAMP)
	$(PY) -m hwbptt demo

# Both passes always run (the Keras-on-torch pass is not skipped when the first fails);
# the target fails at the end if either did.
test: $(STAMP) sysdeps
	@status=0; \
	$(PY) -m pytest -q || status=1; \
	KERAS_BACKEND=torch $(PY) -m pytest -q tests/keras || status=1; \
	exit $$status

bench: $(STAMP)
	$(PY) -m hwbptt bench --quick

study: $(STAMP)
	$(PY) -m hwbptt study --quick

clean:
	rm -rf $(VENV) build *.egg-info
