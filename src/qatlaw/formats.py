"""The 4-bit formats against INT4: δ of each MXFP4 / NVFP4 precision over δ of INT4 AbsMax W4A4 in the same cell
and seed (both against the one BF16 baseline they share), per cell and pooled, with intervals, beside the ratio the
published runs show at 30–200M.

Per cell (size, D) the ratio is mean δ_format / mean δ_INT4 over the seeds that have both, with the range of the
per-seed ratios (two seeds: that is all the spread a cell shows). Pooled over cells: the ratio of the means over
every (cell, seed) pair, with a 90% bootstrap interval over resampled cells and the seeds inside them (the
findings' resampling). INT4 is ``W4A4`` in the ``int`` format at G 32, or at the format's own block size where the
grid has it (NVFP4's 16).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from qatlaw import fit, resample, runtable
from qatlaw import precision as prec

INT4 = "W4A4"
INT4_G = 32
CELL = ["size", "tokens_requested"]
N_BOOT = 2000  # as qatlaw.findings resamples (it imports this module)
SEED = 0
# The published ratio, from this project's reference/quartet study (FINDINGS.md, "Beside the paper's INT4 law"):
# Quartet's forward-only MXFP4 QAT (QuEST: Hadamard rotation in blocks of 32, RMS clipping), 21 runs at 30–200M,
# δ over the paper's INT4 W4A4 law at G 32: median 1.35, min 1.13, max 1.44. Quartet II's NVFP4 runs are not in this
# project's sources.
PUBLISHED = {"W4A4-mxfp4-had32": (1.35, 1.13, 1.44)}
PUBLISHED_SOURCE = ("Quartet's MXFP4 (forward, Hadamard 32) at 30–200M: δ / the paper's INT4 law at G 32, median "
                    "[min, max] of 21 runs (reference/quartet)")
PAIR_COLUMNS = ("precision", "size", "N", "tokens_requested", "D", "G", "seed", "delta", "int4_G", "int4_delta")


def is_format(precision: str) -> bool:
    """Whether a precision names a block-scaled format or a rotation (the precisions this comparison is about)."""
    if not prec.is_precision(precision):
        return False
    p = prec.parse(precision)
    return p.format is not None or p.rotation is not None


def pairs(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Every from-scratch run of a format beside the INT4 run of its cell and seed (``PAIR_COLUMNS``); runs without
    an INT4 partner or with a diverged side are left out (the caller counts them)."""
    _, delta_col = runtable.metric_columns(metric)
    scratch = runtable.from_scratch(runs)
    deltas = runtable.delta_table(scratch)
    # a run table from outside has no format column: its W4A4 is the grammar's, INT4
    formats = scratch.set_index("run_id")["format"] if "format" in scratch.columns else None
    deltas = deltas[~deltas["diverged"]].assign(
        delta=lambda t: t[delta_col].astype(float),
        format=lambda t: "int" if formats is None else t["run_id"].map(formats).astype(object).fillna("int"))
    is_int4 = (deltas["precision"] == INT4) & (deltas["format"] == "int")  # not W4A4 under quant.format fp4
    int4 = deltas[is_int4].assign(G=lambda t: t["group"].astype(str))
    rows = []
    for r in deltas[deltas["precision"].map(is_format)].itertuples():
        same = int4[(int4["size"] == r.size) & (int4["tokens_requested"] == r.tokens_requested)
                    & (int4["seed"] == r.seed)]
        partner = same[same["G"] == str(r.group)]
        partner = partner if len(partner) else same[same["G"] == str(INT4_G)]
        if not len(partner):
            continue
        p = partner.iloc[0]
        rows.append((r.precision, r.size, r.N, r.tokens_requested, r.D, str(r.group), r.seed, r.delta,
                     p["G"], float(p["delta"])))
    return pd.DataFrame(rows, columns=list(PAIR_COLUMNS))


def _ratio(table: pd.DataFrame, idx: np.ndarray) -> float:
    den = table["int4_delta"].to_numpy(float)[idx].mean()
    return float(table["delta"].to_numpy(float)[idx].mean() / den) if den > 0 else math.nan


def per_cell(table: pd.DataFrame) -> pd.DataFrame:
    """Per format × cell: mean δ of the format and of INT4, their ratio and the range of the per-seed ratios."""
    out = []
    for (precision, size, tokens), part in table.groupby(["precision", "size", "tokens_requested"], sort=True):
        per_seed = (part["delta"] / part["int4_delta"]).to_numpy(float)
        out.append({"precision": precision, "size": size, "N": part["N"].iloc[0], "D": part["D"].iloc[0],
                    "G": part["G"].iloc[0], "int4_G": part["int4_G"].iloc[0], "seeds": len(part),
                    "delta": part["delta"].mean(), "int4_delta": part["int4_delta"].mean(),
                    "ratio": _ratio(part, np.arange(len(part))), "seed_low": float(np.min(per_seed)),
                    "seed_high": float(np.max(per_seed))})
    return pd.DataFrame(out)


def pooled(table: pd.DataFrame) -> pd.DataFrame:
    """Per format: the ratio of means over every pair, with its 90% interval over resampled cells and seeds."""
    out = []
    for precision, part in table.groupby("precision", sort=True):
        part = part.reset_index(drop=True)
        design = resample.of_table(part, CELL, "seed")
        draws = np.array([_ratio(part, idx) for idx in design.draws(N_BOOT, SEED)])
        finite = draws[np.isfinite(draws)]
        enough = len(finite) and len(finite) >= fit.MIN_BOOT_SHARE * len(draws)
        low, high = np.quantile(finite, fit.BOOT_QUANTILES) if enough else (math.nan, math.nan)
        out.append({"precision": precision, "cells": part.groupby(CELL).ngroups, "pairs": len(part),
                    "ratio": _ratio(part, np.arange(len(part))), "low": float(low), "high": float(high)})
    return pd.DataFrame(out)


def against_one(low: float, high: float) -> str:
    """Where a ratio's interval lies against 1 (the format as costly as INT4)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "no interval"
    if low > 1:
        return "costs more than INT4"
    if high < 1:
        return "costs less than INT4"
    return "spans 1: the noise covers the difference"


def markdown(runs: pd.DataFrame, metric: str) -> str:
    """FINDINGS.md's section on the formats (empty without format runs paired with INT4)."""
    table = pairs(runs, metric)
    if not len(table):
        return ""
    total = runtable.from_scratch(runs)
    unpaired = int(total["precision"].map(is_format).sum()) - len(table)
    lines = ["## The 4-bit formats against INT4", "",
             f"δ of each format over δ of INT4 AbsMax W4A4 in the same cell and seed (both minus the BF16 baseline "
             f"they share; INT4 at the format's block size where the grid has it, else G {INT4_G}), on the "
             f"{'validation' if metric == 'val_loss' else 'training'} loss. Pooled: the ratio of the means over "
             f"every (cell, seed) pair, 90% bootstrap interval over cells and the seeds inside them. Published: "
             f"{PUBLISHED_SOURCE}; that ratio is against the paper's law, this one against paired INT4 runs."
             + (f" {unpaired} format runs had no INT4 partner and are not in these tables." if unpaired else ""), "",
             "| precision | ratio (pooled) | 90% interval | against 1 | published at 30–200M | cells | pairs |",
             "|---|---|---|---|---|---|---|"]
    for r in pooled(table).itertuples():
        cited = PUBLISHED.get(r.precision)
        published = f"{cited[0]:.2f} [{cited[1]:.2f}, {cited[2]:.2f}]" if cited else "none in this project's sources"
        lines.append(f"| {r.precision} | {r.ratio:.3f} | [{r.low:.3f}, {r.high:.3f}] | {against_one(r.low, r.high)} "
                     f"| {published} | {r.cells} | {r.pairs} |")
    lines += ["", "Per cell (the range is of the per-seed ratios):", "",
              "| precision | size | D | G (INT4 G) | δ format | δ INT4 | ratio | seed range | seeds |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in per_cell(table).itertuples():
        lines.append(f"| {r.precision} | {r.size} | {r.D:.3g} | {r.G} ({r.int4_G}) | {r.delta:.4f} | "
                     f"{r.int4_delta:.4f} | {r.ratio:.3f} | [{r.seed_low:.3f}, {r.seed_high:.3f}] | {r.seeds} |")
    return "\n".join([*lines, ""])
