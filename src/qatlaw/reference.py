"""A shipped reference result: a finished results folder copied into ``reference/<grid>/`` with its config, the
machine and wall time it ran on, and its findings; and the restore of such a folder's runs into a new workflow, so
that a study runs in parts (one session's runs are shipped, the next session restores them and trains the rest) and
a shipped study can be extended with new cells.

Layout of ``reference/<grid>/`` (written by :func:`package`):

| path | what |
|---|---|
| ``runs.parquet`` | every run of the grid (nothing dropped) |
| ``runs/<run_id>/metrics.parquet`` | per-step training metrics of every run (the training-curve figure reads them) |
| ``analysis/*.parquet`` | the same files as ``results/analysis/`` |
| ``fit/{params,predictions,comparison,bootstrap}.parquet`` | the law fits and their bootstrap draws |
| ``figures/*.png``, ``tables/*.md`` | the paper's figures and tables |
| ``config.yaml`` | the exact merged config the grid ran with |
| ``run.json`` | wall time, machine, commit, versions (``restored``: the run.json of the folder it continued; ``refits``: each later refit, :func:`refit`) |
| ``FINDINGS.md``, ``findings.parquet``, ``seed_noise`` in FINDINGS.md | :mod:`qatlaw.findings` |

Restore (config key ``restore: <folder>``): every run of the configured grid that is in the folder's
``runs.parquet`` counts as done. :func:`restore_plan` checks, before any job, that each such run is the same run
(its settings in the config equal those in the folder's ``config.yaml``) and that the data and analysis settings
are those the folder ran with; :func:`restore` (rule ``restore``) writes the runs' summary rows, metrics and rows
of the per-run analyses (``layer_error``, ``outliers``: one model's rows never depend on another model) under
``results/restored/`` in the layout of ``results/``. Model weights are not shipped, so the analysis jobs see only
the models trained here, also in a cell that is partly restored; the gathered tables, ``runs.parquet`` and
everything after them are those of one uninterrupted run.
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

from qatlaw.errors import ConfigError, QatlawError
from qatlaw.io import atomic_path, read_parquet, write_parquet
from qatlaw.machine import cpu_model
from qatlaw.report_inputs import RESTORED, metrics_path

FIT_FILES = ("params", "predictions", "comparison", "bootstrap")
# The per-run analyses: their tables hold each run's rows (run_id), gathered from one table per cell.
RUN_ANALYSES = ("layer_error", "outliers")
# Data keys that do not change the token stores (how the tokenizing is split into jobs, a budget check).
DATA_EXECUTION_KEYS = ("shards_per_job", "allow_repeat")


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
    outside = bool((config.get("external") or {}).get("table"))  # runs from a table: no weights, no metrics
    if not ((analysis or outside) and figures and tables):
        raise ReferenceError(f"{results}: no analysis, figure or table files; run the workflow to the end first")
    run_ids = read_parquet(results / "runs.parquet", ("run_id",), "run table", error=ReferenceError)["run_id"]
    metrics = {} if outside else {run_id: metrics_path(results, run_id) for run_id in run_ids}
    for run_id, path in metrics.items():
        if not path.is_file():
            raise ReferenceError(f"{path}: missing (metrics of run {run_id}); run the workflow to the end first")
    stage = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(stage, ignore_errors=True)
    for path in [*wanted, *analysis, *figures, *tables]:
        _copy(path, stage / path.relative_to(results))
    for run_id, path in metrics.items():
        _copy(path, stage / "runs" / run_id / "metrics.parquet")
    with atomic_path(stage / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(dict(config), sort_keys=False), encoding="utf-8")
    info = {"title": title, "command": command, "wall_s": wall_s, "commit": git_commit(Path.cwd()),
            "machine": _machine()}
    earlier = results / RESTORED / "run.json"
    if earlier.is_file():
        info["restored"] = json.loads(earlier.read_text(encoding="utf-8"))
    with atomic_path(stage / "run.json") as tmp:
        tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    findings.run_findings(stage, stage / "FINDINGS.md", stage / "findings.parquet",
                          config.get("fit", {}).get("metric", "val_loss"), f"Findings: {title}",
                          _outside_note(stage, config))
    if out.exists():
        shutil.rmtree(out)
    stage.rename(out)
    return out


def _study_file(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise ReferenceError(f"{path}: missing; {folder} is not a whole study folder (written by `qatlaw reference`)")
    return path


def _first_difference(here: Mapping[str, Any], there: Mapping[str, Any], skip: tuple[str, ...] = ()) -> str | None:
    """The first key (sorted) whose value differs between two mappings, other than ``skip``."""
    return next((key for key in sorted(set(here) | set(there)) if key not in skip and here.get(key) != there.get(key)),
                None)


def restore_plan(cfg: Mapping[str, Any], folder: str | Path) -> list[str]:
    """The runs of ``cfg``'s grid that the shipped study ``folder`` holds, in grid order: checked to be the same
    runs (equal settings), trained on the same data and analysed with the same settings. ReferenceError, one line
    naming the file, run or key, for a missing or damaged folder, a changed setting or a folder with none of the
    grid's runs."""
    from qatlaw import config, grid

    folder = Path(folder)
    if not folder.is_dir():
        raise ReferenceError(f"{folder}: no such folder (a study folder written by `qatlaw reference`)")
    config_path = _study_file(folder, "config.yaml")
    try:
        shipped = config.load(config_path, check_files=False)
    except ConfigError as exc:
        raise ReferenceError(f"{config_path}: {exc}") from None
    for section, skip in (("data", DATA_EXECUTION_KEYS), ("analysis", ())):
        key = _first_difference(cfg[section], shipped[section], skip)
        if key is not None:
            raise ReferenceError(f"{section}.{key} is {cfg[section].get(key)!r} here but "
                                 f"{shipped[section].get(key)!r} in {config_path}; the restored runs need the "
                                 "settings they ran with")
    table = _study_file(folder, "runs.parquet")
    held = set(read_parquet(table, ("run_id",), "run table", error=ReferenceError)["run_id"])
    shipped_runs = {run.run_id: run for run in grid.grid_runs(shipped)}
    run_ids = []
    for run in grid.grid_runs(cfg):
        if run.run_id not in held:
            continue
        if run.run_id not in shipped_runs:
            raise ReferenceError(f"{table}: run {run.run_id} is not in the grid of {config_path}; the folder is damaged")
        here, there = json.loads(run.to_json()), json.loads(shipped_runs[run.run_id].to_json())
        key = _first_difference(here, there)
        if key is not None:
            raise ReferenceError(f"run {run.run_id}: {key} is {here.get(key)!r} here but {there.get(key)!r} in "
                                 f"{config_path}; a restored run must be the same run")
        run_ids.append(run.run_id)
    if not run_ids:
        raise ReferenceError(f"{table}: none of the configured grid's runs is in it; nothing to restore")
    for run in grid.grid_runs(cfg):
        if run.qat_fraction < 1 and run.run_id not in run_ids and run.baseline.run_id in run_ids:
            raise ReferenceError(f"run {run.run_id} would start from its baseline {run.baseline.run_id}, which is "
                                 f"restored from {folder} without its model or trunk checkpoints; restore it too or "
                                 "train the cell here")
    for run_id in run_ids:
        _study_file(folder, f"runs/{run_id}/metrics.parquet")
    analysed = _analysed(shipped_runs, run_ids)
    for analysis in RUN_ANALYSES:
        path = _study_file(folder, f"analysis/{analysis}.parquet")
        rows = set(read_parquet(path, ("run_id",), f"{analysis} table", error=ReferenceError)["run_id"])
        missing = [run_id for run_id in analysed if run_id not in rows]
        if missing:
            raise ReferenceError(f"{path}: no rows of run {missing[0]}; the folder is damaged")
    _study_file(folder, "run.json")
    return run_ids


def _analysed(runs: Mapping[str, Any], run_ids: list[str]) -> list[str]:
    """The runs among ``run_ids`` that the per-run analyses cover: those at QAT fraction 1."""
    return [run_id for run_id in run_ids if runs[run_id].qat_fraction == 1]


def restored_files(run_ids: list[str], results: str | Path = "results") -> list[str]:
    """The files :func:`restore` writes into ``results`` for the runs ``run_ids``."""
    base = Path(results) / RESTORED
    return [*(str(base / "runs" / run_id / name) for run_id in run_ids for name in ("summary.parquet",
                                                                                    "metrics.parquet")),
            *(str(base / "analysis" / f"{analysis}.parquet") for analysis in RUN_ANALYSES), str(base / "run.json")]


def restore(folder: str | Path, run_ids: list[str], results: str | Path) -> None:
    """Write the shipped runs ``run_ids`` of ``folder`` into ``results/restored/`` (:func:`restored_files`): each
    run's summary row and metrics, the per-run analyses' rows of these runs (in the folder's order) and the
    folder's run.json. A summary column recorded only since the folder was shipped (numerics, qat_fraction) is
    the run's setting. ReferenceError naming the file for a missing run, column or file."""
    from qatlaw import config, grid
    from qatlaw.runtable import SUMMARY_COLUMNS

    folder, base = Path(folder), Path(results) / RESTORED
    settings = {run.run_id: run for run in grid.grid_runs(config.load(_study_file(folder, "config.yaml"),
                                                                      check_files=False))}
    path = _study_file(folder, "runs.parquet")
    runs = read_parquet(path, ("run_id",), "run table", error=ReferenceError)
    for run_id in run_ids:
        row = runs[runs["run_id"] == run_id].reset_index(drop=True)
        if len(row) != 1:
            raise ReferenceError(f"{path}: {len(row)} rows of run {run_id}, expected one")
        for column in SUMMARY_COLUMNS:
            if column not in row and hasattr(settings[run_id], column):
                row[column] = getattr(settings[run_id], column)
        missing = [column for column in SUMMARY_COLUMNS if column not in row]
        if missing:
            raise ReferenceError(f"{path}: no column {missing[0]}, which runs.parquet records since; cannot restore")
        write_parquet(row[list(SUMMARY_COLUMNS)], base / "runs" / run_id / "summary.parquet")
        _copy(_study_file(folder, f"runs/{run_id}/metrics.parquet"), base / "runs" / run_id / "metrics.parquet")
    analysed = _analysed(settings, run_ids)
    for analysis in RUN_ANALYSES:
        path = _study_file(folder, f"analysis/{analysis}.parquet")
        table = read_parquet(path, ("run_id",), f"{analysis} table", error=ReferenceError)
        rows = table[table["run_id"].isin(analysed)].reset_index(drop=True)
        missing = sorted(set(analysed) - set(rows["run_id"]))
        if missing:
            raise ReferenceError(f"{path}: no rows of run {missing[0]}; the folder is damaged")
        write_parquet(rows, base / "analysis" / f"{analysis}.parquet")
    _copy(_study_file(folder, "run.json"), base / "run.json")


def refit(folder: str | Path, *, command: str = "") -> Path:
    """Refit a shipped study in place from its runs and analyses, training nothing: the law fits, every figure
    and table it ships, FINDINGS.md and findings.parquet, with the merged config it ran with (its ``fit`` keys
    included). ``run.json`` gains a ``refits`` entry (commit, machine, seconds, command). The folder is only
    replaced once everything is written."""
    import time

    from qatlaw import config

    folder = Path(folder)
    for name in ("run.json", "config.yaml", "runs.parquet"):
        if not (folder / name).is_file():
            raise ReferenceError(f"{folder / name}: missing; not a study folder written by `qatlaw reference`")
    start = time.monotonic()
    cfg = config.read_yaml(folder / "config.yaml")
    stage = folder.with_name(f".{folder.name}.refit.tmp")
    shutil.rmtree(stage, ignore_errors=True)
    shutil.copytree(folder, stage)
    try:
        _refit_stage(stage, cfg, command, start)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    folder.rename(old)
    stage.rename(folder)
    shutil.rmtree(old)
    return folder


def _refit_stage(stage: Path, cfg: Mapping[str, Any], command: str, start: float) -> None:
    """Every refitted file of :func:`refit`, written into the staging copy ``stage``."""
    import time

    from qatlaw import findings, fit, outputs, plots, runtable, tables

    metric = cfg["fit"]["metric"]
    runs = runtable.read_runs(stage / "runs.parquet")
    outside = bool((cfg.get("external") or {}).get("table"))
    caption = f"{stage.name.removeprefix('.').removesuffix('.refit.tmp')}: {cfg['external']['table']}" if outside \
        else outputs.grid_caption(cfg["grid"])
    fit.write_fits(fit.run_fits(runtable.delta_table(runs), runs, n_boot=cfg["fit"]["bootstrap"],
                                seed=cfg["fit"]["seed"], metric=metric, tie=cfg["fit"].get("tie", True)),
                   stage / "fit")
    inputs = {key: stage / path.removeprefix("results/") for key, path in outputs.INPUTS.items()}
    for png in sorted((stage / "figures").glob("*.png")):
        keys = plots.CATALOGUE[png.stem]
        plots.make_figure(png.stem, {k: str(inputs[k]) for k in keys}, png, caption, metric=metric)
        png.with_suffix(".svg").unlink(missing_ok=True)  # a study ships its figures as PNG
    for md in sorted((stage / "tables").glob("*.md")):
        tables.make_table(md.stem, {k: str(inputs[k]) for k in outputs.TABLES[md.stem]}, md.with_suffix(""))
        md.with_suffix(".csv").unlink(missing_ok=True)  # and its tables as Markdown
    info = json.loads((stage / "run.json").read_text(encoding="utf-8"))
    info.setdefault("refits", []).append({"command": command, "commit": git_commit(Path.cwd()),
                                          "machine": _machine(), "seconds": round(time.monotonic() - start, 1)})
    with atomic_path(stage / "run.json") as tmp:
        tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    findings.run_findings(stage, stage / "FINDINGS.md", stage / "findings.parquet", metric,
                          f"Findings: {info['title']}", _outside_note(stage, cfg))


def _outside_note(folder: Path, config: Mapping[str, Any]) -> str:
    """FINDINGS.md's note of a study of a run table from outside: which stages ran (empty for a trained grid)."""
    from qatlaw import external, runtable

    table = (config.get("external") or {}).get("table")
    return external.stages(runtable.read_runs(folder / "runs.parquet"), table)[0] if table else ""
