# Two entry points: `make demo` and `make test`. Each builds the virtual environment
# when it is missing or older than the files that define it, then runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench study env sysdeps clean gpu-check

KERNEL_SOURCES := setup.py $(wildcard adapters/torch/csrc/*.cpp adapters/torch/csrc/*.h)

# PyTorch first, then the package without build isolation, so that setup.py compiles the
# CPU kernels against that PyTorch (the usual convention for PyTorch extensions).
$(STAMP): pyproject.toml constraints.txt $(KERNEL_SOURCES)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt "setuptools>=68" wheel torch numpy
	$(PY) -m pip install --quiet -c constraints.txt --no-build-isolation -e ".[all]"
	$(PY) -c "import hwbptt.torch as t; s = t.kernels_status(); print('hwbptt kernels:', s['kernels'], s.get('why', ''))"
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

# On a machine with a GPU: the CUDA tests, the bench against cuDNN and the verdicts, into
# results/gpucheck (README, "GPU"). Plain $(PYTHON), not the virtual environment: it runs on
# whatever PyTorch and Triton are installed there, from this checkout without installing it.
gpu-check:
	$(PYTHON) programs/gpucheck.py --out results/gpucheck

clean:
	rm -rf $(VENV) build *.egg-info
