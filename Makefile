# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create (or refresh, when pyproject.toml or constraints.txt change) the virtual environment in .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pyro-flows-installed
PYTEST_WORKERS ?= 2

.PHONY: venv demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test,examples,bench,ffjord,docs]"
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(PY) examples/demo.py

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -n $(PYTEST_WORKERS)

bench: venv
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
