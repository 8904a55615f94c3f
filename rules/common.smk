# Helpers for every stage (config validation and input functions), kept apart from the rules.
import os
import re
import shlex
import sys

from snakemake.exceptions import WorkflowError

from qatlaw import config as qconfig
from qatlaw import analysis_plan, builtin_sources, cost, data, grid, memory, outputs, reference
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
# Tokenize jobs, in corpus order: one per corpus file (or per data.shards_per_job files), named in results/data/shards/.
TOKENIZE_JOBS = data.tokenize_jobs(SOURCES, config["data"]["shards_per_job"])
RUNS = {} if EXTERNAL else {run.run_id: run for run in grid.grid_runs(config)}
# Runs restored from a shipped study (config key restore, qatlaw.reference), checked before any job; the others
# are trained here.
try:
    RESTORED = reference.restore_plan(config, config["restore"]) if config["restore"] else []
except QatlawError as exc:
    raise WorkflowError(f"restore: {exc}") from None
TRAINED = [run for run_id, run in RUNS.items() if run_id not in RESTORED]
# Whether the grid has a run whose precision has per-layer overrides: the mixed-precision stage and its figure are
# targets only then (outputs.MIXED_ANALYSES).
HAS_OVERRIDES = any(prec.parse(run.precision).has_overrides for run in RUNS.values())
# The FP→QAT split (grid.qat_fractions): the trunk checkpoints each BF16 baseline trained here keeps for its cell's
# branches (by baseline run id: steps), and the post-training quantization runs (rule ptq, no training).
TRUNK_STEPS = grid.trunk_steps(TRAINED)
PTQ_RUNS = [run.run_id for run in TRAINED if run.is_ptq]
# With training.runs_per_job > 1, or when baselines keep trunks (their jobs declare them as outputs), runs are
# trained in jobs of runs of one cell (rules named by batch_name); a branch never shares a job with its baseline.
BATCHED = config["training"]["runs_per_job"] > 1 or bool(TRUNK_STEPS)
TRAIN_BATCHES = (
    [[run.run_id for run in batch]
     for batch in grid.batch_runs([run for run in TRAINED if not run.is_ptq], config["training"]["runs_per_job"])]
    if BATCHED
    else []
)
# The run ids at QAT fraction 1 trained here of each (size, tokens, seed) cell, in grid order: the analyses (layer
# error, outliers) run one job per cell (qatlaw.analysis_plan) over its models trained here, and gather the cells'
# tables (and the restored runs' rows) in grid order.
CELLS = {cell: [run.run_id for run in runs]
         for cell, runs in grid.cells([run for run in TRAINED if run.qat_fraction == 1]).items()}


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
        *(outputs.MIXED_ANALYSES if HAS_OVERRIDES else []),
        "results/fit/params.parquet",
        "results/fit/predictions.parquet",
        "results/fit/comparison.parquet",
        "results/fit/bootstrap.parquet",
        "results/FINDINGS.md",
        *expand(
            "results/figures/{figure}.{ext}",
            figure=[f for f in outputs.FIGURES if HAS_OVERRIDES or f not in outputs.MIXED_FIGURES],
            ext=["png", "svg"],
        ),
        *expand(
            "results/figures/{figure}.{ext}",
            figure=outputs.SPLIT_FIGURES if outputs.split_grid(config["grid"]) else [],
            ext=["png", "svg"],
        ),
        *expand("results/tables/{table}.{ext}", table=outputs.TABLES, ext=["csv", "md"]),
    ]


def corpus_files():
    """Every input file of the corpus (package archives and user files), in corpus order."""
    return [shard.path for shards in TOKENIZE_JOBS.values() for shard in shards]


def corpus_shards():
    """Every shard as SOURCE=PATH, in corpus order (the BPE's sample is drawn from all of them)."""
    return [shard.spec() for shards in TOKENIZE_JOBS.values() for shard in shards]


def _tokenize_job(wildcards):
    if wildcards.job not in TOKENIZE_JOBS:
        raise WorkflowError(f"tokenize job {wildcards.job} is not part of the configured corpus")
    return TOKENIZE_JOBS[wildcards.job]


def tokenize_job_files(wildcards):
    """The input files of one tokenize job, so that editing them re-runs it."""
    return [shard.path for shard in _tokenize_job(wildcards)]


def tokenize_job_shards(wildcards):
    """The shards of one tokenize job, as SOURCE=PATH."""
    return [shard.spec() for shard in _tokenize_job(wildcards)]


def tokenize_outputs(ext):
    """One output (npy: token file, parquet: document table) of every tokenize job, in corpus order."""
    return [f"results/data/shards/{job}.{ext}" for job in TOKENIZE_JOBS]


def eos_flag():
    """The --eos-token flag, when data.eos_token is set."""
    eos = config["data"]["eos_token"]
    return f"--eos-token {shlex.quote(eos)}" if eos else ""


def _size_mb(paths):
    """MB of the files that exist now (a built-in archive is fetched later: 0 until then)."""
    return sum(os.path.getsize(p) for p in paths if os.path.isfile(p)) / 1e6


def tokenize_runtime(wildcards, attempt):
    """Minutes for one tokenize job: 10 + 1 per 20 MB of its files (a compressed shard holds ~4× its size in
    text), × the attempt (`--retries`). Known when the workflow starts, so a dry run shows it."""
    return int(10 + _size_mb(tokenize_job_files(wildcards)) / 20) * attempt


def tokenizer_runtime(wildcards, attempt):
    """Minutes for training the BPE, which reads every corpus file once for its sample: 30 + 1 per 20 MB."""
    return int(30 + _size_mb(corpus_files()) / 20) * attempt


def gather_runtime(wildcards, attempt):
    """Minutes for the gather, which copies every token: 30 + 1 per 500 MB of corpus files, × the attempt."""
    return int(30 + _size_mb(corpus_files()) / 500) * attempt


def gather_mem_mb(wildcards, input, attempt):
    """MB for the gather: from the corpus's document count (qatlaw.data.gather_memory_mb), once the tokenize jobs'
    document tables exist (Snakemake evaluates it again when the job is ready), × the attempt."""
    return data.gather_memory_mb(input.docs) * attempt


def allow_repeat_flag():
    """CLI flag that lets token budgets exceed the training split."""
    return "--allow-repeat" if config["data"]["allow_repeat"] else ""


def run_file(run_id, name):
    """One file (summary.parquet, metrics.parquet) of a run of the grid: restored or trained here."""
    return f"results/{reference.RESTORED}/runs/{run_id}/{name}" if run_id in RESTORED else f"results/runs/{run_id}/{name}"


def run_summaries():
    """Summary Parquet of every run of the grid."""
    return [run_file(run_id, "summary.parquet") for run_id in RUNS]


def restore_inputs():
    """The files of the restore folder that rule restore reads."""
    folder = os.path.normpath(config["restore"])
    names = ["config.yaml", "runs.parquet", "run.json", *(f"analysis/{name}.parquet" for name in reference.RUN_ANALYSES),
             *(f"runs/{run_id}/metrics.parquet" for run_id in RESTORED)]
    return [os.path.join(folder, name) for name in names]


def _run(wildcards):
    run_id = f"{wildcards.size}/{wildcards.tokens}/seed{wildcards.seed}/{wildcards.variant}"
    if run_id not in RUNS:
        raise WorkflowError(f"run {run_id} is not part of the configured grid")
    return RUNS[run_id]


def run_settings_json(wildcards):
    """The settings of one run, as the JSON that `qatlaw train` reads."""
    return _run(wildcards).to_json()


def _estimate(run):
    """Memory (per node) and runtime of one run on the configured threads or its GPUs."""
    return cost.run_resources(run, config["data"]["vocab_size"], config["training"])


def _train_resources(wildcards):
    return _estimate(_run(wildcards))


def train_mem_mb(wildcards):
    """Memory to request for one training run."""
    return _train_resources(wildcards)["mem_mb"]


def train_runtime(wildcards, attempt):
    """Minutes to request for one training run: the estimate × the attempt (`--retries`), so a run that hit its
    wall-time limit is resubmitted with more time and resumes from its checkpoint; at most training.job_hours."""
    return cost.job_minutes(_train_resources(wildcards)["runtime"], attempt, config["training"])


def train_gpus(wildcards):
    """GPUs of one training run (training.gpus_per_run, per size)."""
    return grid.run_gpus(config["training"], wildcards.size)


def train_nodes(wildcards):
    """Cluster nodes of one training run (its GPUs over training.gpus_per_node)."""
    return grid.run_nodes(config["training"], wildcards.size)


def node_sizes(multi_node):
    """Model sizes of the grid whose runs span several nodes (``multi_node``) or one, as a wildcard regex."""
    sizes = {run.size for run in RUNS.values() if (grid.run_nodes(config["training"], run.size) > 1) == multi_node}
    return "|".join(sorted(re.escape(size) for size in sizes))


def train_retries():
    """Tries after the first of a training job: with a job time limit (training.job_hours), one per further
    segment of the longest run, plus two for failures; without, the profile's or command line's `--retries`
    (None)."""
    training = config["training"]
    if training["job_hours"] is None:
        return None
    minutes = (cost.wall_minutes(run, config["data"]["vocab_size"], training) for run in RUNS.values())
    return max(cost.segments(m, training) for m in minutes) + 1


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


def trunk_file(baseline_id, step):
    """The trunk checkpoint a BF16 baseline keeps at ``step`` for its cell's branches (an output of its job)."""
    return f"results/runs/{baseline_id}/trunk/step{step}.pt"


def batch_trunk_outputs(batch):
    """The trunk checkpoints the BF16 baseline of a training batch keeps (none without branches in its cell)."""
    return [trunk_file(run_id, step) for run_id in batch for step in TRUNK_STEPS.get(run_id, [])]


def batch_trunk_inputs(batch):
    """The trunk checkpoint each branch of a training batch starts from (a batch holds branches only, or none)."""
    return [trunk_file(RUNS[run_id].baseline.run_id, RUNS[run_id].branch_step) for run_id in batch
            if RUNS[run_id].is_branch]


def batch_trunk_flags(batch):
    """The --trunk and --keep-trunk flags of a training batch (see batch_trunk_inputs, batch_trunk_outputs)."""
    starts = batch_trunk_inputs(batch)
    keeps = [f"{step}={trunk_file(run_id, step)}" for run_id in batch for step in TRUNK_STEPS.get(run_id, [])]
    return "".join(f"--{flag} {' '.join(paths)} " for flag, paths in (("trunk", starts), ("keep-trunk", keeps))
                   if paths)


def _ptq_run(wildcards):
    run = _run(wildcards)
    if not run.is_ptq:
        raise WorkflowError(f"run {run.run_id} is not post-training quantization")
    return run


def ptq_baseline(name):
    """Input function: one file (summary.parquet, metrics.parquet, model.pt) of a PTQ run's BF16 baseline."""
    return lambda wildcards: f"results/runs/{_ptq_run(wildcards).baseline.run_id}/{name}"


def batch_files(batch, name):
    """One output file (summary.parquet, metrics.parquet, model.pt) of every run of a training batch."""
    return [f"results/runs/{run_id}/{name}" for run_id in batch]


def batch_settings_json(batch):
    """The settings of a batch's runs, as the JSON list that `qatlaw train` reads."""
    return "[" + ", ".join(RUNS[run_id].to_json() for run_id in batch) + "]"


def batch_checkpoints(batch):
    """Resumable checkpoint of every run of a batch, outside the outputs."""
    return [f"results/checkpoints/{run_id}/ckpt.pt" for run_id in batch]


def batch_resources(batch):
    """A batch needs the largest memory of its runs and the sum of their runtimes, × the attempt (`--retries`),
    at most training.job_hours; its GPUs are those of its size (one at most: qatlaw.config)."""
    estimates = [_estimate(RUNS[run_id]) for run_id in batch]
    runtime = sum(e["runtime"] for e in estimates)
    return {"mem_mb": max(e["mem_mb"] for e in estimates),
            "runtime": lambda wildcards, attempt: cost.job_minutes(runtime, attempt, config["training"]),
            "gpu": grid.run_gpus(config["training"], RUNS[batch[0]].size), "nodes": 1}


def batch_name(i):
    """Name of training job ``i``: the cell it trains, and which of the cell's jobs it is, e.g.
    train_0p1M_10M_seed0_1of2 (the size's dots become p: names are Python identifiers)."""
    run = RUNS[TRAIN_BATCHES[i][0]]
    cell = [j for j, b in enumerate(TRAIN_BATCHES) if (RUNS[b[0]].size, RUNS[b[0]].tokens, RUNS[b[0]].seed)
            == (run.size, run.tokens, run.seed)]
    tokens = grid.format_tokens(run.tokens)
    return f"train_{run.size.replace('.', 'p')}_{tokens}_seed{run.seed}_{cell.index(i) + 1}of{len(cell)}"


def batch_job_log(i):
    """The log of training job ``i`` (all its runs), beside its runs' own logs."""
    run = RUNS[TRAIN_BATCHES[i][0]]
    return f"results/logs/train/{run.size}/{grid.format_tokens(run.tokens)}/seed{run.seed}/{batch_name(i)}.log"


def batch_run_logs(batch):
    """Each run's own log, results/logs/train/<run_id>.log, as with one run per job."""
    return [f"results/logs/train/{run_id}.log" for run_id in batch]


def run_log_flag(batch):
    """The --run-log flag of a training job of several runs."""
    return "--run-log " + " ".join(batch_run_logs(batch)) + " "


def batch_priority(batch):
    """Scheduling priority of a training batch: its training GFLOPs, so that the longest jobs start first and
    the short ones fill the cores at the end."""
    return sum(grid.training_flops(RUNS[run_id], config["data"]["vocab_size"]) for run_id in batch) // 10**9


def job_plan(runs):
    """Sequences per micro-batch (0 = the whole batch) and activation checkpointing (`qatlaw train
    --activation-checkpointing`: 0, 1 or auto) of a job training ``runs``: training.micro_batch_size and
    training.activation_checkpointing, or on GPUs the memory model's plan (qatlaw.memory.plan_run) that fits every
    run: the smallest micro-batch, checkpointing when any run needs it."""
    training = config["training"]
    if not grid.on_gpu(training):
        checkpointing = training["activation_checkpointing"]
        return training["micro_batch_size"] or 0, checkpointing if checkpointing == "auto" else int(checkpointing)
    plans = [memory.plan_run(run, config["data"]["vocab_size"], training) for run in runs]
    return min(plan.micro_batch for plan in plans), int(any(plan.checkpointing for plan in plans))


def train_micro_batch_size(wildcards):
    """Sequences per micro-batch of one training run."""
    return job_plan([_run(wildcards)])[0]


def train_checkpointing(wildcards):
    """Activation checkpointing (0, 1 or auto) of one training run."""
    return job_plan([_run(wildcards)])[1]


def train_execution(micro_batch, checkpointing):
    """How training jobs execute, as resources of the train rule (not params), so that changing them retrains
    nothing: device, checkpoint intervals (steps; minutes, as a
    string: Snakemake rounds float resources), torch.compile, ``micro_batch``, the sequences per micro-batch, and
    ``checkpointing``, activation checkpointing (0, 1 or auto; each a value or a function of the wildcards),
    tokens per chunk of the loss (0 = all at once), and the seconds between the stop signal and the time limit,
    which SLURM is asked for (sbatch --signal; a profile's train:slurm_extra replaces this one)."""
    training = config["training"]
    return {
        "train_device": training["device"],
        "checkpoint_every": training["checkpoint_every"],
        "checkpoint_minutes": str(training["checkpoint_minutes"]),
        "compile": int(training["compile"]),
        "micro_batch_size": micro_batch,
        "loss_chunk_tokens": training["loss_chunk_tokens"] or 0,
        "activation_checkpointing": checkpointing,
        "stop_seconds": training["stop_seconds"],
        "slurm_extra": f"--signal=TERM@{training['stop_seconds']}",
    }


def _cell(wildcards):
    cell = f"{wildcards.size}/{wildcards.tokens}/seed{wildcards.seed}"
    if cell not in CELLS:
        raise WorkflowError(f"cell {cell} has no run of the configured grid to train here")
    return [RUNS[run_id] for run_id in CELLS[cell]]


def cell_models(wildcards):
    """Final weights of every run of one cell trained here, in grid order."""
    return [f"results/runs/{run.run_id}/model.pt" for run in _cell(wildcards)]


def cell_tables(analysis):
    """The per-cell tables of an analysis (layer_error, outliers), in grid order, and the restored runs' rows."""
    restored = [f"results/{reference.RESTORED}/analysis/{analysis}.parquet"] if RESTORED else []
    return [f"results/analysis/{analysis}/{cell}.parquet" for cell in CELLS] + restored


def grid_run_ids():
    """Every run id of the grid at QAT fraction 1, in grid order: the rows of a gathered analysis table."""
    return " ".join(run_id for run_id, run in RUNS.items() if run.qat_fraction == 1)


def _analysis_resources(wildcards):
    return analysis_plan.job_resources(_cell(wildcards), config["data"]["vocab_size"], config["analysis"]["tokens"],
                                       threads=config["training"]["threads"], gpu=grid.on_gpu(config["training"]))


def analysis_mem_mb(wildcards):
    """Memory to request for the analysis of one cell's models (the largest of them)."""
    return _analysis_resources(wildcards)["mem_mb"]


def analysis_runtime(wildcards, attempt):
    """Minutes to request for the analysis of one cell's models, × the attempt (`--retries`)."""
    return _analysis_resources(wildcards)["runtime"] * attempt


def analysis_execution():
    """Where analysis jobs run, as resources (not params: changing it reruns nothing): on GPU configs one GPU
    each (gpu=1) and device cuda, else the CPU (training.threads threads)."""
    gpu = grid.on_gpu(config["training"])
    return {"gpu": int(gpu), "analysis_device": "cuda" if gpu else "cpu"}


def analysis_flags(flags):
    """Command-line flags of a per-cell analysis, each with its value or its list's values, and a trailing space
    ("" for none)."""
    values = {key: " ".join(map(str, v if isinstance(v, list) else [v])) for key, v in flags.items()}
    return "".join(f"--{key} {value} " for key, value in values.items())


def run_metrics():
    """Per-step metrics of every run of the grid."""
    return [run_file(run_id, "metrics.parquet") for run_id in RUNS]


def named_inputs(keys):
    """Workflow files of the given input roles (see qatlaw.outputs.INPUTS)."""
    return {key: outputs.INPUTS[key] for key in keys}


def input_args(keys):
    """The same as KEY=PATH arguments for `qatlaw figure` / `qatlaw table`."""
    return " ".join(f"{key}={path}" for key, path in named_inputs(keys).items())


FIGURE_CATEGORIES = {
    "training_curves": "1. Training",
    "fig6_decomposition": "2. Weight vs activation error",
    "fig7_components": "2. Weight vs activation error",
    "fig8_ratio": "2. Weight vs activation error",
    "fig9_outliers": "3. Outliers and mixed precision",
    "mixed_layer_ranking": "3. Outliers and mixed precision",
    **dict.fromkeys(outputs.SPLIT_FIGURES, "6. FP→QAT split"),
}


def figure_category(figure):
    """Report category of a figure: the stage it belongs to (law-fit figures by default)."""
    return FIGURE_CATEGORIES.get(figure, "4. Scaling law fit")
