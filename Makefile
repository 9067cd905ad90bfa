# Each target sets everything up itself from a fresh clone: a virtual environment in
# .venv, torch==2.13.0 first (the CPU build), then this project with the extras that
# target needs: `make demo` the demo extra only, `make test` and `make docs` the test
# extra (the demo, safetensors and docs extras plus the test tools).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-kernels test-verify lint docs bench example

$(VENV)/.torch:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	touch $@

$(VENV)/.installed-demo: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install --quiet -e '.[demo]'
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed-demo

setup: $(VENV)/.installed-test

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check src tests benchmarks examples tools conftest.py
	$(VENV)/bin/ruff format --check src tests benchmarks examples tools conftest.py
	$(VENV)/bin/mypy

docs: $(VENV)/.installed-test
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

# The tests that pin the per-step semantics, once per kernel (the whole suite runs with
# "auto"; "native" here waits for its build, "compiled" compiles every variant).
KERNEL_TESTS := tests/test_cost.py tests/test_numerics.py tests/test_rockpool_parity.py
KERNEL_TESTS_MORE := tests/test_exactness.py tests/test_penalties.py tests/test_integration.py

# The cost, report and projection tests once more in verify mode (PARAMBOUNDS_VERIFY=1):
# every cached or fast answer checked against the float64 reference (docs/correctness.md).
VERIFY_TESTS := tests/test_cost.py tests/test_torch_report.py tests/test_constraints.py \
	tests/test_stale_caches.py tests/test_state_machine.py

# The tests run in PYTEST_WORKERS processes (pytest-xdist): CI's machine has 2 cores, and
# most of the time is fresh interpreters and single-threaded work. "worksteal" hands a
# worker that is done the queued tests of the other, so one slow test never idles a core.
PYTEST_WORKERS ?= 2
XDIST := -n $(PYTEST_WORKERS) --dist worksteal

test: lint docs
	$(PY) -m pytest $(XDIST) --durations=20  # the slowest tests, in every log
	$(MAKE) test-kernels
	$(MAKE) test-verify
	$(PY) benchmarks/bench_bounds.py --quick

test-verify: $(VENV)/.installed-test
	PARAMBOUNDS_VERIFY=1 $(PY) -m pytest -q $(XDIST) $(VERIFY_TESTS)

test-kernels: $(VENV)/.installed-test
	$(PY) -m pytest -q $(XDIST) --kernel native $(KERNEL_TESTS) $(KERNEL_TESTS_MORE)
	$(PY) -m pytest -q $(XDIST) --kernel eager $(KERNEL_TESTS) $(KERNEL_TESTS_MORE)
	$(PY) -m pytest -q $(XDIST) --kernel compiled $(KERNEL_TESTS)

demo: $(VENV)/.installed-demo
	$(VENV)/bin/parambounds demo --out demo-out

bench: $(VENV)/.installed-test
	$(PY) benchmarks/bench_bounds.py

example: $(VENV)/.installed-demo
	$(PY) examples/compare_three_uses.py
