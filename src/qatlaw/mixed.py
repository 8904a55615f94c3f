"""Mixed precision: how much raising one tensor's bits (e.g. the FC2 input to 8 bit) changes δ (paper §4.4, Fig. 9b).

Every run whose precision has per-layer overrides (``W4A4-fc2a8``, ``W16A4-fc2a8``, ``W4A4-qkva8``,
``W4A4-fc2w8``, ...) is compared with the run of its base precision (the name before the first ``-``) in the
same (size, tokens_requested, seed, group).

``mixed.parquet`` (:func:`mixed_precision`), one row per override run and metric:

| column | meaning |
|---|---|
| ``run_id``, ``size``, ``N``, ``D``, ``tokens_requested``, ``seed``, ``group``, ``G`` | the override run, as in ``runs.parquet`` |
| ``metric`` | ``loss`` (δ of the smoothed training loss, the paper's) or ``val_loss`` |
| ``precision``, ``base_precision`` | e.g. ``W4A4-fc2a8`` and ``W4A4`` |
| ``override`` | the overrides, e.g. ``fc2a8`` or ``qkva8-fc2a8`` |
| ``n_overrides`` | how many tensors differ from the base |
| ``layer``, ``tensor``, ``bits`` | the one overridden tensor: layer type, ``weight``/``activation``, its bits (null when several) |
| ``delta_base``, ``delta_variant`` | δ of the base run and of the override run (NaN: missing or diverged) |
| ``change`` | δ_variant − δ_base |
| ``relative_change`` | (δ_variant − δ_base) / δ_base, NaN unless δ_base > 0; the paper's FC2-input-8-bit result is −0.205 (G = 32) and −0.429 (G = 256) |

``mixed_ranking.parquet`` (:func:`ranking`), one row per (metric, base precision, override), best first:
``metric``, ``base_precision``, ``override``, ``layer``, ``tensor``, ``bits``, ``n`` (rows with a finite
change), ``mean_change``, ``n_relative`` (rows with a relative change), ``mean_relative_change``, ``rank``
(1 = most negative mean relative change within the metric and base precision).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from qatlaw import precision as prec
from qatlaw.decompose import DECOMP_KEY
from qatlaw.errors import QatlawError
from qatlaw.io import write_parquet
from qatlaw.runtable import METRICS, delta_table, read_runs

log = logging.getLogger("qatlaw.mixed")

TENSOR_NAMES = {"weight": "weight", "act": "activation"}  # LayerQuant field -> name in the tables
MIXED_COLUMNS = (
    "run_id", "size", "N", "D", "tokens_requested", "seed", "group", "G", "metric", "precision", "base_precision",
    "override", "n_overrides", "layer", "tensor", "bits", "delta_base", "delta_variant", "change",
    "relative_change",
)
RANKING_COLUMNS = ("metric", "base_precision", "override", "layer", "tensor", "bits", "n", "mean_change",
                   "n_relative", "mean_relative_change", "rank")


class MixedError(QatlawError):
    """The run table cannot give mixed-precision comparisons."""


def overrides(precision: str) -> tuple[str, list[tuple[str, str, int]]]:
    """Base precision of a precision string and its overridden tensors as (layer, tensor, bits)."""
    base = precision.split("-")[0]
    try:
        variant, reference = prec.parse(precision), prec.parse(base)
    except ValueError as exc:
        raise MixedError(str(exc)) from None
    changed = [(layer, name, getattr(variant.layers[layer], field).bits)
               for layer in prec.LAYER_TYPES for field, name in TENSOR_NAMES.items()
               if getattr(variant.layers[layer], field) != getattr(reference.layers[layer], field)]
    return base, changed


def mixed_precision(deltas: pd.DataFrame) -> pd.DataFrame:
    """Compare every override run of ``deltas`` (:func:`qatlaw.runtable.delta_table`) with its base run."""
    has_override = deltas["precision"].map(lambda name: prec.parse(name).has_overrides).astype(bool)
    variants = deltas[has_override]
    if variants.empty:
        raise MixedError("no run has a precision with per-layer overrides (e.g. W4A4-fc2a8)")
    base_runs = deltas[~has_override].set_index(DECOMP_KEY + ["precision"])
    rows = []
    for run in variants.itertuples(index=False):
        base, changed = overrides(run.precision)
        key = (run.size, run.tokens_requested, run.seed, run.group, base)
        found = key in base_runs.index
        if not found:
            log.warning("%s: no %s run in the same cell and group", run.run_id, base)
        single = changed[0] if len(changed) == 1 else (None, None, None)
        for metric, (_, column) in METRICS.items():
            delta_base = base_runs.loc[key, column] if found else float("nan")
            rows.append((run.run_id, run.size, run.N, run.D, run.tokens_requested, run.seed, run.group, run.G,
                         metric, run.precision, base, run.precision[len(base) + 1:], len(changed), *single,
                         delta_base, getattr(run, column)))
    out = pd.DataFrame(rows, columns=list(MIXED_COLUMNS[:-2])).astype({"bits": "Int64", "G": "Int64"})
    out["change"] = out["delta_variant"] - out["delta_base"]
    out["relative_change"] = (out["change"] / out["delta_base"]).where(out["delta_base"] > 0)
    return out.sort_values(["metric", "base_precision", "override", "N", "tokens_requested", "seed", "G"],
                           ignore_index=True)


def ranking(mixed: pd.DataFrame) -> pd.DataFrame:
    """Mean (relative) change of δ per override over the cells and groups, best (most negative) first."""
    finite = mixed[np.isfinite(mixed["change"])]
    table = (finite.groupby(["metric", "base_precision", "override"], sort=False, dropna=False)
             .agg(layer=("layer", "first"), tensor=("tensor", "first"), bits=("bits", "first"),
                  n=("change", "size"), mean_change=("change", "mean"),
                  n_relative=("relative_change", "count"), mean_relative_change=("relative_change", "mean"))
             .reset_index()
             .sort_values(["metric", "base_precision", "mean_relative_change"], ignore_index=True))
    table["rank"] = table.groupby(["metric", "base_precision"]).cumcount() + 1
    return table.loc[:, list(RANKING_COLUMNS)]


def run_mixed(runs_path: str | Path, out_path: str | Path, ranking_path: str | Path) -> pd.DataFrame:
    """Read ``runs.parquet``; write the per-run comparison and the ranking (schemas in the module docstring)."""
    mixed = mixed_precision(delta_table(read_runs(runs_path)))
    ranked = ranking(mixed)
    write_parquet(mixed, out_path)
    write_parquet(ranked, ranking_path)
    for row in ranked.itertuples():
        log.info("%s %s-%s: mean relative change of δ %+.1f%% over %d cells", row.metric, row.base_precision,
                 row.override, 100 * row.mean_relative_change, row.n_relative)
    return ranked
