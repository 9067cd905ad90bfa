# Each target sets everything up itself from a fresh clone: a virtual environment in
# .venv, torch==2.13.0 first (the CPU build), then this project with its extras
# (test pulls in demo and safetensors).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench example

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest
	$(PY) benchmarks/bench_bounds.py --quick

demo: $(STAMP)
	$(VENV)/bin/parambounds demo --out demo-out

bench: $(STAMP)
	$(PY) benchmarks/bench_bounds.py

example: $(STAMP)
	$(PY) examples/compare_three_uses.py
