"""A shipped reference result: a finished results folder copied into ``reference/<grid>/`` with its config, the
machine and wall time it ran on, and its findings.

Layout of ``reference/<grid>/`` (written by :func:`package`):

| path | what |
|---|---|
| ``runs.parquet`` | every run of the grid (nothing dropped) |
| ``runs/<run_id>/metrics.parquet`` | per-step training metrics of every run (the training-curve figure reads them) |
| ``analysis/*.parquet`` | the same files as ``results/analysis/`` |
| ``fit/{params,predictions,comparison,bootstrap}.parquet`` | the law fits and their bootstrap draws |
| ``figures/*.png``, ``tables/*.md`` | the paper's figures and tables |
| ``config.yaml`` | the exact merged config the grid ran with |
| ``run.json`` | wall time, machine, commit, versions |
| ``FINDINGS.md``, ``findings.parquet``, ``seed_noise`` in FINDINGS.md | :mod:`qatlaw.findings` |
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from qatlaw.errors import QatlawError
from qatlaw.io import atomic_path
from qatlaw.machine import cpu_model

FIT_FILES = ("params", "predictions", "comparison", "bootstrap")


class ReferenceError(QatlawError):
    """A results folder is incomplete and cannot be shipped."""


def _machine() -> dict[str, Any]:
    import torch

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "memory_gib": round(os.sysconf("SC_PAGE_SIZE")
            * os.sysconf("SC_PHYS_PAGES") / 2**30, 1), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}


def git_commit(repo: Path) -> str:
    """The commit checked out in ``repo`` ("unknown" without git or outside a repository)."""
    try:
        return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def package(results: str | Path, out: str | Path, config: Mapping[str, Any], *, wall_s: float | None,
            command: str, title: str) -> Path:
    """Copy a finished ``results`` folder into ``out`` (layout in the module docstring), with ``config`` (the
    merged config), the wall time, the machine and the findings. ReferenceError names the first missing file;
    ``out`` is only replaced once everything is in place."""
    from qatlaw import findings

    results, out = Path(results), Path(out)
    wanted = [results / "runs.parquet", *(results / "fit" / f"{name}.parquet" for name in FIT_FILES)]
    analysis = sorted((results / "analysis").glob("*.parquet"))
    figures, tables = sorted((results / "figures").glob("*.png")), sorted((results / "tables").glob("*.md"))
    for path in wanted:
        if not path.is_file():
            raise ReferenceError(f"{path}: missing; run the workflow to the end first")
    if not (analysis and figures and tables):
        raise ReferenceError(f"{results}: no analysis, figure or table files; run the workflow to the end first")
    stage = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(stage, ignore_errors=True)
    files = [*wanted, *analysis, *figures, *tables, *sorted((results / "runs").glob("*/*/*/*/metrics.parquet"))]
    for path in files:
        _copy(path, stage / path.relative_to(results))
    with atomic_path(stage / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(dict(config), sort_keys=False), encoding="utf-8")
    info = {"title": title, "command": command, "wall_s": wall_s, "commit": git_commit(Path.cwd()),
            "machine": _machine()}
    with atomic_path(stage / "run.json") as tmp:
        tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    findings.run_findings(stage, stage / "FINDINGS.md", stage / "findings.parquet",
                          config.get("fit", {}).get("metric", "val_loss"), f"Findings: {title}")
    if out.exists():
        shutil.rmtree(out)
    stage.rename(out)
    return out
