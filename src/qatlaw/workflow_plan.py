"""The workflow's jobs for a validated config, free of Snakemake (rules/common.smk builds one
:class:`WorkflowPlan` and passes each job's wildcards into it): the data stage's tokenize jobs and their resources,
the runs of the grid (trained here, restored from a shipped study, or post-training quantization), the training
jobs they are grouped into (names, files, logs, trunk checkpoints, resources, priority, how they execute), and the
analysis jobs, one per (size, tokens, seed) cell.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from qatlaw import analysis_plan, cost, grid, memory
from qatlaw import precision as prec
from qatlaw.grid import RunSettings
from qatlaw.reference import RUN_ANALYSES
from qatlaw.report_inputs import RESTORED

if TYPE_CHECKING:
    from qatlaw.data import Shard


def files_mb(paths: Iterable[str]) -> float:
    """MB of the files that exist now (a built-in archive is fetched later: 0 until then)."""
    return sum(os.path.getsize(p) for p in paths if os.path.isfile(p)) / 1e6


def tokenize_minutes(paths: Iterable[str], attempt: int) -> int:
    """Minutes for one tokenize job of ``paths``: 10 + 1 per 20 MB of its files (a compressed shard holds ~4× its
    size in text), × the attempt (`--retries`). Known when the workflow starts, so a dry run shows it."""
    return int(10 + files_mb(paths) / 20) * attempt


def trunk_file(baseline_id: str, step: int) -> str:
    """The trunk checkpoint a BF16 baseline keeps at ``step`` for its cell's branches (an output of its job)."""
    return f"results/runs/{baseline_id}/trunk/step{step}.pt"


def run_outputs(run_ids: Iterable[str], name: str) -> list[str]:
    """One output file (summary.parquet, metrics.parquet, model.pt) of every run trained here of ``run_ids``."""
    return [f"results/runs/{run_id}/{name}" for run_id in run_ids]


def batch_checkpoints(batch: Sequence[str]) -> list[str]:
    """Resumable checkpoint of every run of a batch, outside the outputs."""
    return [f"results/checkpoints/{run_id}/ckpt.pt" for run_id in batch]


def batch_run_logs(batch: Sequence[str]) -> list[str]:
    """Each run's own log, results/logs/train/<run_id>.log, as with one run per job."""
    return [f"results/logs/train/{run_id}.log" for run_id in batch]


def run_log_flag(batch: Sequence[str]) -> str:
    """The --run-log flag of a training job of several runs."""
    return "--run-log " + " ".join(batch_run_logs(batch)) + " "


def analysis_flags(flags: Mapping[str, Any]) -> str:
    """Command-line flags of a per-cell analysis, each with its value or its list's values, and a trailing space
    ("" for none)."""
    values = {key: " ".join(map(str, v if isinstance(v, list) else [v])) for key, v in flags.items()}
    return "".join(f"--{key} {value} " for key, value in values.items())


class WorkflowPlan:
    """The jobs of a validated ``config``: its corpus's ``tokenize_jobs`` (qatlaw.data.tokenize_jobs), the ``runs``
    of its grid (none for a run table from outside) and the run ids of them ``restored`` from a shipped study."""

    def __init__(self, config: Mapping[str, Any], tokenize_jobs: Mapping[str, list[Shard]],
                 runs: Iterable[RunSettings], restored: Sequence[str]) -> None:
        self.config = config
        self.training: Mapping[str, Any] = config["training"]
        self.vocab_size: int = config["data"]["vocab_size"]
        # tokenize jobs, in corpus order: job name -> its shards
        self.tokenize_jobs = tokenize_jobs
        self.runs = {run.run_id: run for run in runs}
        self.restored = restored
        self.trained = [run for run_id, run in self.runs.items() if run_id not in restored]
        # a run whose precision has per-layer overrides: the mixed-precision stage and its figure are targets only then
        self.has_overrides = any(prec.parse(run.precision).has_overrides for run in self.runs.values())
        # the FP→QAT split (grid.qat_fractions): the trunk checkpoints each BF16 baseline trained here keeps for its
        # cell's branches (by baseline run id: steps), and the post-training quantization runs (no training)
        self.trunk_steps = grid.trunk_steps(self.trained)
        self.ptq_runs = [run.run_id for run in self.trained if run.is_ptq]
        # with training.runs_per_job > 1, or when baselines keep trunks (their jobs declare them as outputs), runs
        # are trained in jobs of runs of one cell (named by batch_name); a branch never shares its baseline's job
        per_job = self.training["runs_per_job"]
        self.batched = per_job > 1 or bool(self.trunk_steps)
        training_runs = [run for run in self.trained if not run.is_ptq]
        self.train_batches = (
            [[run.run_id for run in batch] for batch in grid.batch_runs(training_runs, per_job)] if self.batched else []
        )
        # the run ids at QAT fraction 1 trained here of each (size, tokens, seed) cell, in grid order: the analyses
        # run one job per cell over its models and gather the cells' tables (and the restored runs' rows) in grid order
        self.cells = {cell: [run.run_id for run in cell_runs]
                      for cell, cell_runs in grid.cells([run for run in self.trained if run.qat_fraction == 1]).items()}

    # ------------------------------------------------------------------------------------------ data stage
    def corpus_files(self) -> list[str]:
        """Every input file of the corpus (package archives and user files), in corpus order."""
        return [shard.path for shards in self.tokenize_jobs.values() for shard in shards]

    def corpus_shards(self) -> list[str]:
        """Every shard as SOURCE=PATH, in corpus order (the BPE's sample is drawn from all of them)."""
        return [shard.spec() for shards in self.tokenize_jobs.values() for shard in shards]

    def tokenize_outputs(self, ext: str) -> list[str]:
        """One output (npy: token file, parquet: document table) of every tokenize job, in corpus order."""
        return [f"results/data/shards/{job}.{ext}" for job in self.tokenize_jobs]

    def tokenizer_minutes(self, attempt: int) -> int:
        """Minutes for training the BPE, which reads every corpus file once for its sample: 30 + 1 per 20 MB."""
        return int(30 + files_mb(self.corpus_files()) / 20) * attempt

    def gather_minutes(self, attempt: int) -> int:
        """Minutes for the gather, which copies every token: 30 + 1 per 500 MB of corpus files, × the attempt."""
        return int(30 + files_mb(self.corpus_files()) / 500) * attempt

    def eos_flag(self) -> str:
        """The --eos-token flag, when data.eos_token is set."""
        eos = self.config["data"]["eos_token"]
        return f"--eos-token {shlex.quote(eos)}" if eos else ""

    def allow_repeat_flag(self) -> str:
        """CLI flag that lets token budgets exceed the training split."""
        return "--allow-repeat" if self.config["data"]["allow_repeat"] else ""

    # ------------------------------------------------------------------------------------------ runs
    def run_file(self, run_id: str, name: str) -> str:
        """One file (summary.parquet, metrics.parquet) of a run of the grid: restored or trained here."""
        folder = f"results/{RESTORED}/runs" if run_id in self.restored else "results/runs"
        return f"{folder}/{run_id}/{name}"

    def run_files(self, name: str) -> list[str]:
        """One file (summary.parquet, metrics.parquet) of every run of the grid."""
        return [self.run_file(run_id, name) for run_id in self.runs]

    def restore_inputs(self) -> list[str]:
        """The files of the restore folder that rule restore reads."""
        folder = os.path.normpath(self.config["restore"])
        names = ["config.yaml", "runs.parquet", "run.json",
                 *(f"analysis/{name}.parquet" for name in RUN_ANALYSES),
                 *(f"runs/{run_id}/metrics.parquet" for run_id in self.restored)]
        return [os.path.join(folder, name) for name in names]

    def estimate(self, run: RunSettings) -> dict[str, int]:
        """Memory (per node) and runtime of one run on the configured threads or its GPUs."""
        return cost.run_resources(run, self.vocab_size, self.training)

    def run_minutes(self, run: RunSettings, attempt: int) -> int:
        """Minutes to request for one training run: the estimate × the attempt (`--retries`), so a run that hit its
        wall-time limit is resubmitted with more time and resumes from its checkpoint; at most training.job_hours."""
        return cost.job_minutes(self.estimate(run)["runtime"], attempt, self.training)

    def node_sizes(self, multi_node: bool) -> str:
        """Model sizes of the grid whose runs span several nodes (``multi_node``) or one, as a wildcard regex."""
        sizes = {run.size for run in self.runs.values() if (grid.run_nodes(self.training, run.size) > 1) == multi_node}
        return "|".join(sorted(re.escape(size) for size in sizes))

    def train_retries(self) -> int | None:
        """Tries after the first of a training job: with a job time limit (training.job_hours), one per further
        segment of the longest run, plus two for failures; without, the profile's or command line's `--retries`
        (None)."""
        if self.training["job_hours"] is None:
            return None
        minutes = (cost.wall_minutes(run, self.vocab_size, self.training) for run in self.runs.values())
        return max(cost.segments(m, self.training) for m in minutes) + 1

    # ------------------------------------------------------------------------------------------ training jobs
    def batch_trunk_outputs(self, batch: Sequence[str]) -> list[str]:
        """The trunk checkpoints the BF16 baseline of a training batch keeps (none without branches in its cell)."""
        return [trunk_file(run_id, step) for run_id in batch for step in self.trunk_steps.get(run_id, [])]

    def batch_trunk_inputs(self, batch: Sequence[str]) -> list[str]:
        """The trunk checkpoint each branch of a training batch starts from (a batch holds branches only, or none)."""
        return [trunk_file(self.runs[run_id].baseline.run_id, self.runs[run_id].branch_step) for run_id in batch
                if self.runs[run_id].is_branch]

    def batch_trunk_flags(self, batch: Sequence[str]) -> str:
        """The --trunk and --keep-trunk flags of a training batch (see batch_trunk_inputs, batch_trunk_outputs)."""
        starts = self.batch_trunk_inputs(batch)
        keeps = [f"{step}={trunk_file(run_id, step)}" for run_id in batch for step in self.trunk_steps.get(run_id, [])]
        return "".join(f"--{flag} {' '.join(paths)} " for flag, paths in (("trunk", starts), ("keep-trunk", keeps))
                       if paths)

    def batch_settings_json(self, batch: Sequence[str]) -> str:
        """The settings of a batch's runs, as the JSON list that `qatlaw train` reads."""
        return "[" + ", ".join(self.runs[run_id].to_json() for run_id in batch) + "]"

    def batch_resources(self, batch: Sequence[str]) -> dict[str, Any]:
        """A batch needs the largest memory of its runs and the sum of their runtimes, × the attempt (`--retries`),
        at most training.job_hours; its GPUs are those of its size (one at most: qatlaw.config)."""
        estimates = [self.estimate(self.runs[run_id]) for run_id in batch]
        runtime = sum(e["runtime"] for e in estimates)
        training = self.training
        return {"mem_mb": max(e["mem_mb"] for e in estimates),
                "runtime": lambda wildcards, attempt: cost.job_minutes(runtime, attempt, training),
                "gpu": grid.run_gpus(training, self.runs[batch[0]].size), "nodes": 1}

    def batch_name(self, i: int) -> str:
        """Name of training job ``i``: the cell it trains, and which of the cell's jobs it is, e.g.
        train_0p1M_10M_seed0_1of2 (the size's dots become p: names are Python identifiers)."""
        run = self.runs[self.train_batches[i][0]]
        firsts = [self.runs[b[0]] for b in self.train_batches]
        cell = [j for j, r in enumerate(firsts) if (r.size, r.tokens, r.seed) == (run.size, run.tokens, run.seed)]
        tokens = grid.format_tokens(run.tokens)
        return f"train_{run.size.replace('.', 'p')}_{tokens}_seed{run.seed}_{cell.index(i) + 1}of{len(cell)}"

    def batch_job_log(self, i: int) -> str:
        """The log of training job ``i`` (all its runs), beside its runs' own logs."""
        run = self.runs[self.train_batches[i][0]]
        return f"results/logs/train/{run.size}/{grid.format_tokens(run.tokens)}/seed{run.seed}/{self.batch_name(i)}.log"

    def batch_priority(self, batch: Sequence[str]) -> int:
        """Scheduling priority of a training batch: its training GFLOPs, so that the longest jobs start first and
        the short ones fill the cores at the end."""
        return sum(grid.training_flops(self.runs[run_id], self.vocab_size) for run_id in batch) // 10**9

    def job_plan(self, runs: Sequence[RunSettings]) -> tuple[int, int | str]:
        """Sequences per micro-batch (0 = the whole batch) and activation checkpointing (`qatlaw train
        --activation-checkpointing`: 0, 1 or auto) of a job training ``runs``: training.micro_batch_size and
        training.activation_checkpointing, or on GPUs the memory model's plan (qatlaw.memory.plan_run) that fits
        every run: the smallest micro-batch, checkpointing when any run needs it."""
        training = self.training
        if not grid.on_gpu(training):
            checkpointing = training["activation_checkpointing"]
            return training["micro_batch_size"] or 0, checkpointing if checkpointing == "auto" else int(checkpointing)
        plans = [memory.plan_run(run, self.vocab_size, training) for run in runs]
        return min(plan.micro_batch for plan in plans), int(any(plan.checkpointing for plan in plans))

    def train_execution(self, micro_batch: Any, checkpointing: Any) -> dict[str, Any]:
        """How training jobs execute, as resources of the train rule (not params), so that changing them retrains
        nothing: device, checkpoint intervals (steps; minutes, as a string: Snakemake rounds float resources),
        torch.compile, ``micro_batch``, the sequences per micro-batch, and ``checkpointing``, activation
        checkpointing (0, 1 or auto; each a value or a function of the wildcards), tokens per chunk of the loss
        (0 = all at once), and the seconds between the stop signal and the time limit, which SLURM is asked for
        (sbatch --signal; a profile's train:slurm_extra replaces this one)."""
        training = self.training
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

    def batch_execution(self, batch: Sequence[str]) -> dict[str, Any]:
        """How training job ``batch`` executes (:meth:`train_execution`, at the :meth:`job_plan` of its runs)."""
        return self.train_execution(*self.job_plan([self.runs[run_id] for run_id in batch]))

    # ------------------------------------------------------------------------------------------ analyses
    def cell_tables(self, analysis: str) -> list[str]:
        """The per-cell tables of an analysis (layer_error, outliers), in grid order, and the restored runs' rows."""
        restored = [f"results/{RESTORED}/analysis/{analysis}.parquet"] if self.restored else []
        return [f"results/analysis/{analysis}/{cell}.parquet" for cell in self.cells] + restored

    def grid_run_ids(self) -> str:
        """Every run id of the grid at QAT fraction 1, in grid order: the rows of a gathered analysis table."""
        return " ".join(run_id for run_id, run in self.runs.items() if run.qat_fraction == 1)

    def analysis_resources(self, runs: Sequence[RunSettings]) -> dict[str, int]:
        """Memory (MB) and runtime (minutes) of the analysis of one cell's models ``runs``."""
        return analysis_plan.job_resources(runs, self.vocab_size, self.config["analysis"]["tokens"],
                                           threads=self.training["threads"], gpu=grid.on_gpu(self.training))

    def analysis_execution(self) -> dict[str, Any]:
        """Where analysis jobs run, as resources (not params: changing it reruns nothing): on GPU configs one GPU
        each (gpu=1) and device cuda, else the CPU (training.threads threads)."""
        gpu = grid.on_gpu(self.training)
        return {"gpu": int(gpu), "analysis_device": "cuda" if gpu else "cpu"}
