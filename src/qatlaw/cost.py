"""What a grid costs on GPUs before anything runs: per run its GPUs, nodes, micro-batch, predicted peak memory,
wall time and job segments; per model size and in total, GPU-hours (torch-free, for the Snakefile and the CLI)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd

from qatlaw import grid, memory
from qatlaw.errors import ConfigError

COLUMNS = ("size", "runs", "gpus_per_run", "nodes_per_run", "micro_batch", "checkpointed_runs", "peak_gib",
           "hours_per_run", "segments", "gpu_hours")


@dataclass(frozen=True)
class RunPlan:
    """How one run executes on GPUs and what it costs."""

    run_id: str
    size: str
    gpus: int
    nodes: int
    micro_batch: int
    checkpointing: bool  # activation checkpointing of the blocks (qatlaw.memory.plan_run)
    peak_bytes: int
    wall_hours: float  # grid.estimate_resources' wall time, its margin for fake quantization included
    job_minutes: int  # wall time one attempt asks for: the estimate, capped at training.job_hours
    segments: int  # jobs the run needs at training.job_hours (1 without a limit)
    gpu_hours: float  # training FLOPs at grid.GPU_FLOPS_PER_GPU per GPU, without the estimate's margin


def run_resources(run: grid.RunSettings, vocab_size: int, training: Mapping[str, Any]) -> dict[str, int]:
    """Memory (MB per node) and wall time (minutes) a training run is estimated to need
    (grid.estimate_resources), on its own GPUs and nodes or on training.threads CPU threads."""
    gpus, nodes = grid.run_gpus(training, run.size), grid.run_nodes(training, run.size)
    return grid.estimate_resources(run, vocab_size, threads=training["threads"], gpus=gpus, nodes=nodes)


def wall_minutes(run: grid.RunSettings, vocab_size: int, training: Mapping[str, Any]) -> int:
    """Minutes of wall time a training run is estimated to take (:func:`run_resources`)."""
    return run_resources(run, vocab_size, training)["runtime"]


def segments(minutes: int, training: Mapping[str, Any]) -> int:
    """Jobs a run of ``minutes`` needs under training.job_hours (1 without a limit)."""
    limit = training["job_hours"]
    return 1 if limit is None else math.ceil(minutes / (60 * limit))


def job_minutes(minutes: int, attempt: int, training: Mapping[str, Any]) -> int:
    """Minutes a training job asks for on its ``attempt``-th try: the estimate × the attempt, at most
    training.job_hours."""
    limit = training["job_hours"]
    asked = minutes * attempt
    return asked if limit is None else min(asked, int(60 * limit))


def run_plan(run: grid.RunSettings, cfg: Mapping[str, Any]) -> RunPlan:
    """The GPU plan of one run of a validated config that trains on GPUs."""
    training, vocab = cfg["training"], cfg["data"]["vocab_size"]
    gpus = max(1, grid.run_gpus(training, run.size))
    plan = memory.plan_run(run, vocab, training)
    minutes = wall_minutes(run, vocab, training)
    flops = grid.training_flops(run, vocab)
    return RunPlan(run_id=run.run_id, size=run.size, gpus=gpus, nodes=grid.run_nodes(training, run.size),
                   micro_batch=plan.micro_batch, checkpointing=plan.checkpointing, peak_bytes=plan.peak_bytes,
                   wall_hours=minutes / 60,
                   job_minutes=job_minutes(minutes, 1, training), segments=segments(minutes, training), gpu_hours=flops / grid.GPU_FLOPS_PER_GPU / 3600)


def run_plans(cfg: Mapping[str, Any]) -> pd.DataFrame:
    """One row per run of the grid (RunPlan's fields)."""
    if not grid.on_gpu(cfg["training"]):
        raise ConfigError("training: the grid trains on CPU (device cpu and no gpus_per_run); its GPU cost "
                                  "is that of a GPU config, e.g. config/paper.yaml")
    return pd.DataFrame([asdict(run_plan(run, cfg)) for run in grid.grid_runs(cfg)])


def size_costs(plans: pd.DataFrame) -> pd.DataFrame:
    """Per model size (in grid order) and a 'total' row: runs, GPUs and nodes per run, the smallest micro-batch,
    the runs with activation checkpointing, the largest peak memory per GPU (GiB), the longest run's estimated wall hours and segments, and the GPU-hours
    of training at grid.GPU_FLOPS_PER_GPU."""
    by_size = plans.groupby("size", sort=False)
    table = pd.DataFrame({
        "runs": by_size.size(),
        "gpus_per_run": by_size["gpus"].max(),
        "nodes_per_run": by_size["nodes"].max(),
        "micro_batch": by_size["micro_batch"].min(),
        "checkpointed_runs": by_size["checkpointing"].sum(),
        "peak_gib": by_size["peak_bytes"].max() / 2**30,
        "hours_per_run": by_size["wall_hours"].max(),
        "segments": by_size["segments"].max(),
        "gpu_hours": by_size["gpu_hours"].sum(),
    }).reset_index()
    total = {"size": "total", "runs": len(plans), "gpus_per_run": plans["gpus"].max(),
             "nodes_per_run": plans["nodes"].max(), "micro_batch": plans["micro_batch"].min(),
             "checkpointed_runs": plans["checkpointing"].sum(),
             "peak_gib": plans["peak_bytes"].max() / 2**30, "hours_per_run": plans["wall_hours"].max(),
             "segments": plans["segments"].max(), "gpu_hours": plans["gpu_hours"].sum()}
    return pd.concat([table, pd.DataFrame([total])], ignore_index=True).loc[:, list(COLUMNS)]


def report(cfg: Mapping[str, Any]) -> tuple[str, pd.DataFrame]:
    """The cost of a GPU grid as printable text (what it assumes, the table per size, the total), and its plans."""
    from tabulate import tabulate

    plans = run_plans(cfg)
    table = size_costs(plans)
    limit = cfg["training"]["job_hours"]
    total = table["gpu_hours"].iloc[-1]
    head = (f"{len(plans)} runs at a vocabulary of {cfg['data']['vocab_size']}; GPU-hours at "
            f"{grid.GPU_FLOPS_PER_GPU:.0e} FLOP/s per GPU (bf16, about 1/3 of an A100's peak) for 6·(N + V·h)·D "
            "training FLOPs; hours per run: the job estimate, ×1.5 and +15 min for fake quantization and margin; "
            f"segments: jobs of at most {'unlimited' if limit is None else f'{limit:g}'} hours (training.job_hours)")
    body = tabulate(table, headers="keys", showindex=False,
                    floatfmt=("", "", "", "", "", "", ".1f", ".1f", "", ",.0f"))
    return f"{head}\n{body}\ntotal: {total:,.0f} GPU-hours = {total / 24:,.0f} GPU-days", plans
