"""The runs a fit uses and how they enter it: which runs are usable, the QAT losses of a δ law's runs, and the
bootstrap over the design behind every interval.

Runs that diverged, or whose loss (or, without a baseline, δ) is NaN or ≤ 0, are left out with a warning that
names them and counted (``n_dropped``).

Bootstrap intervals resample the design (:mod:`qatlaw.resample`: cells by (N, D) with replacement, then the
seeds inside each, the runs of one seed of a cell kept together since they share a BF16 baseline; seeded) and
refit each resample with the full data's Huber threshold, from the full-data optimum (δ laws), or from the best
distinct local optima of the full-data fit and ``BOOT_HALTON`` Halton starts (Chinchilla, whose E, A and α trade
off along a flat valley on small grids: one L-BFGS path from one start may end at a saddle or another optimum
depending on rounding). Resamples whose fit is not identified are skipped with a warning, and when fewer than
half of them can be fitted no interval is reported (NaN). EPM intervals hold A and α at their point estimates.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pandas as pd

from qatlaw import resample
from qatlaw.fit.solver import FitError, QatLoss

log = logging.getLogger("qatlaw.fit")

BOOT_QUANTILES = (0.05, 0.95)  # an interval runs between these quantiles of the bootstrap draws
MIN_BOOT_SHARE = 0.5  # fewer identified resamples than this share of them give no interval

BASE = "baseline"  # a δ table's column of the BF16 baseline loss of every run (the QAT loss is baseline + delta)


def valid_runs(df: pd.DataFrame, columns: tuple[str, ...]) -> tuple[pd.DataFrame, pd.Series]:
    """The columns as floats (original index) and which runs a fit can use: finite, positive N, D and loss,
    G ≥ 2, not diverged; a δ must be finite and, without a baseline loss to add it to, positive (with one, the
    QAT loss baseline + δ must be positive, so a δ ≤ 0 is a run like any other)."""
    with_base = "delta" in columns and BASE in df.columns
    names = (*columns, BASE) if with_base else columns
    # numpy arrays, not a frame, until the end: a fit of a simulated study (qatlaw.design) spends its time here
    data = {c: pd.to_numeric(df[c], errors="coerce").astype(float).to_numpy() for c in names}
    ok = np.logical_and.reduce([np.isfinite(values) for values in data.values()])
    for c in columns:
        if not (with_base and c == "delta"):
            ok &= data[c] > 0
    if with_base:
        ok &= (data[BASE] > 0) & (data[BASE] + data["delta"] > 0)
    if "G" in columns:
        ok &= data["G"] >= 2
    if "diverged" in df.columns:
        ok &= ~df["diverged"].fillna(False).astype(bool).to_numpy()
    return pd.DataFrame(data, index=df.index), pd.Series(ok, index=df.index)


def usable_runs(df: pd.DataFrame, columns: tuple[str, ...], what: str, n_params: int) -> tuple[pd.DataFrame, int]:
    """The runs a fit can use (columns as floats) and how many were left out; FitError for a missing column or
    too few runs for n_params."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise FitError(f"{what}: run table lacks columns {', '.join(missing)}")
    data, ok = valid_runs(df, columns)
    n_ok, n_dropped = int(ok.sum()), int((~ok).sum())
    why = _why_left_out(columns, BASE in data.columns)
    if n_dropped:
        ids = df.loc[~ok, "run_id"].astype(str).tolist() if "run_id" in df.columns else []
        log.warning("%s: left out %d of %d runs (%s)%s", what, n_dropped, len(df), why,
                    f": {', '.join(ids)}" if ids else "")
    if n_ok < n_params:
        dropped = f" ({n_dropped} of {len(df)} left out: {why})" if n_dropped else ""
        raise FitError(f"{what}: {n_ok} usable runs for {n_params} parameter{'s' * (n_params > 1)}{dropped}")
    return data[ok], n_dropped


def _why_left_out(columns: tuple[str, ...], with_base: bool) -> str:
    value = columns[-1]
    if value == "delta" and with_base:
        return f"diverged, or NaN {value} or non-positive {', '.join(columns[:-1])}"
    return f"diverged, or NaN or non-positive {', '.join(columns[:-1])} or {value}"


def fit_name(df: pd.DataFrame, what: str) -> str:
    """Name of a fit for messages: the law, and the precision when the runs share one."""
    if "precision" in df.columns and df["precision"].nunique() == 1:
        return f"{what} ({df['precision'].iloc[0]})"
    return what


def qat_loss(data: pd.DataFrame, x: np.ndarray, offset: np.ndarray | None = None) -> QatLoss:
    """The QatLoss of a table of usable runs (:func:`valid_runs`) with columns ``delta`` and, where measured,
    ``baseline``."""
    delta = data["delta"].to_numpy(float)
    if BASE in data.columns:
        base = data[BASE].to_numpy(float)
        log_base, log_obs = np.log(base), np.log(base + delta)
    else:
        log_base, log_obs = np.full(len(delta), -np.inf), np.log(delta)
    return QatLoss(x, log_base, log_obs, np.zeros(len(delta)) if offset is None else offset)


def design(runs: pd.DataFrame) -> resample.Design:
    """The resampling design of a run table (:mod:`qatlaw.resample`): cells by (N, D), the runs of one seed of
    a cell (they share a BF16 baseline) kept together."""
    return resample.of_table(runs, ["N", "D"], "seed")


def bootstrap(refit: Callable[[np.ndarray], dict[str, float] | None], plan: resample.Design,
              names: tuple[str, ...], n_boot: int, seed: int, what: str) -> pd.DataFrame:
    """n_boot refits on seeded resamples of ``plan`` (cells, and seeds within them), one row per resample whose
    fit is identified (refit gives None otherwise), indexed by the resample's number; no rows when fewer than
    MIN_BOOT_SHARE of them are, since the rest would then be a biased few."""
    samples = {draw: s for draw, idx in enumerate(plan.draws(n_boot, seed)) if (s := refit(idx)) is not None}
    if len(samples) < n_boot:
        log.warning("%s: %d of %d bootstrap resamples could not identify every constant and were skipped",
                    what, n_boot - len(samples), n_boot)
    if len(samples) < MIN_BOOT_SHARE * n_boot:
        log.warning("%s: no intervals: only %d of %d resamples could be fitted (too few cells for the constants)",
                    what, len(samples), n_boot)
        return pd.DataFrame(columns=list(names), dtype=float)
    return pd.DataFrame.from_dict(samples, orient="index", columns=list(names))


def identified(solve: Callable[[], dict[str, float]]) -> dict[str, float] | None:
    """A bootstrap refit, or None when it is not identified."""
    try:
        return solve()
    except FitError:
        return None

