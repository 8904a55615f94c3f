"""The quantization error δ of W4A4 split into a weight and an activation part (paper §4.3, Fig. 6 and 8), from
the δ of every run (:func:`qatlaw.runtable.delta_table`).

``decomposition.parquet`` (:func:`decomposition`), one row per (size, tokens_requested, seed, group, metric):

| column | meaning |
|---|---|
| ``size``, ``N``, ``D``, ``tokens_requested``, ``seed``, ``group``, ``G`` | the cell and group, as in ``runs.parquet`` |
| ``D_over_N`` | tokens per parameter |
| ``metric`` | ``loss`` (δ of the smoothed training loss, the paper's) or ``val_loss`` (of the validation loss) |
| ``delta_W4A4``, ``delta_W4A16``, ``delta_W16A4`` | δ of the W4A4 run, the weight-only and the activation-only run |
| ``sum_components`` | δ_W4A16 + δ_W16A4 |
| ``ratio_R`` | δ_W16A4 / δ_W4A16 (> 1: the activation error dominates; paper 1.2–1.67) |
| ``delta_W4A4_fc2a8``, ``delta_W16A4_fc2a8`` | δ of the same with the FC2 input at 8 bit |
| ``ratio_R_fc2a8`` | δ_W16A4-fc2a8 / δ_W4A16 (paper 0.85–1.10) |

A δ whose run is missing or diverged is NaN, and so is everything computed from it.

``decomposition_fit.parquet`` (:func:`decomposition_fit`), one row per metric: ``metric``, ``k`` (slope of
δ_W4A4 ≈ k · (δ_W4A16 + δ_W16A4) through the origin; paper 0.906), ``r2`` (uncentred R², 1 − Σ(y − kx)² / Σy²),
``n`` (rows used), ``n_dropped`` (rows with a NaN δ).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from qatlaw import paper
from qatlaw.errors import QatlawError
from qatlaw.io import write_parquet
from qatlaw.runtable import METRICS, delta_table, read_runs

log = logging.getLogger("qatlaw.decompose")

DECOMP_KEY = ["size", "tokens_requested", "seed", "group"]
COMPONENTS = {  # decomposition column -> precision of its runs
    "delta_W4A4": "W4A4", "delta_W4A16": "W4A16", "delta_W16A4": "W16A4",
    "delta_W4A4_fc2a8": "W4A4-fc2a8", "delta_W16A4_fc2a8": "W16A4-fc2a8",
}
DECOMPOSITION_COLUMNS = (
    "size", "N", "D", "tokens_requested", "D_over_N", "seed", "group", "G", "metric",
    "delta_W4A4", "delta_W4A16", "delta_W16A4", "sum_components", "ratio_R",
    "delta_W4A4_fc2a8", "delta_W16A4_fc2a8", "ratio_R_fc2a8",
)
FIT_COLUMNS = ("metric", "k", "r2", "n", "n_dropped")


class DecomposeError(QatlawError):
    """The δ table holds no runs of the precisions to decompose."""


def decomposition(deltas: pd.DataFrame) -> pd.DataFrame:
    """δ_W4A4 next to its weight part δ_W4A16 and activation part δ_W16A4, per cell and group.

    One row per (size, tokens_requested, seed, group) holding any of the five precisions of ``COMPONENTS``,
    and per metric (``loss``: δ of the smoothed training loss, ``val_loss``: of the validation loss). A δ whose
    run is missing or diverged is NaN, and so is everything computed from it. ``sum_components`` =
    δ_W4A16 + δ_W16A4; ``ratio_R`` = δ_W16A4 / δ_W4A16 (> 1: activation error dominates); ``ratio_R_fc2a8`` =
    δ_W16A4-fc2a8 / δ_W4A16. ``N``, ``G`` are the cell's; ``D`` the most tokens any of its runs trained.
    """
    runs = deltas[deltas["precision"].isin(COMPONENTS.values())]
    if runs.empty:
        raise DecomposeError(f"no runs of precision {', '.join(COMPONENTS.values())} to decompose")
    delta_metric = {delta: metric for metric, (_, delta) in METRICS.items()}
    long = runs.melt(id_vars=DECOMP_KEY + ["precision"], value_vars=list(delta_metric),
                     var_name="metric", value_name="value")
    long["metric"] = long["metric"].map(delta_metric)
    wide = long.pivot(index=DECOMP_KEY + ["metric"], columns="precision", values="value")
    wide = wide.reindex(columns=list(COMPONENTS.values()))
    wide.columns = list(COMPONENTS)
    facts = runs.groupby(DECOMP_KEY)[["N", "D", "G"]].max()
    out = wide.reset_index().join(facts, on=DECOMP_KEY)
    out = out.assign(
        D_over_N=out["D"] / out["N"],
        sum_components=out["delta_W4A16"] + out["delta_W16A4"],
        ratio_R=out["delta_W16A4"] / out["delta_W4A16"],
        ratio_R_fc2a8=out["delta_W16A4_fc2a8"] / out["delta_W4A16"],
    )
    return out.loc[:, list(DECOMPOSITION_COLUMNS)].sort_values(
        ["metric", "N", "size", "tokens_requested", "seed", "G"], ignore_index=True)


def decomposition_fit(decomp: pd.DataFrame) -> pd.DataFrame:
    """Least squares through the origin, δ_W4A4 ≈ k · (δ_W4A16 + δ_W16A4), one row per metric.

    ``r2`` is the uncentred R² of a fit through the origin, 1 − Σ(y − kx)² / Σy² (the share of Σy² the line
    explains; the centred R² is not meaningful without an intercept). ``n`` rows are used, ``n_dropped`` had a
    NaN δ. The paper's k is ``decomposition_k`` of :func:`qatlaw.paper.constants` (0.906).
    """
    rows = []
    for metric, part in decomp.groupby("metric", sort=True):
        ok = part[["delta_W4A4", "sum_components"]].notna().all(axis=1)
        x, y = part.loc[ok, "sum_components"].to_numpy(float), part.loc[ok, "delta_W4A4"].to_numpy(float)
        sxx, syy = float((x * x).sum()), float((y * y).sum())
        k = float((x * y).sum()) / sxx if sxx > 0 else float("nan")
        r2 = 1 - float(((y - k * x) ** 2).sum()) / syy if sxx > 0 and syy > 0 else float("nan")
        if not ok.all():
            log.warning("decomposition fit (%s): %d of %d rows dropped for a missing δ", metric, int((~ok).sum()),
                        len(ok))
        rows.append((metric, k, r2, int(ok.sum()), int((~ok).sum())))
    return pd.DataFrame(rows, columns=list(FIT_COLUMNS))


def run_decompose(runs_path: str | Path, decomposition_path: str | Path, fit_path: str | Path) -> pd.DataFrame:
    """Read ``runs.parquet``, write the decomposition table and its fit (schemas in the module docstring)."""
    decomp = decomposition(delta_table(read_runs(runs_path)))
    fit = decomposition_fit(decomp)
    write_parquet(decomp, decomposition_path)
    write_parquet(fit, fit_path)
    for row in fit.itertuples():
        log.info("δ_W4A4 ≈ %.3f · (δ_W4A16 + δ_W16A4) on %s (uncentred R² %.3f, n %d; paper k %.3f)",
                 row.k, row.metric, row.r2, row.n, paper.constants()["decomposition_k"])
    return fit
