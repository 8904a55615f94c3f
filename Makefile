# Two commands on a fresh machine (Python 3.11, git):
#   make run    installs into .venv, then runs the default workflow (snakemake --cores 2)
#   make test   installs into .venv, then runs the fast test tier (every stage, no end-to-end run; at most 5 min)
#   make test-all   every test, as CI (.ci/run) runs it: end-to-end workflows, and as root a local SLURM
#   make reference   the laptop grid from a clean results/, shipped as reference/laptop/ (about 80 min, 2 cores);
#                    RESTORE=reference/laptop continues the study shipped there (trains only the runs it lacks),
#                    GRID_CONFIGS="config/laptop.yaml part.yaml" ships a part of it (docs/running.md, "A study in parts")
#   make quartet     the law fitted to Quartet's published runs (reference/data/quartet), shipped as reference/quartet/
#   make readme      rewrites the README blocks that quote the shipped studies (<!-- qatlaw:... -->) from reference/
#   make gpu-check   on a machine with CUDA GPUs: python -m qatlaw.bench --sections gpu (at most 8 min): training
#                    MFU at 74M and 145M (BF16, W4A4) eager and compiled, from token stores on disk, and under DDP
#                    on every GPU when there are 2 or more; 973M peak memory (torch's and the device's) vs the
#                    memory model, its evaluation, δ under bf16 vs fp32, a resume against two uninterrupted runs'
#                    noise floor; writes reference/gpu-check/ (gpu.parquet, gpu.md). Refuses to run without CUDA
#                    (the CPU smoke mode is `python -m qatlaw.bench --sections gpu --smoke`)
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CORES ?= 2
# Workflow shell commands call `qatlaw` and `snakemake` from the virtual environment.
export PATH := $(BIN):$(PATH)

.PHONY: install run test test-all lint dry-run clean reference gpu-check readme quartet

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
	$(BIN)/python -m pytest -m "not slow and not cluster" $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

GRID_CONFIGS ?= config/laptop.yaml
REFERENCE ?= reference/laptop
RESTORE ?=

reference: install
	@test ! -e results/runs.parquet || { echo "make reference: results/ holds another grid's runs; move it away first (the reference is timed from a clean results/)"; exit 2; }
	start=$$(date +%s); $(BIN)/snakemake --cores $(CORES) --show-failed-logs --configfile $(GRID_CONFIGS) \
	  $(if $(RESTORE),--config restore=$(RESTORE)) && echo $$(( $$(date +%s) - start )) > results/wall_s
	$(BIN)/qatlaw reference config.yaml $(GRID_CONFIGS) --results results --out $(REFERENCE) \
	  --wall-file results/wall_s \
	  --command "make reference GRID_CONFIGS=\"$(GRID_CONFIGS)\" REFERENCE=$(REFERENCE)$(if $(RESTORE), RESTORE=$(RESTORE))" \
	  --title "$(notdir $(REFERENCE)) grid ($(GRID_CONFIGS))"

# Quartet's published runs (config/quartet.yaml: external.table): the workflow from its runs stage, shipped as
# reference/quartet/; nothing is trained.
quartet:
	$(MAKE) reference GRID_CONFIGS=config/quartet.yaml REFERENCE=reference/quartet

readme: install
	$(BIN)/python -c "from qatlaw import readme; [readme.update(p) for p in ('README.md', 'reference/README.md')]"

gpu-check: install
	$(BIN)/python -m qatlaw.bench --sections gpu --require-cuda --out reference/gpu-check

lint: install
	$(BIN)/snakemake --lint

clean:
	rm -rf results/data results/logs results/benchmarks .snakemake
