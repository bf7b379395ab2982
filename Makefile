# make demo: set up .venv, install, run the whole pipeline on the built-in data, print the result.
# make test: set up .venv, install with the test extra, run the tests.
# make arm64-check: device-check of a demo package on the aarch64 LiteRT wheel under QEMU (cortex-a53, neoverse-n1,
#   neoverse-n2); the aarch64 root is cached in ~/.cache/mobileqat/arm64. ARM64_FLAGS, e.g. --allow SOFTMAX.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
OUT ?= demo_out

.PHONY: demo test install clean arm64-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/mobileqat demo --out $(OUT)

test: install
	$(BIN)/python -m pytest -q -n auto --dist loadfile

ARM64_FLAGS ?=

arm64-check: install
	$(BIN)/python tools/arm64/arm64_check.py $(ARM64_FLAGS)

clean:
	rm -rf $(VENV) $(OUT) *.egg-info
