"""What the figures (:mod:`qatlaw.plots`) and the tables (:mod:`qatlaw.tables`) share, free of plotting imports: the
columns each Parquet input must have, reading one with a one-line error, picking a figure's or table's inputs,
and the symbols of the laws' constants."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from qatlaw import fit
from qatlaw.decompose import DECOMPOSITION_COLUMNS, FIT_COLUMNS
from qatlaw.errors import QatlawError
from qatlaw.io import read_parquet
from qatlaw.mixed import RANKING_COLUMNS
from qatlaw.runtable import from_scratch, with_qat_fraction

# Where a workflow keeps the restored files, in the layout of its results folder.
RESTORED = "restored"


def metrics_path(results: str | Path, run_id: str) -> Path:
    """The per-step metrics of run ``run_id`` in a results folder: trained there (``runs/<run_id>/``) or restored
    (``restored/runs/<run_id>/``); in a shipped folder always the former."""
    trained = Path(results) / "runs" / run_id / "metrics.parquet"
    restored = Path(results) / RESTORED / "runs" / run_id / "metrics.parquet"
    return restored if restored.is_file() and not trained.is_file() else trained


COLUMNS: dict[str, tuple[str, ...]] = {  # the columns each input must have
    "runs": ("run_id", "size", "N", "D", "tokens_requested", "group", "G", "precision", "seed", "loss"),
    "decomposition": DECOMPOSITION_COLUMNS,
    "decomposition_fit": FIT_COLUMNS,
    "outliers": ("run_id", "precision", "run_group", "layer_index", "layer_type", "kurtosis_token"),
    "mixed_ranking": RANKING_COLUMNS,
    "params": fit.PARAMS_COLUMNS,
    "predictions": fit.PREDICTIONS_COLUMNS,
    "comparison": fit.COMPARISON_COLUMNS,
    "bootstrap": fit.BOOTSTRAP_COLUMNS,
    "metrics": ("step", "tokens", "loss_ema"),
}
CONSTANT_SYMBOLS = {"k": "k", "gamma_N": "γN", "gamma_D": "γD", "gamma_G": "γG", "E": "E", "A": "A",
                    "alpha": "α", "B": "B", "beta": "β"}


class PlotError(QatlawError):
    """An input file of a figure or table is missing or lacks columns."""


def read_input(path: str | Path, key: str, all_fractions: bool = False) -> pd.DataFrame:
    """Input ``key`` of ``COLUMNS`` from ``path``; PlotError naming the file and the expected columns when it is
    missing, unreadable (e.g. truncated) or lacks a column. Of the run table only the runs at QAT fraction 1
    (:func:`qatlaw.runtable.from_scratch`) unless ``all_fractions`` (the split figures)."""
    table = read_parquet(path, COLUMNS[key], f"{key} table", error=PlotError)
    if key != "runs":
        return table
    return with_qat_fraction(table) if all_fractions else from_scratch(table)


def select_inputs(kind: str, name: str, catalogue: Mapping[str, Sequence[str]],
                  inputs: Mapping[str, str | Path]) -> dict[str, str | Path]:
    """The input files of ``kind`` (figure or table) ``name``, keyed as ``catalogue[name]`` names them; PlotError
    for a name not in ``catalogue`` or an input not given."""
    if name not in catalogue:
        raise PlotError(f"unknown {kind} {name!r} (known: {', '.join(catalogue)})")
    missing = [key for key in catalogue[name] if key not in inputs]
    if missing:
        raise PlotError(f"{kind} {name}: no input file given for {', '.join(missing)}")
    return {key: inputs[key] for key in catalogue[name]}
