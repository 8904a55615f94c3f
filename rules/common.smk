# Glue for every stage, kept apart from the rules: the plan of the validated config's jobs (qatlaw.workflow_plan),
# the targets, and the input functions that pass a job's wildcards into the plan.
import shlex
import sys

from snakemake.exceptions import WorkflowError

from qatlaw import config as qconfig
from qatlaw import builtin_sources, data, grid, outputs, reference, workflow_plan
from qatlaw import precision as prec
from qatlaw.errors import QatlawError


# `config` is validated, with the schema's defaults, by the Snakefile (qatlaw.config.load).
SOURCES = qconfig.source_ids(config)
# A run table from outside (config key external.table, qatlaw.external): the DAG starts at the runs stage, nothing
# is trained, and no stage that needs model weights runs. The table is checked here, before any job.
EXTERNAL = (config.get("external") or {}).get("table")
EXTERNAL_PRECISIONS = (config.get("external") or {}).get("precisions", [])
if EXTERNAL:
    from qatlaw import external as qexternal
    from qatlaw.findings import outside

    try:
        _IMPORTED = qexternal.import_runs(qexternal.read_table(EXTERNAL), EXTERNAL_PRECISIONS, what=EXTERNAL)
    except QatlawError as exc:
        raise WorkflowError(f"external.table: {exc}") from None
    EXTERNAL_LABELS = sorted(set(_IMPORTED["precision"]) - {prec.BASELINE})
    # The decomposition needs runs of its precisions (W4A4, W4A16, W16A4, ...); the figures drawn from it too.
    EXTERNAL_STAGES, EXTERNAL_DECOMPOSES = qexternal.stages(_IMPORTED, EXTERNAL)
    print(f"qat-scaling: {EXTERNAL_STAGES}", file=sys.stderr)
# The jobs of the workflow (qatlaw.workflow_plan): the tokenize jobs, in corpus order (one per corpus file, or per
# data.shards_per_job files, named in results/data/shards/), the runs of the grid, and the runs restored from a
# shipped study (config key restore, qatlaw.reference), checked before any job; the others are trained here.
_TOKENIZE_JOBS = data.tokenize_jobs(SOURCES, config["data"]["shards_per_job"])
_GRID_RUNS = [] if EXTERNAL else grid.grid_runs(config)
try:
    _RESTORED = reference.restore_plan(config, config["restore"]) if config["restore"] else []
except QatlawError as exc:
    raise WorkflowError(f"restore: {exc}") from None
PLAN = workflow_plan.WorkflowPlan(config, _TOKENIZE_JOBS, _GRID_RUNS, _RESTORED)


# The figure captions' first line: the grid, or the run table from outside.
CAPTION = f"run table {EXTERNAL}" if EXTERNAL else outputs.grid_caption(config["grid"])
FIT_FILES = [f"results/fit/{name}.parquet" for name in ("params", "predictions", "comparison", "bootstrap")]


def external_outputs():
    """Targets of a run table from outside: the run table, the decomposition where it has the precisions, the
    fit, the figures and tables that need no model weights or training metrics, and the findings."""
    decomposes = ["results/analysis/decomposition.parquet", "results/analysis/decomposition_fit.parquet"]
    decomposition_figures = {"fig11_components_fit", "fig12_fc2_fit"}  # the decomposition's precisions' laws
    weightless = [f for f, keys in outputs.FIGURES.items()
                  if not {"outliers", "mixed_ranking"} & set(keys) and f != "training_curves"
                  and (EXTERNAL_DECOMPOSES or ("decomposition" not in keys and f not in decomposition_figures))]
    own = list(outputs.EXTERNAL_FIGURES) if any(map(outside, EXTERNAL_LABELS)) else []
    return [
        "results/runs.parquet",
        *(decomposes if EXTERNAL_DECOMPOSES else []),
        *FIT_FILES,
        "results/FINDINGS.md",
        *expand("results/figures/{figure}.{ext}", figure=[*weightless, *own], ext=["png", "svg"]),
        *expand("results/tables/{table}.{ext}", table=[t for t in outputs.TABLES if t != "gap_opening"],
                ext=["csv", "md"]),
    ]


def final_outputs():
    """Targets of the default run."""
    if EXTERNAL:
        return external_outputs()
    return [
        "results/data/manifest.json",
        "results/runs.parquet",
        "results/analysis/decomposition.parquet",
        "results/analysis/decomposition_fit.parquet",
        "results/analysis/layer_error.parquet",
        "results/analysis/outliers.parquet",
        *(outputs.MIXED_ANALYSES if PLAN.has_overrides else []),
        "results/fit/params.parquet",
        "results/fit/predictions.parquet",
        "results/fit/comparison.parquet",
        "results/fit/bootstrap.parquet",
        "results/FINDINGS.md",
        *expand(
            "results/figures/{figure}.{ext}",
            figure=[f for f in outputs.FIGURES if PLAN.has_overrides or f not in outputs.MIXED_FIGURES],
            ext=["png", "svg"],
        ),
        *expand(
            "results/figures/{figure}.{ext}",
            figure=outputs.SPLIT_FIGURES if outputs.split_grid(config["grid"]) else [],
            ext=["png", "svg"],
        ),
        *expand("results/tables/{table}.{ext}", table=outputs.TABLES, ext=["csv", "md"]),
    ]


def _tokenize_job(wildcards):
    if wildcards.job not in PLAN.tokenize_jobs:
        raise WorkflowError(f"tokenize job {wildcards.job} is not part of the configured corpus")
    return PLAN.tokenize_jobs[wildcards.job]


def tokenize_job_files(wildcards):
    """The input files of one tokenize job, so that editing them re-runs it."""
    return [shard.path for shard in _tokenize_job(wildcards)]


def tokenize_job_shards(wildcards):
    """The shards of one tokenize job, as SOURCE=PATH."""
    return [shard.spec() for shard in _tokenize_job(wildcards)]


def tokenize_runtime(wildcards, attempt):
    """Minutes for one tokenize job (qatlaw.workflow_plan.tokenize_minutes)."""
    return workflow_plan.tokenize_minutes(tokenize_job_files(wildcards), attempt)


def tokenizer_runtime(wildcards, attempt):
    """Minutes for training the BPE (WorkflowPlan.tokenizer_minutes)."""
    return PLAN.tokenizer_minutes(attempt)


def gather_runtime(wildcards, attempt):
    """Minutes for the gather (WorkflowPlan.gather_minutes)."""
    return PLAN.gather_minutes(attempt)


def gather_mem_mb(wildcards, input, attempt):
    """MB for the gather: from the corpus's document count (qatlaw.data.gather_memory_mb), once the tokenize jobs'
    document tables exist (Snakemake evaluates it again when the job is ready), × the attempt."""
    return data.gather_memory_mb(input.docs) * attempt


def _run(wildcards):
    run_id = f"{wildcards.size}/{wildcards.tokens}/seed{wildcards.seed}/{wildcards.variant}"
    if run_id not in PLAN.runs:
        raise WorkflowError(f"run {run_id} is not part of the configured grid")
    return PLAN.runs[run_id]


def run_settings_json(wildcards):
    """The settings of one run, as the JSON that `qatlaw train` reads."""
    return _run(wildcards).to_json()


def train_mem_mb(wildcards):
    """Memory to request for one training run."""
    return PLAN.estimate(_run(wildcards))["mem_mb"]


def train_runtime(wildcards, attempt):
    """Minutes to request for one training run (WorkflowPlan.run_minutes)."""
    return PLAN.run_minutes(_run(wildcards), attempt)


def train_gpus(wildcards):
    """GPUs of one training run (training.gpus_per_run, per size)."""
    return grid.run_gpus(config["training"], wildcards.size)


def train_nodes(wildcards):
    """Cluster nodes of one training run (its GPUs over training.gpus_per_node)."""
    return grid.run_nodes(config["training"], wildcards.size)


def train_micro_batch_size(wildcards):
    """Sequences per micro-batch of one training run."""
    return PLAN.job_plan([_run(wildcards)])[0]


def train_checkpointing(wildcards):
    """Activation checkpointing (0, 1 or auto) of one training run."""
    return PLAN.job_plan([_run(wildcards)])[1]


# Inputs and command of a training job (rule train, or the cell-named rules with several runs per job).
TRAIN_INPUTS = {
    "train": "results/data/train.npy",
    "val": "results/data/val.npy",
    "manifest": "results/data/manifest.json",
    "budget": "results/data/budget.json",
}
# Wildcard regex of the variants the train rule trains, all but post-training quantization's (_f0, rule ptq).
TRAINED_VARIANT = r"(?![^/]*_f0/)[^/]+"
# exec: Snakemake's own child is then `qatlaw train`, which Snakemake waits for on SIGTERM (a time limit,
# preemption, the SLURM profile's warning) while it writes its checkpoint; a shell in between would die at once.
TRAIN_SHELL = (
    "exec qatlaw train --settings {params.settings:q} --train-tokens {input.train} --val-tokens {input.val} "
    "--manifest {input.manifest} --summary {output.summary} --metrics {output.metrics} "
    "--model {output.model} --checkpoint {params.checkpoint} --threads {threads} --gpus {resources.gpu} "
    "--nodes {resources.nodes} "
    "--device {resources.train_device} --checkpoint-every {resources.checkpoint_every} "
    "--checkpoint-minutes {resources.checkpoint_minutes} "
    "--compile {resources.compile} --micro-batch-size {resources.micro_batch_size} "
    "--loss-chunk-tokens {resources.loss_chunk_tokens} "
    "--activation-checkpointing {resources.activation_checkpointing} --stop-seconds {resources.stop_seconds} "
    "{params.run_logs}{params.trunks}>> {log.job} 2>&1"
)


def _ptq_run(wildcards):
    run = _run(wildcards)
    if not run.is_ptq:
        raise WorkflowError(f"run {run.run_id} is not post-training quantization")
    return run


def ptq_baseline(name):
    """Input function: one file (summary.parquet, metrics.parquet, model.pt) of a PTQ run's BF16 baseline."""
    return lambda wildcards: f"results/runs/{_ptq_run(wildcards).baseline.run_id}/{name}"


def _cell(wildcards):
    cell = f"{wildcards.size}/{wildcards.tokens}/seed{wildcards.seed}"
    if cell not in PLAN.cells:
        raise WorkflowError(f"cell {cell} has no run of the configured grid to train here")
    return [PLAN.runs[run_id] for run_id in PLAN.cells[cell]]


def cell_models(wildcards):
    """Final weights of every run of one cell trained here, in grid order."""
    return workflow_plan.run_outputs([run.run_id for run in _cell(wildcards)], "model.pt")


def analysis_mem_mb(wildcards):
    """Memory to request for the analysis of one cell's models (the largest of them)."""
    return PLAN.analysis_resources(_cell(wildcards))["mem_mb"]


def analysis_runtime(wildcards, attempt):
    """Minutes to request for the analysis of one cell's models, × the attempt (`--retries`)."""
    return PLAN.analysis_resources(_cell(wildcards))["runtime"] * attempt
