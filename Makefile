# `make demo` and `make test` each create the virtual environment .venv (once) from the
# project's own files, then run the demo or the test suite. Versions are pinned in
# constraints.txt so that a fresh clone installs exactly what the suite was run with.
# pip byte-compiles every installed module (about 15 of the install's 40 s): without it each
# test worker and subprocess compiled jax's modules again, 50 s more for the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

demo: $(VENV)/.installed
	$(BIN)/python examples/flax_quickstart.py

# The suite includes the `>>>` examples of both modules' docstrings and the slow checks;
# `$(BIN)/python -m pytest -m "not slow" -n auto` skips the latter while developing. Most of its time
# is XLA compiling, one core per process: one worker per core, each test module on one worker
# (its module-scoped fixtures, e.g. a training run several tests check, then run once).
# Compiled programs persist in .pytest_cache/jax (conftest.py), so a rerun compiles what changed.
test: lint
	$(BIN)/python -m pytest -q -n auto --dist loadscope

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(VENV)/.installed
	$(BIN)/python bench/bench_ivon.py
	$(BIN)/python bench/bench_implicit_vi.py

$(VENV)/.installed: pyproject.toml examples/pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test,nuts]" -e ./examples
	touch $@

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache bench/results examples/output
