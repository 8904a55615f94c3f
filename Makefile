# Two commands on a fresh machine (Python 3.11, git):
#   make run    installs into .venv, then runs the default workflow (snakemake --cores 2)
#   make test   installs into .venv, then runs the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CORES ?= 2
# Workflow shell commands call `qatlaw` and `snakemake` from the virtual environment.
export PATH := $(BIN):$(PATH)

.PHONY: install run test lint dry-run clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

run: install
	$(BIN)/snakemake --cores $(CORES) --show-failed-logs $(SNAKEMAKE_ARGS)

dry-run: install
	$(BIN)/snakemake --cores $(CORES) --dry-run $(SNAKEMAKE_ARGS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/snakemake --lint

clean:
	rm -rf results/data results/logs results/benchmarks .snakemake
