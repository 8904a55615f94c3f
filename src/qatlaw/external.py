"""Run tables from outside: QAT runs trained elsewhere enter the workflow at the runs stage.

A table (CSV or Parquet) has one row per run:

| column | meaning |
|---|---|
| ``N`` | non-embedding parameters |
| ``D`` | training tokens |
| ``precision`` | ``BF16`` (the baselines) or a QAT label: a precision string of :mod:`qatlaw.precision` (``W4A4``, ``W4A16-fc2a8``, ...) or a label the user declares (``MXFP4-fwd``) |
| ``G`` | group size of a QAT run (empty for BF16) |
| ``loss`` | final validation loss |
| ``seed`` | optional, default 0 |

Any other column is kept (``source``, ``format``, ...). δ pairs each QAT row with the BF16 row of the same N, D
and seed (:func:`qatlaw.runtable.delta_table`). :func:`import_runs` checks a table and gives the run table of
``runs.parquet``: ``size`` (a label from N), ``tokens_requested`` = D, ``group`` (``str(G)``, ``none`` for BF16),
``val_loss`` = the table's loss, ``loss`` (the smoothed training loss: not in such a table, NaN), ``diverged``
false, and a ``run_id``. A bad table is refused in one line naming what is wrong (and the rows) before anything
is written.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from qatlaw import precision as prec
from qatlaw.errors import QatlawError
from qatlaw.io import write_parquet
from qatlaw.precision import BASELINE

REQUIRED = ("N", "D", "precision", "G", "loss")
SHOWN_ROWS = 5  # rows named in an error line, at most


class ExternalTableError(QatlawError):
    """A run table from outside is missing, unreadable, or not a table of runs."""


def read_table(path: str | Path) -> pd.DataFrame:
    """A CSV or Parquet file as a table; ExternalTableError naming the file when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise ExternalTableError(f"{path}: no such file")
    try:
        return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except Exception as exc:  # noqa: BLE001 - a reader's own error types vary; one line names the file
        raise ExternalTableError(f"{path}: not a readable CSV or Parquet table ({type(exc).__name__}: {exc})") from None


def _rows(mask: pd.Series) -> str:
    """The table's row numbers (1 = its first data row) where mask holds, at most SHOWN_ROWS of them."""
    rows = [str(i + 1) for i in np.flatnonzero(mask.to_numpy())]
    return ", ".join(rows[:SHOWN_ROWS]) + (f" and {len(rows) - SHOWN_ROWS} more" if len(rows) > SHOWN_ROWS else "")


def _size(n: float) -> str:
    """A size label from N, e.g. 30.5M."""
    return f"{n / 1e6:.3g}M"


def _known(label: str, declared: Sequence[str]) -> bool:
    return label == BASELINE or label in declared or prec.is_precision(label)


def import_runs(table: pd.DataFrame, precisions: Sequence[str] = (), what: str = "run table") -> pd.DataFrame:
    """The run table of an outside table of runs (module docstring), checked; ``precisions`` are the QAT labels
    the user declares beyond this project's precision strings. ExternalTableError, one line, for a missing
    column, a non-positive or NaN N, D or loss, a QAT row without G ≥ 2, an undeclared label, a duplicate run or
    a QAT row with no BF16 baseline."""
    missing = [c for c in REQUIRED if c not in table.columns]
    if missing:
        raise ExternalTableError(f"{what}: lacks column{'s' * (len(missing) > 1)} {', '.join(missing)} "
                                 f"(needs {', '.join(REQUIRED)}; seed optional)")
    runs = table.copy()
    if "seed" not in runs.columns:
        runs["seed"] = 0
    runs["precision"] = runs["precision"].astype(str).str.strip()
    for column in ("N", "D", "loss", "G", "seed"):
        runs[column] = pd.to_numeric(runs[column], errors="coerce")
    for column in ("N", "D", "loss"):
        bad = ~(runs[column] > 0)  # NaN fails too
        if bad.any():
            raise ExternalTableError(f"{what}: {column} is NaN or not positive in row(s) {_rows(bad)}")
    if runs["seed"].isna().any():
        raise ExternalTableError(f"{what}: seed is not a number in row(s) {_rows(runs['seed'].isna())}")
    unknown = sorted({p for p in runs["precision"] if not _known(p, precisions)})
    if unknown:
        raise ExternalTableError(f"{what}: unknown precision label(s) {', '.join(unknown)}: use BF16, a precision "
                                 "string (W4A4, W4A16, ...) or declare them (external.precisions, --precision)")
    qat = runs["precision"] != BASELINE
    bad_g = qat & ~(runs["G"] >= 2)
    if bad_g.any():
        raise ExternalTableError(f"{what}: a QAT run needs its group size G >= 2: row(s) {_rows(bad_g)}")
    key = ["N", "D", "precision", "G", "seed"]
    duplicated = runs.assign(G=runs["G"].fillna(-1)).duplicated(key, keep=False)
    if duplicated.any():
        raise ExternalTableError(f"{what}: the same run (N, D, precision, G, seed) twice: row(s) {_rows(duplicated)}")
    cell = ["N", "D", "seed"]
    baselines = pd.MultiIndex.from_frame(runs.loc[~qat, cell])
    orphan = qat & ~pd.MultiIndex.from_frame(runs[cell]).isin(baselines)
    if orphan.any():
        raise ExternalTableError(f"{what}: QAT row(s) {_rows(orphan)} have no BF16 row of the same N, D and seed")
    return _normalized(runs, qat)


def _normalized(runs: pd.DataFrame, qat: pd.Series) -> pd.DataFrame:
    """The checked table in the run table's schema (module docstring), free columns kept after it."""
    free = [c for c in runs.columns if c not in (*REQUIRED, "seed")]
    G = runs["G"].where(qat).astype("Int64")
    group = G.astype(str).where(qat, "none")
    size = runs["N"].map(_size)
    tokens = runs["D"].astype("int64")
    seed = runs["seed"].astype("int64")
    variant = np.where(qat, runs["precision"] + "_g" + group, BASELINE)
    out = pd.DataFrame({
        "run_id": size + "/" + tokens.astype(str) + "/seed" + seed.astype(str) + "/" + variant,
        "size": size, "N": runs["N"].astype(float), "D": runs["D"].astype(float), "tokens_requested": tokens,
        "seed": seed, "precision": runs["precision"], "group": group, "G": G, "loss": math.nan,
        "val_loss": runs["loss"].astype(float), "diverged": False,
    })
    extra = runs[free].rename(columns={c: f"source_{c}" for c in free if c in out.columns})
    return pd.concat([out, extra.reset_index(drop=True)], axis=1)


def run(path: str | Path, out: str | Path, precisions: Sequence[str] = ()) -> pd.DataFrame:
    """Check the table at ``path`` and write it as a run table (``runs.parquet``) to ``out``."""
    runs = import_runs(read_table(path), precisions, what=str(path))
    write_parquet(runs, out)
    return runs


def stages(runs: pd.DataFrame, table: str | Path) -> tuple[str, bool]:
    """What a workflow started from a run table does (a sentence for the log and FINDINGS.md), and whether it
    decomposes δ (only with runs of the decomposition's precisions: W4A4, W4A16, W16A4, ...)."""
    from qatlaw.decompose import COMPONENTS

    labels = sorted(set(runs["precision"]) - {BASELINE})
    decomposes = bool(set(labels) & set(COMPONENTS.values()))
    ran = ["import", *(["decomposition"] if decomposes else []), "fit", "figures", "tables", "findings"]
    skipped = ["data", "training", "per-layer error", "outliers", "mixed precision",
               *([] if decomposes else ["decomposition (no W4A4, W4A16 or W16A4 runs)"])]
    return (f"Runs imported from {table} ({len(runs)} runs: {', '.join(labels)} and {BASELINE}). Stages run: "
            f"{', '.join(ran)}; skipped: {', '.join(skipped)} (they need the training data or the models' "
            "weights)."), decomposes

