# `make test` builds its own virtual environment on first use, then runs the CPU suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: test test-all test-gpu bench clean

test: $(VENV)/.installed
	$(PY) -m pytest -m "not gpu and (not slow or ci)" $(ARGS)

test-all: $(VENV)/.installed
	$(PY) -m pytest -m "not gpu" $(ARGS)

test-gpu: $(VENV)/.installed
	$(PY) -m pytest -m gpu $(ARGS)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
