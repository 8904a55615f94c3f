"""The run table ``runs.parquet`` and the quantization error δ of its runs.

δ_p = loss(p) − loss(BF16 baseline of the same size, tokens and seed), measured on one of ``METRICS``: the
validation loss (``val_loss``) or the smoothed training loss (``loss``, the paper's). :func:`read_runs` reads
the run table, :func:`delta_table` pairs every QAT run with its baseline and :func:`metric_columns` names the
loss and δ columns of a metric.

Column ``qat_fraction`` (``QAT_FRACTION``) is the share f of a run's tokens trained in QAT: 1 for QAT from scratch
and for the BF16 baselines, 0 < f < 1 for a branch from its baseline's trunk, 0 for post-training quantization
(a run table written before the column existed holds only f = 1). The stages of the paper's study (δ law,
decomposition, mixed precision, figures, findings) read only the runs at f = 1 (:func:`from_scratch`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from qatlaw.errors import QatlawError
from qatlaw.io import read_parquet, write_parquet
from qatlaw.precision import BASELINE

log = logging.getLogger("qatlaw.runtable")

# The losses a δ and a law can be measured on (config key fit.metric), each with its loss column in the run
# table and its δ column in the δ table.
METRICS: dict[str, tuple[str, str]] = {"val_loss": ("val_loss", "delta_val"), "loss": ("loss", "delta")}
CELL = ["size", "tokens_requested", "seed"]  # a BF16 baseline and the QAT runs it is the baseline of
# The columns of runs.parquet that the analyses and the fits read (a hand-made run table needs only these).
RUN_TABLE_COLUMNS = ("run_id", "size", "N", "D", "tokens_requested", "seed", "precision", "group", "G", "loss",
                     "val_loss", "diverged")
QAT_FRACTION = "qat_fraction"
RUN_TABLE_KINDS = {"N": "number", "D": "number", "tokens_requested": "number", "seed": "number",
                   "G": "number", "loss": "number", "val_loss": "number", "diverged": "bool"}
# One run's summary row (runs/<run_id>/summary.parquet), as train writes it and collect_runs reads it.
SUMMARY_COLUMNS = (
    "run_id", "size", "N", "D", "tokens_requested", "group", "G", "precision", "seed", "loss", "val_loss",
    "val_loss_last", "final_step_loss", "steps", "tokens_per_step", "epochs", "lr", "wall_s", "tokens_per_s", "diverged",
    "resumed", "vocab_size", "seq_len", "clip", "format", "lac", "device", "numerics", "qat_fraction",
)
# The columns every run summary has: those written before the QAT fraction was recorded lack it (QAT from scratch).
SUMMARY_REQUIRED = SUMMARY_COLUMNS[:-1]
# The per-step metrics file of a run (runs/<run_id>/metrics.parquet).
STEP_COLUMNS = ("step", "tokens", "loss", "loss_ema", "lr", "grad_norm", "tokens_per_s")
DELTA_COLUMNS = (
    "run_id", "size", "N", "D", "tokens_requested", "seed", "precision", "group", "G",
    "loss", "val_loss", "baseline_loss", "baseline_val_loss", "delta", "delta_val", "diverged",
)


class RunTableError(QatlawError):
    """The run table is missing or damaged, lacks columns, or a QAT run lacks its BF16 baseline."""


def metric_columns(metric: str) -> tuple[str, str]:
    """The loss column (run table) and the δ column (δ table) of ``metric``."""
    if metric not in METRICS:
        raise RunTableError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    return METRICS[metric]


def with_qat_fraction(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with column ``qat_fraction``: 1.0 for every row of a table written before the column existed."""
    return table if QAT_FRACTION in table else table.assign(**{QAT_FRACTION: 1.0})


def from_scratch(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of the runs trained in QAT from scratch and of the BF16 baselines (QAT fraction 1)."""
    table = with_qat_fraction(table)
    return table[table[QAT_FRACTION] == 1].reset_index(drop=True)


def read_runs(path: str | Path, all_fractions: bool = False) -> pd.DataFrame:
    """The run table ``runs.parquet``, checked: RunTableError naming the file and ``RUN_TABLE_COLUMNS`` when it
    is missing, unreadable (e.g. truncated) or lacks a column the analyses and fits need. Only the runs at QAT
    fraction 1 (:func:`from_scratch`) unless ``all_fractions``; column ``qat_fraction`` always there."""
    table = with_qat_fraction(read_parquet(path, RUN_TABLE_COLUMNS, "run table", kinds=RUN_TABLE_KINDS,
                                           error=RunTableError))
    return table if all_fractions else from_scratch(table)


def delta_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per QAT run with its δ on the smoothed training loss (``delta``) and on the validation loss
    (``delta_val``). ``diverged`` is true when the run or its baseline diverged (δ is then NaN)."""
    missing = sorted(set(RUN_TABLE_COLUMNS) - set(runs.columns))
    if missing:
        raise RunTableError(f"run table lacks columns {', '.join(missing)}")
    is_base = runs["precision"] == BASELINE
    base = runs[is_base].set_index(CELL)
    if base.index.duplicated().any():
        raise RunTableError(f"more than one BF16 baseline for cell {base.index[base.index.duplicated()][0]}")
    qat = runs[~is_base]
    keys = pd.MultiIndex.from_frame(qat[CELL])
    orphans = ~keys.isin(base.index)
    if orphans.any():
        raise RunTableError(f"run {qat['run_id'][orphans].iloc[0]} has no BF16 baseline with the same size, tokens and seed")
    matched = base.reindex(keys)
    out = qat.assign(diverged=qat["diverged"].to_numpy() | matched["diverged"].to_numpy(),
                     **{f"baseline_{loss}": matched[loss].to_numpy() for loss, _ in METRICS.values()})
    out = out.assign(**{delta: (out[loss] - out[f"baseline_{loss}"]).where(~out["diverged"])
                        for loss, delta in METRICS.values()})
    if out["diverged"].any():
        log.warning("%d runs have no δ because they or their baseline diverged", int(out["diverged"].sum()))
    return out.loc[:, list(DELTA_COLUMNS)].reset_index(drop=True)


def collect_runs(summary_paths: list[str | Path], out_path: str | Path) -> pd.DataFrame:
    """Concatenate run summaries into one table (one row per run), checking each file's columns (a summary
    written before the QAT fraction was recorded is of a run from scratch)."""
    frames = []
    for path in summary_paths:
        frame = with_qat_fraction(read_parquet(path, SUMMARY_REQUIRED, "run summary", error=RunTableError))
        if tuple(frame.columns) != SUMMARY_COLUMNS or len(frame) != 1:
            raise RunTableError(f"{path}: expected one run summary row with columns {', '.join(SUMMARY_COLUMNS)}")
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True).sort_values("run_id", ignore_index=True)
    write_parquet(table, out_path)
    return table
