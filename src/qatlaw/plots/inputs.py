"""What the figures take from their input files: a metric's rows of ``decomposition.parquet`` and their means per
cell over seeds, and a fitted law's constants (from ``params.parquet``), their text with 90% intervals and the
law's bootstrap band (from ``bootstrap.parquet``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from qatlaw import fit
from qatlaw.config import schema_default
from qatlaw.report_inputs import CONSTANT_SYMBOLS, read_input

METRIC = schema_default("fit", "metric")  # default δ: of the config's default metric (fit.metric)


def read_decomposition(path: str | Path, metric: str) -> pd.DataFrame:
    """Rows of ``metric`` from ``decomposition.parquet``, with numeric N, D and G."""
    df = read_input(path, "decomposition")
    df = df[df["metric"] == metric].copy()
    for col in ("N", "D", "G", "tokens_requested"):
        df[col] = pd.to_numeric(df[col]).astype(float)
    df["group"] = df["group"].astype(str)
    return df


def cell_means(decomp: pd.DataFrame, column: str) -> pd.DataFrame:
    """Mean of ``column`` over seeds per (size, tokens_requested, group) with finite values, as ``value``, with
    the lowest and highest seed (``low``, ``high``) and the number of seeds (``seeds``)."""
    keys = ["size", "tokens_requested", "group"]
    rows = decomp[np.isfinite(decomp[column].astype(float))]
    out = rows.groupby(keys, as_index=False).agg(N=("N", "mean"), D=("D", "mean"), G=("G", "mean"),
                                                   value=(column, "mean"), low=(column, "min"),
                                                   high=(column, "max"), seeds=(column, "size"))
    return out.sort_values(["N", "tokens_requested", "G"], ignore_index=True)


def constants(params: pd.DataFrame, law: str, precision: str) -> dict[str, float] | None:
    """Fitted constants of a law, or None when it is absent or was not fitted (NaN); a unified law fitted at one G
    keeps its γG NaN (not identified)."""
    rows = params[(params["law"] == law) & (params["precision"] == precision)]
    values = dict(zip(rows["constant"], rows["value"].astype(float), strict=True))
    fitted = [v for c, v in values.items() if not (law in ("unified", "no_D") and c == "gamma_G")]
    return values if values and all(np.isfinite(fitted)) else None


def _intervals(params: pd.DataFrame, law: str, precision: str) -> dict[str, tuple[float, float]]:
    """Finite bootstrap intervals of a law's constants."""
    rows = params[(params["law"] == law) & (params["precision"] == precision)]
    return {r.constant: (float(r.ci_low), float(r.ci_high)) for r in rows.itertuples()
            if np.isfinite(float(r.ci_low)) and np.isfinite(float(r.ci_high))}


def law_text(params: pd.DataFrame, law: str, precision: str) -> str:
    """The fitted constants of a law with their 90% intervals, e.g. 'k=0.158 [0.12, 0.2] · γN=0.219 ...'."""
    values = constants(params, law, precision)
    if values is None:
        return f"{law} law for {precision} not fitted"
    ci = _intervals(params, law, precision)
    parts = []
    for name, value in values.items():
        if not np.isfinite(value):
            parts.append(f"{CONSTANT_SYMBOLS.get(name, name)} not identified (one G; k at that G)")
            continue
        interval = f" [{ci[name][0]:.3g}, {ci[name][1]:.3g}]" if name in ci else ""
        parts.append(f"{CONSTANT_SYMBOLS.get(name, name)}={value:.3g}{interval}")
    return " · ".join(parts) + (" (90% bootstrap CI)" if ci else " (no bootstrap CI)")


def law_band(draws: pd.DataFrame, law: str, precision: str, N: ArrayLike, D: ArrayLike,
             G: ArrayLike) -> tuple[np.ndarray, np.ndarray] | None:
    """5th and 95th percentile of a δ law's prediction over its bootstrap draws (None without draws)."""
    preds = fit.draw_predictions(draws, law, precision, N, D, G)
    if preds is None:
        return None
    low, high = np.quantile(preds, fit.BOOT_QUANTILES, axis=0)
    return low, high
