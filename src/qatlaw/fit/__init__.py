"""Fit the scaling laws: Chinchilla on the BF16 runs, the unified QAT law per precision, and the baselines.

Every law is fitted to one metric (``run_fits(metric=...)``, config ``fit.metric``): ``val_loss``, the
validation loss and its δ (the default), or ``loss``, the smoothed training loss (the paper's). The laws and
their named constants are in :mod:`qatlaw.fit.forms`, how they are fitted in :mod:`qatlaw.fit.solver`, which
runs enter and the bootstrap behind the intervals in :mod:`qatlaw.fit.runs`. :func:`run_fits` assesses every
law and :func:`write_fits` writes its tables (``results/fit/``; their columns in ``results/README.md``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from qatlaw import config, runtable
from qatlaw.fit.forms import (
    CHINCHILLA_CONSTANTS,
    DELTA_CONSTANTS,
    EPM,
    Chinchilla,
    ChinchillaParams,
    DeltaLaw,
    DeltaParams,
    Fit,
    Law,
    design_points,
    draw_predictions,
    epm,
    epm_delta,
    fit_epm,
    one_ray,
    predict_delta,
    predict_loss,
    relative_error,
)
from qatlaw.fit.runs import BASE, BOOT_QUANTILES, MIN_BOOT_SHARE, valid_runs
from qatlaw.fit.solver import FitError
from qatlaw.io import read_parquet, write_parquet
from qatlaw.precision import BASELINE

__all__ = [
    "BOOTSTRAP_COLUMNS", "BOOT_QUANTILES", "CHINCHILLA_CONSTANTS", "COMPARISON_COLUMNS", "DELTA_CONSTANTS", "EPM",
    "MIN_BOOT_SHARE", "PARAMS_COLUMNS", "PREDICTIONS_COLUMNS", "Chinchilla", "ChinchillaParams", "DeltaLaw",
    "DeltaParams", "Fit", "FitError", "FitTables", "design_points", "draw_predictions", "epm", "epm_delta",
    "fit_epm", "one_ray", "predict_delta", "predict_loss", "read_params", "relative_error", "run_fits",
    "write_fits",
]

log = logging.getLogger("qatlaw.fit")

HELD_OUT = {"largest_N": "N", "largest_D": "D"}
PARAMS_COLUMNS = ("law", "precision", "constant", "value", "ci_low", "ci_high", "n_runs", "n_dropped", "objective")
PREDICTIONS_COLUMNS = ("run_id", "law", "precision", "N", "D", "G", "observed", "predicted", "residual",
                       "rel_error", "held_out")
BOOTSTRAP_COLUMNS = ("law", "precision", "draw", "constant", "value")
COMPARISON_COLUMNS = ("law", "precision", "rel_error", "n_runs", "heldout_largest_N_rel_error",
                      "heldout_largest_D_rel_error")


class FitTables(NamedTuple):
    """The outputs of :func:`run_fits` (their columns in ``results/README.md``)."""

    params: pd.DataFrame
    predictions: pd.DataFrame
    comparison: pd.DataFrame
    bootstrap: pd.DataFrame


@dataclass
class _Assessment:
    """What one law of one precision adds to each output table."""

    params: list[dict]
    predictions: list[pd.DataFrame]
    comparison: dict
    bootstrap: pd.DataFrame


def _prediction_rows(law: Law, precision: str, fit: Fit, runs: pd.DataFrame, held_out: str) -> pd.DataFrame:
    observed = runs[law.columns[-1]].to_numpy(float)
    predicted = np.asarray(law.predict(fit, runs), dtype=float)
    return pd.DataFrame({
        "run_id": runs["run_id"].to_numpy(), "law": law.name, "precision": precision,
        "N": runs["N"].to_numpy(), "D": runs["D"].to_numpy(), "G": runs["G"].to_numpy(),
        "observed": observed, "predicted": predicted, "residual": predicted - observed,
        "rel_error": np.where(observed > 0, np.abs(predicted - observed) / np.where(observed > 0, observed, 1.0),
                              np.nan), "held_out": held_out,
    })


def _assess(law: Law, precision: str, runs: pd.DataFrame, n_boot: int, seed: int) -> _Assessment:
    """One law of one precision: fitted in-sample (with bootstrap), then refitted without the runs of the
    largest N, and without those of the largest D, to predict them. A law that cannot be fitted or is not
    identified leaves NaN rows and a warning."""
    ok = valid_runs(runs, law.columns)[1]
    comparison = {"law": law.name, "precision": precision, "rel_error": np.nan, "n_runs": int(ok.sum()),
                  "heldout_largest_N_rel_error": np.nan, "heldout_largest_D_rel_error": np.nan}
    try:
        fit = law.fit(runs, n_boot, seed)
    except FitError as exc:
        log.warning("%s law for %s not fitted: %s", law.name, precision, exc)
        names = law.constant_names(runs)
        fit = Fit(dict.fromkeys(names, np.nan), np.nan, int(ok.sum()), int((~ok).sum()))
        return _Assessment(_param_rows(law.name, precision, fit), [], comparison, _draw_rows(law.name, precision, fit))
    valid = runs[ok]
    preds = [_prediction_rows(law, precision, fit, valid, "none")]
    comparison["rel_error"] = float(preds[0]["rel_error"].mean())
    for held_out, col in HELD_OUT.items():
        values = pd.to_numeric(valid[col]).astype(float)
        largest = values.max()
        test = values == largest
        try:
            refit = law.fit(valid[~test], 0, seed, (col, largest))
        except FitError as exc:
            log.warning("%s law for %s: no %s prediction: %s", law.name, precision, held_out, exc)
            continue
        rows = _prediction_rows(law, precision, refit, valid[test], held_out)
        preds.append(rows)
        comparison[f"heldout_{held_out}_rel_error"] = float(rows["rel_error"].mean())
    return _Assessment(_param_rows(law.name, precision, fit), preds, comparison, _draw_rows(law.name, precision, fit))


def _param_rows(law: str, precision: str, fit: Fit) -> list[dict]:
    ci = fit.ci
    return [{"law": law, "precision": precision, "constant": name, "value": value,
             "ci_low": ci.get(name, (np.nan, np.nan))[0], "ci_high": ci.get(name, (np.nan, np.nan))[1],
             "n_runs": fit.n_runs, "n_dropped": fit.n_dropped, "objective": fit.objective}
            for name, value in fit.constants.items()]


def _draw_rows(law: str, precision: str, fit: Fit) -> pd.DataFrame:
    """The bootstrap refits of a law, one row per (draw, constant)."""
    if fit.draws.empty:
        return pd.DataFrame(columns=list(BOOTSTRAP_COLUMNS))
    long = fit.draws.reset_index(names="draw").melt(id_vars="draw", var_name="constant", value_name="value")
    return long.dropna(subset=["value"]).assign(law=law, precision=precision).loc[:, list(BOOTSTRAP_COLUMNS)]


def run_fits(deltas: pd.DataFrame, runs: pd.DataFrame, *, n_boot: int = 200, seed: int = 0,
             metric: str = config.schema_default("fit", "metric"),
             tie: bool = config.schema_default("fit", "tie")) -> FitTables:
    """Every law of the study: Chinchilla on the non-diverged BF16 runs of ``runs``, and for every precision of
    ``deltas`` (:func:`qatlaw.runtable.delta_table`) the unified, no_D and EPM laws, all on ``metric``: ``val_loss``
    (the validation loss and its δ, ``delta_val``) or ``loss`` (the smoothed training loss and ``delta``).
    Chinchilla's α and β are tied unless not ``tie``. Returns the tables of ``results/README.md`` (``fit/``); a
    law that cannot be fitted leaves NaN rows and a warning."""
    try:
        loss_col, delta_col = runtable.metric_columns(metric)
    except runtable.RunTableError as exc:
        raise FitError(f"run_fits: {exc}") from None
    for table, what, value in ((runs, "run table", loss_col), (deltas, "delta table", delta_col)):
        missing = [c for c in ("run_id", "precision", "N", "D", "G", value) if c not in table.columns]
        if missing:
            raise FitError(f"run_fits: {what} lacks columns {', '.join(missing)}")
    numerics = sorted(runs["numerics"].dropna().unique()) if "numerics" in runs.columns else []
    if len(numerics) > 1:
        raise FitError(f"run_fits: the run table mixes numerics {', '.join(numerics)}: a law is fitted to runs of one "
                       "numerics (training.numerics), so fit each apart")
    runs = runs.assign(loss=runs[loss_col])
    deltas = deltas.assign(delta=deltas[delta_col], **{BASE: deltas[f"baseline_{loss_col}"]})
    bf16 = runs[runs["precision"] == BASELINE]
    chinchilla = Chinchilla(tie=tie)
    parts = [_assess(chinchilla, BASELINE, bf16, n_boot, seed)]
    for precision in sorted(p for p in deltas["precision"].dropna().unique() if p != BASELINE):
        sub = deltas[deltas["precision"] == precision]
        for law in (DeltaLaw(use_D=True), DeltaLaw(use_D=False), EPM(bf16, chinchilla)):
            parts.append(_assess(law, precision, sub, n_boot, seed))
    params = pd.DataFrame([row for p in parts for row in p.params], columns=list(PARAMS_COLUMNS))
    preds = [frame for p in parts for frame in p.predictions]
    predictions = (pd.concat(preds, ignore_index=True) if preds
                   else pd.DataFrame(columns=list(PREDICTIONS_COLUMNS)))
    predictions["G"] = pd.to_numeric(predictions["G"]).astype("Int64")
    comparison = pd.DataFrame([p.comparison for p in parts], columns=list(COMPARISON_COLUMNS))
    draws = [p.bootstrap for p in parts if not p.bootstrap.empty]
    bootstrap = pd.concat(draws, ignore_index=True) if draws else pd.DataFrame(columns=list(BOOTSTRAP_COLUMNS))
    return FitTables(params, predictions.loc[:, list(PREDICTIONS_COLUMNS)], comparison,
                     bootstrap.astype({"draw": int, "value": float}))


def write_fits(tables: FitTables, out_dir: str | Path) -> None:
    """Write params, predictions, comparison and bootstrap as ``<out_dir>/<name>.parquet``, each atomically."""
    for name, table in tables._asdict().items():
        write_parquet(table, Path(out_dir) / f"{name}.parquet")


def read_params(path: str | Path) -> pd.DataFrame:
    """A params table (``params.parquet``), checked: FitError naming the file and ``PARAMS_COLUMNS`` when it is
    missing, unreadable (e.g. truncated) or lacks a column."""
    return read_parquet(path, PARAMS_COLUMNS, "params table", kinds={"value": "number"}, error=FitError)
