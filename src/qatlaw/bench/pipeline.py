"""The ``pipeline`` section of the benchmark.

``pipeline``
    Share of a whole workflow run spent outside training, from an existing ``--results`` directory and the
    run's wall time (``--pipeline-wall`` seconds, or ``--pipeline-wall-file``): see :func:`pipeline_overhead`.
    Also the peak RSS of the jobs (Snakemake benchmark files). Skipped when ``results/benchmarks`` is missing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def read_wall_seconds(path: str | Path) -> float:
    """Total wall seconds from a file: a plain number (e.g. GNU ``time -f %e``), or ``time -p`` output (the
    ``real`` line), or bash ``time`` output (``real 11m2.5s``)."""
    text = Path(path).read_text()
    match = re.search(r"^real\s+(?:(\d+)m)?([\d.]+)s?\s*$", text, re.MULTILINE)
    if match:
        return 60.0 * float(match.group(1) or 0) + float(match.group(2))
    for token in text.split():
        try:
            return float(token)
        except ValueError:
            continue
    raise ValueError(f"{path}: no wall time in seconds found")


def _benchmark_files(results: Path) -> pd.DataFrame:
    rows = []
    for path in sorted((results / "benchmarks").rglob("*.tsv")):
        table = pd.read_csv(path, sep="\t")
        if "s" not in table.columns or table.empty:
            continue
        rel = path.relative_to(results / "benchmarks")
        rss = pd.to_numeric(table.get("max_rss", pd.Series([np.nan])), errors="coerce")
        rows.append({"job": str(rel.with_suffix("")), "train": rel.parts[0] == "train",
                     "s": float(pd.to_numeric(table["s"], errors="coerce").mean()), "max_rss_mib": float(rss.max())})
    return pd.DataFrame(rows, columns=["job", "train", "s", "max_rss_mib"])


def pipeline_overhead(results: str | Path = "results", total_wall_s: float | None = None, *, cores: int = 2,
                      threads_per_job: int = 1) -> dict[str, Any]:
    """Where a workflow run's time went, from its ``results`` directory.

    Inputs: every Snakemake benchmark file ``results/benchmarks/**/*.tsv`` (column ``s``: the job's wall
    seconds, mean over its rows; ``max_rss``: peak RSS in MiB) — the train jobs are those under
    ``benchmarks/train/`` — and every run's ``results/runs/**/summary.parquet`` (``wall_s``: the run's training
    loop, checkpoint writes included, without interpreter start, data loading, evaluation and output writes).
    ``total_wall_s`` is the wall time of the whole ``snakemake --cores <cores>`` invocation.

    Returns: ``train_jobs_s`` (Σ s of train jobs), ``train_loop_s`` (Σ wall_s), ``other_jobs_s`` (Σ s of the
    other benchmarked jobs; jobs without a ``benchmark:`` directive are not counted anywhere),
    ``per_train_job_overhead_s`` = (train_jobs_s − train_loop_s) / train jobs; with ``total_wall_s``:
    ``core_s`` = cores × total_wall_s (the CPU time the run had), ``train_jobs_share`` = train_jobs_s ×
    threads_per_job / core_s, ``train_loop_share`` = train_loop_s × threads_per_job / core_s, and
    ``outside_training_share`` = 1 − train_loop_share: the share of the run's core-seconds not spent in a
    training loop (scheduling, start-up, data, evaluation, analyses, fits, figures, idle cores). Also the
    peak RSS over train jobs and the number of jobs over 2 GiB.
    """
    results = Path(results)
    jobs = _benchmark_files(results)
    walls = [float(pd.read_parquet(p, columns=["wall_s"])["wall_s"].sum())
             for p in sorted((results / "runs").rglob("summary.parquet"))]
    train = jobs[jobs["train"]]
    out: dict[str, Any] = {
        "results": str(results), "cores": cores, "threads_per_job": threads_per_job,
        "total_wall_s": float("nan") if total_wall_s is None else float(total_wall_s),
        "benchmarked_jobs": len(jobs), "train_jobs": len(train), "run_summaries": len(walls),
        "train_jobs_s": float(train["s"].sum()), "train_loop_s": float(sum(walls)),
        "other_jobs_s": float(jobs.loc[~jobs["train"], "s"].sum()),
        "max_train_rss_mib": float(train["max_rss_mib"].max()) if len(train) else float("nan"),
        "median_train_rss_mib": float(train["max_rss_mib"].median()) if len(train) else float("nan"),
        "jobs_over_2GiB": int((jobs["max_rss_mib"] > 2048).sum()),
    }
    out["per_train_job_overhead_s"] = ((out["train_jobs_s"] - out["train_loop_s"]) / len(train)
                                       if len(train) else float("nan"))
    core_s = cores * out["total_wall_s"]
    out["core_s"] = core_s
    out["train_jobs_share"] = out["train_jobs_s"] * threads_per_job / core_s
    out["train_loop_share"] = out["train_loop_s"] * threads_per_job / core_s
    out["outside_training_share"] = 1.0 - out["train_loop_share"]
    return out
