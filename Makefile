# make demo: set up .venv, install, run the whole pipeline on the built-in data, print the result.
# make test: set up .venv, install with the test extra, run the tests.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
OUT ?= demo_out

.PHONY: demo test install clean

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
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(OUT) *.egg-info
