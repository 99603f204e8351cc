# `make test` builds its own virtual environment on first use, then runs the CPU suite.
# `make train` trains moneta-tiny on the embedded corpus afresh (it removes $(RUN) first).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
RUN    ?= runs/moneta-tiny

.PHONY: test test-all test-gpu train bench clean

test: $(VENV)/.installed
	$(PY) -m pytest -m "not gpu and (not slow or ci)" $(ARGS)

test-all: $(VENV)/.installed
	$(PY) -m pytest -m "not gpu" $(ARGS)

test-gpu: $(VENV)/.installed
	$(PY) -m pytest -m gpu $(ARGS)

# the CPU benchmark (benchmarks/README.md; about 45 s on 2 cores); the GPU ones need a GPU machine
bench: $(VENV)/.installed
	$(PY) benchmarks/cpu_scan.py $(ARGS)

train: $(VENV)/.installed
	rm -rf $(RUN)
	$(VENV)/bin/mirascore train models/moneta-tiny.toml --out $(RUN) $(ARGS)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,train]'
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
