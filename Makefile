# Two entry points a user needs: `make demo` and `make test`. Both create .venv on first use.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-slow lint format demo bench

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

demo: $(STAMP)
	$(PY) recipes/analysis/compare.py --config recipes/configs/demo.yaml

bench: $(STAMP)
	$(PY) benchmarks/outer_step.py
	$(PY) benchmarks/data_prep.py
	$(PY) benchmarks/worker_overhead.py
	$(PY) benchmarks/transport.py
	$(PY) benchmarks/simulator.py
	$(PY) benchmarks/checkpoint.py
	$(PY) benchmarks/groups.py
