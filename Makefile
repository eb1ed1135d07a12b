# make demo  - install into .venv and run the tiny experiment (results/tables/tiny.csv, results/plots/tiny.png)
# make test  - install into .venv and run every test (the fast ones and those marked slow)
# make lint  - ruff on the package and tests, snakefmt and Snakemake's linter on the workflow
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
CORES ?= 2

.PHONY: install demo test test-fast lint clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: envs/requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r envs/requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

demo: install
	PATH="$(abspath $(BIN)):$$PATH" snakemake --cores $(CORES)

test: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -m "slow or not slow" -q --durations=25

lint: install
	$(BIN)/ruff check sidcore tests
	$(BIN)/snakefmt --check Snakefile workflow
	PATH="$(abspath $(BIN)):$$PATH" snakemake --lint

test-fast: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q

clean-demo:
	rm -rf results/tiny results/tables/tiny.* results/plots/tiny.* results/plans/tiny.* results/figures/tiny-* resources/*/tiny* \
		resources/*/trained resources/data/digits.zip logs benchmarks
