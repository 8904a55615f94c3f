"""Fitted laws to use without training: which precision, which group size, FC2 at 8 bit or not, for a model of N
parameters trained on D tokens.

A law is a params table (the schema of ``results/fit/params.parquet``: ``unified`` rows per precision and a
``chinchilla`` row), where it came from, the (N, D, G) range it was fitted on, and its bootstrap draws when it
has them. Shipped with the package (:data:`SHIPPED`):

- ``paper``: Table 1 of the paper and its Chinchilla constants (``laws/paper.yaml``);
- ``laptop``: this project's ``reference/laptop`` fit (``laws/laptop/``: params, bootstrap draws, predictions);
- ``quartet``: this project's ``reference/quartet`` fit of Quartet's published runs (``laws/quartet/``), MXFP4 at
  G = 32 only (its γG is not identified, so it predicts at G = 32 only). Its labels stand for the precision
  ``W4A4-mxfp4-had32`` (:data:`LABEL_PRECISIONS`), so ``plan`` counts their memory and ranks them beside INT4.

Any folder or ``params.parquet`` the workflow wrote works too: the draws are read from ``bootstrap.parquet``
beside it and the range from ``predictions.parquet`` (the runs each law was fitted on).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from qatlaw import fit, paper
from qatlaw import precision as prec
from qatlaw.io import read_parquet

log = logging.getLogger("qatlaw.laws")

LAW_DIR = Path(__file__).with_name("laws")
SHIPPED = {"paper": paper.PATH, "laptop": LAW_DIR / "laptop", "quartet": LAW_DIR / "quartet"}
SOURCES = {"laptop": "this project's reference/laptop fit (config/laptop.yaml, 70 CPU runs)",
           "quartet": "this project's reference/quartet fit of Quartet's published runs (30M-200M, MXFP4 G 32; "
                      "config/quartet.yaml)"}
# The precision a shipped law's run-table label stands for: Quartet's runs quantize the weights and activations of
# every linear layer to MXFP4 after a Hadamard rotation in blocks of 32 (-fwd: the forward pass; -full: also the
# backward's operands)
LABEL_PRECISIONS = {"quartet": {"MXFP4-fwd": "W4A4-mxfp4-had32", "MXFP4-full": "W4A4-mxfp4-had32"}}
DEFAULT = "paper"
EXTRAPOLATION = 10.0  # warn when N or D lies more than this factor outside the fitted range
# Share of a Llama-3-style block's linear weights per layer type (ffn = 8/3 hidden, kv heads = heads / 4):
# qkv 1.5 h², o h², fc1 2 · 8/3 h², fc2 8/3 h²
LAYER_SHARES = {"qkv": 1.5, "o": 1.0, "fc1": 16 / 3, "fc2": 8 / 3}
PREDICTION_COLUMNS = ("precision", "N", "D", "G", "delta", "delta_low", "delta_high", "bf16_loss", "qat_loss",
                      "qat_low", "qat_high")


class LawError(fit.FitError):
    """A law cannot be loaded or does not cover a request."""


@dataclass(frozen=True)
class Law:
    """A fitted law, its source, fitted range and bootstrap draws (empty without them)."""

    name: str
    source: str
    params: pd.DataFrame
    draws: pd.DataFrame
    ranges: dict[str, tuple[float, float]]

    @property
    def precisions(self) -> list[str]:
        """Precisions with a fitted unified law (γG may be NaN: a law fitted at one G)."""
        unified = self.params[(self.params["law"] == "unified") & (self.params["constant"] != "gamma_G")]
        ok = unified.groupby("precision")["value"].apply(lambda v: bool(np.isfinite(v.astype(float)).all()))
        return sorted(ok[ok].index, key=lambda p: (len(p), p))

    def one_g(self, precision: str) -> float | None:
        """The one G a precision's law was fitted at (its γG not identified), or None."""
        rows = self.params[(self.params["law"] == "unified") & (self.params["precision"] == precision)
                           & (self.params["constant"] == "gamma_G")]
        if rows.empty or np.isfinite(float(rows["value"].iloc[0])):
            return None
        return self.ranges.get("G", (math.nan, math.nan))[0]


def _paper() -> Law:
    spec = paper.constants()
    rows = [{"law": "chinchilla", "precision": prec.BASELINE, "constant": c, "value": float(v)}
            for c, v in spec["chinchilla"].items()]
    rows += [{"law": "unified", "precision": p, "constant": c, "value": float(v)}
             for p, consts in spec["unified"].items() for c, v in consts.items()]
    params = pd.DataFrame(rows).reindex(columns=list(fit.PARAMS_COLUMNS))
    ranges = {k: (float(lo), float(hi)) for k, (lo, hi) in spec["range"].items()}
    return Law("paper", spec["source"], params, pd.DataFrame(columns=list(fit.BOOTSTRAP_COLUMNS)), ranges)


def _fitted(name: str, path: Path, source: str) -> Law:
    folder = path if path.is_dir() else path.parent
    params = fit.read_params(folder / "params.parquet" if path.is_dir() else path)
    boot = folder / "bootstrap.parquet"
    draws = read_parquet(boot, fit.BOOTSTRAP_COLUMNS, "bootstrap table", error=LawError) if boot.is_file() else \
        pd.DataFrame(columns=list(fit.BOOTSTRAP_COLUMNS))
    ranges: dict[str, tuple[float, float]] = {}
    preds_path = folder / "predictions.parquet"
    if preds_path.is_file():
        preds = read_parquet(preds_path, fit.PREDICTIONS_COLUMNS, "predictions table", error=LawError)
        used = preds[preds["held_out"] == "none"]
        if (used["law"] == "unified").any():  # the δ laws' range: BF16-only runs (Chinchilla) may reach further
            used = used[used["law"] == "unified"]
        for col in ("N", "D", "G"):
            values = pd.to_numeric(used[col], errors="coerce").dropna().astype(float)
            if len(values):
                ranges[col] = (float(values.min()), float(values.max()))
    return Law(name, source, params, draws, ranges)


def load(spec: str = DEFAULT) -> Law:
    """A shipped law by name (``paper``, ``laptop``) or the law of a params.parquet (or its folder)."""
    if spec == "paper":
        return _paper()
    if spec in SHIPPED:
        return _fitted(spec, SHIPPED[spec], SOURCES[spec])
    path = Path(spec)
    if not path.exists():
        raise LawError(f"--law {spec}: neither a shipped law ({', '.join(SHIPPED)}) nor an existing file or folder")
    law = _fitted(path.stem if path.is_file() else path.name, path, str(path))
    if not law.precisions:
        raise LawError(f"--law {spec}: no precision has a fitted unified law there (every one was left unfitted, "
                       f"too few runs); give a fit that has one, or a shipped law ({', '.join(SHIPPED)})")
    return law


def available() -> list[Law]:
    """Every shipped law."""
    return [load(name) for name in SHIPPED]


def _check(law: Law, precisions: list[str]) -> list[str]:
    names = []
    for p in precisions:
        try:
            name = p if p in law.precisions else prec.canonical(p)  # a run table's own label, or a precision string
        except ValueError as exc:
            raise LawError(f"--precision {p}: {exc}") from None
        if name not in law.precisions:
            raise LawError(f"law {law.name} has no fitted unified law for precision {name} "
                           f"(it has: {', '.join(law.precisions)})")
        names.append(name)
    return names


def extrapolation_warnings(law: Law, N: np.ndarray, D: np.ndarray) -> list[str]:
    """One line per quantity (N, D) that lies more than EXTRAPOLATION× outside the law's fitted range."""
    lines = []
    for name, values in (("N", N), ("D", D)):
        if name not in law.ranges:
            continue
        lo, hi = law.ranges[name]
        far = [v for v in np.atleast_1d(values) if v > hi * EXTRAPOLATION or v < lo / EXTRAPOLATION]
        if far:
            lines.append(f"warning: {name} = {', '.join(f'{v:.3g}' for v in far)} lies more than {EXTRAPOLATION:g}x "
                         f"outside the range law {law.name} was fitted on ({lo:.3g} to {hi:.3g}): an extrapolation")
    return lines


def _law_constants(params: pd.DataFrame, law: str, precision: str) -> dict[str, float]:
    """The fitted constants of one law from a params table."""
    missing = [c for c in ("law", "precision", "constant", "value") if c not in params.columns]
    if missing:
        raise LawError(f"params table lacks columns {', '.join(missing)}")
    rows = params[(params["law"] == law) & (params["precision"] == precision)]
    if rows.empty:
        have = sorted(params.loc[params["law"] == law, "precision"].unique())
        raise LawError(f"params table has no {law} law for precision {precision} (it has: {', '.join(have)})")
    values = dict(zip(rows["constant"], rows["value"].astype(float)))
    if not np.isfinite([v for c, v in values.items() if c != "gamma_G"]).all():
        raise LawError(f"params table: the {law} law for {precision} was not fitted "
                       "(too few valid runs, or not identified)")
    return values


def predict_from_params(params: pd.DataFrame, N: ArrayLike, D: ArrayLike, G: ArrayLike, precision: str) -> dict:
    """Predictions of a params table for a precision: ``delta`` (unified law), ``bf16_loss`` (Chinchilla),
    ``qat_loss`` = bf16_loss + delta and ``epm``; the last three are NaN without a Chinchilla fit."""
    delta_params = _law_constants(params, "unified", precision)
    delta = fit.predict_delta(delta_params, N, D, G)
    try:
        chin = _law_constants(params, "chinchilla", prec.BASELINE)
    except fit.FitError as exc:
        log.warning("no BF16 loss or EPM prediction: %s", exc)
        nan = np.full(np.shape(delta), np.nan)
        bf16, eff = nan, nan
    else:
        bf16, eff = fit.predict_loss(chin, N, D), fit.epm(N, D, G, delta_params, chin)
    out = {"delta": delta, "bf16_loss": bf16, "qat_loss": bf16 + delta, "epm": eff}
    return {k: float(v) if np.ndim(v) == 0 else np.asarray(v) for k, v in out.items()}


def predict(law: Law, N: list[float], D: list[float], G: list[float], precisions: list[str]) -> pd.DataFrame:
    """δ, the BF16 loss and the QAT loss for every precision × N × D × G, with 90% intervals from the law's
    bootstrap draws where it has them (NaN otherwise). Columns: ``PREDICTION_COLUMNS``."""
    names = _check(law, precisions)
    for name in names:
        fixed = law.one_g(name)
        if fixed is not None and any(g != fixed for g in G):
            raise LawError(f"law {law.name} was fitted at one G for {name} ({fixed:g}): gamma_G is not identified, "
                           f"so it predicts at G = {fixed:g} only")
    grid = pd.MultiIndex.from_product([names, N, D, G], names=["precision", "N", "D", "G"]).to_frame(index=False)
    out = []
    for name, part in grid.groupby("precision", sort=False):
        n, d, g = (part[c].to_numpy(float) for c in ("N", "D", "G"))
        point = predict_from_params(law.params, n, d, g, name)
        deltas = fit.draw_predictions(law.draws, "unified", name, n, d, g)
        losses = fit.draw_predictions(law.draws, "chinchilla", prec.BASELINE, n, d)
        nan = np.full(len(part), np.nan)
        low, high = np.quantile(deltas, fit.BOOT_QUANTILES, axis=0) if deltas is not None else (nan, nan)
        if deltas is not None and losses is not None:
            k = min(len(deltas), len(losses))  # independent resamples: draw i of one with draw i of the other
            qlow, qhigh = np.quantile(deltas[:k] + losses[:k], fit.BOOT_QUANTILES, axis=0)
        else:
            qlow, qhigh = nan, nan
        out.append(part.assign(delta=point["delta"], delta_low=low, delta_high=high, bf16_loss=point["bf16_loss"],
                               qat_loss=point["qat_loss"], qat_low=qlow, qat_high=qhigh))
    return pd.concat(out, ignore_index=True).loc[:, list(PREDICTION_COLUMNS)]


def weight_memory_gb(precision: str, N: float, G: float) -> float:
    """Weight memory of N non-embedding parameters: each layer type's share of N (``LAYER_SHARES``) at its weight
    bits, plus one scale per group of G quantized weights (16 bits; 8 for MXFP4's and NVFP4's 4-bit blocks,
    :data:`qatlaw.precision.SCALE_BITS`)."""
    p = prec.parse(precision)
    total = sum(LAYER_SHARES.values())
    bits = 0.0
    for layer, share in LAYER_SHARES.items():
        w = p.layers[layer].weight.bits
        bits += share / total * (w + (p.scale_bits(w) / G if w < 16 else 0.0))
    return N * bits / 8 / 1e9


def plan_groups(law: Law) -> list[int]:
    """Group sizes an option may use: the powers of two within the law's fitted G range (32-256 if unknown)."""
    lo, hi = law.ranges.get("G", (32, 256))
    return [2**e for e in range(math.ceil(math.log2(lo)), math.floor(math.log2(hi)) + 1)]


def precision_of(law: Law, name: str) -> str:
    """The precision string a law's precision stands for: itself, or what a shipped law's label means."""
    if prec.is_precision(name):
        return name
    mapped = LABEL_PRECISIONS.get(law.name, {}).get(name)
    if mapped is None:
        raise LawError(f"law {law.name}: {name} is a run table's label, not a precision string: plan cannot count "
                       "its weight memory or bits; use predict")
    return mapped


def plan(law: Law | list[Law], N: float, D: float, memory_gb: float | None = None) -> pd.DataFrame:
    """Every precision × G option of the law (or laws) ranked by predicted QAT loss (best first), with the
    precision string it stands for (``weights``), its weight memory, whether it fits ``memory_gb`` and the best
    option that does (``best``). With several laws each option's δ is its own law's and the BF16 loss the first
    law's: a law fitted on other data (Quartet's) is set beside the paper's INT4 by its δ."""
    group = law if isinstance(law, list) else [law]
    try:
        base = float(fit.predict_loss(_law_constants(group[0].params, "chinchilla", prec.BASELINE), N, D))
    except fit.FitError:
        base = math.nan
    rows = []
    for one in group:
        weights = {name: precision_of(one, name) for name in one.precisions}
        for name in one.precisions:
            for G in plan_groups(one):
                p = predict(one, [N], [D], [G], [name]).iloc[0]
                rows.append({"law": one.name, "precision": name, "weights": weights[name], "G": G,
                             "delta": p["delta"], "qat_loss": base + p["delta"],
                             "weight_gb": weight_memory_gb(weights[name], N, G)})
    table = pd.DataFrame(rows).sort_values(["qat_loss", "delta", "weight_gb"], ignore_index=True, kind="stable")
    table["fits"] = True if memory_gb is None else table["weight_gb"] <= memory_gb
    table["rank"] = np.arange(1, len(table) + 1)
    table["best"] = False
    fitting = table.index[table["fits"]]
    if len(fitting):
        table.loc[fitting[0], "best"] = True
    return table
