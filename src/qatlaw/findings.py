"""The paper's findings, each set beside a grid's measured number, its interval and a verdict.

:func:`findings` reads a results folder (the workflow's ``results/`` or a shipped ``reference/<grid>/``) and
returns one row per finding (``findings.parquet``; :func:`write_findings_md` renders it as FINDINGS.md):

| column | meaning |
|---|---|
| ``finding`` | short name, e.g. ``W4A4 gamma_N > 0`` |
| ``paper`` | the paper's number or claim |
| ``measured``, ``ci_low``, ``ci_high`` | this grid's number and its interval (NaN where none applies) |
| ``interval`` | what ``ci_low``–``ci_high`` is: ``90%`` (bootstrap percentiles), ``seed range`` (2 seeds), or empty |
| ``verdict`` | ``reproduced``, ``opposite``, ``within noise`` or ``not measurable`` (``VERDICTS``) |
| ``reason`` | why, in the terms of the rule that decided it |
| ``n`` | runs, cells or draws behind the number |
| ``left_out`` | runs of the finding's kind that the number could not use (diverged, or a relative error of δ ≤ 0) |

**Intervals at the level of the design.** Runs of one (size, tokens, seed) share one BF16 baseline, so their δ
share its noise: every interval resamples cells, and the seeds inside each cell (:mod:`qatlaw.resample`),
N_BOOT times, seeded. The fitted constants' intervals come from the fit's own draws (``fit/bootstrap.parquet``),
resampled the same way.

**Verdicts, every one from an interval.** A sign claim is ``reproduced`` when the interval lies wholly on the
paper's side of its threshold, ``opposite`` when wholly on the other side, ``within noise`` when it spans the
threshold (measured, but not resolved by this grid). A band claim (k in [0.8, 1], an error at most 10%, a
constant within ±25% of the paper's) is ``reproduced`` when the interval lies inside the band, ``opposite``
when wholly outside, ``within noise`` when it spans an edge. ``not measurable`` says why the grid cannot test
the claim (no such runs, a law its runs do not identify, one seed). Ratios are ratios of means over paired
cells, never means of ratios, and a row says how many of its cells have a δ under the seed noise floor.

A run table with runs of a QAT fraction below 1 (the FP→QAT split, :mod:`qatlaw.split`) adds the split's findings
(Dremov et al. 2025) per precision and group: f* inside (0, 1) per cell (its spread over seeds), f* growing with
S (the slope of ln f* on ln S), the constant a of f*(S) = exp(−a / ln S) against the paper's, the loss gap of QAT
from scratch over a fraction chosen on the other seeds, and PTQ worse than any QAT fraction; FINDINGS.md then
also lists both split laws' constants. Without such runs the findings are exactly those above.

A run table with runs of a block-scaled format or a rotation (``W4A4-mxfp4``, ``-nvfp4``, ``-had32``) adds
:mod:`qatlaw.formats`' section (each format's δ over the paired INT4 run's, per cell and pooled) and, for a format
with a published ratio (MXFP4 with a Hadamard rotation of 32: Quartet's), the finding that it costs more than INT4.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import chi2

from qatlaw import decompose, fit, formats, paper, resample, runtable, split
from qatlaw import precision as prec
from qatlaw.config import schema_default
from qatlaw.io import atomic_path, read_parquet, write_parquet
from qatlaw.runtable import read_runs

COLUMNS = ("finding", "paper", "measured", "ci_low", "ci_high", "interval", "verdict", "reason", "n", "left_out")
VERDICTS = ("reproduced", "opposite", "within noise", "not measurable")
N_BOOT = 2000
SEED = 0
SIGN_PRECISIONS = ("W4A4", "W4A16", "W16A4")  # the unified laws whose exponents' signs are findings
K_BAND = (0.8, 1.0)
ERROR_BOUND = 0.10  # a law's mean relative error of δ this project counts as predictive
CV_BOUND = 0.10
EQUIVALENCE_RTOL = 0.25  # a constant matches the paper's when its whole interval lies within ±25% of it
CELL = ["size", "tokens_requested"]  # a design cell; its seeds are resampled inside it
INTERVAL_90 = split.INTERVAL_90


def _interval(values: np.ndarray) -> tuple[float, float]:
    """5th and 95th percentiles of the finite values; NaN when fewer than half the draws are finite."""
    values = np.asarray(values, float)
    finite = values[np.isfinite(values)]
    if not len(finite) or len(finite) < fit.MIN_BOOT_SHARE * len(values):
        return math.nan, math.nan
    low, high = np.quantile(finite, fit.BOOT_QUANTILES)
    return float(low), float(high)


def _resampled(plan: resample.Design, stat: Callable[[np.ndarray], float]) -> np.ndarray:
    """``stat`` of N_BOOT resamples of the design (row indices)."""
    return np.array([stat(idx) for idx in plan.draws(N_BOOT, SEED)])


def _design(table: pd.DataFrame) -> resample.Design:
    return resample.of_table(table, CELL, "seed")


def sign_verdict(low: float, high: float, positive: bool = True, threshold: float = 0.0) -> tuple[str, str]:
    """The verdict of a claim "above ``threshold``" (below, when not ``positive``) from its interval."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "not measurable", "no interval: too few cells to resample"
    at = f"{threshold:g}"
    if (low > threshold) if positive else (high < threshold):
        return "reproduced", f"interval excludes {at} on the paper's side"
    if (high < threshold) if positive else (low > threshold):
        return "opposite", f"interval excludes {at} on the other side"
    return "within noise", f"interval spans {at}: measured, not resolved by this grid"


def band_verdict(low: float, high: float, band: tuple[float, float]) -> tuple[str, str]:
    """The verdict of a claim "inside ``band``" from its interval: inside, wholly outside, or spanning an edge."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "not measurable", "no interval: too few cells to resample"
    edges = f"[{_number(band[0])}, {_number(band[1])}]"
    if band[0] <= low and high <= band[1]:
        return "reproduced", f"interval inside {edges}"
    if high < band[0] or low > band[1]:
        return "opposite", f"interval wholly outside {edges}"
    return "within noise", f"interval spans an edge of {edges}"


def _minus(fraction: float) -> str:
    """A percentage with a typographic minus sign, e.g. −42.9%."""
    return f"{fraction:.1%}".replace("-", "−")


def _row(finding: str, cited: str, measured: float, interval: tuple[float, float], verdict: tuple[str, str],
         n: int, left_out: int = 0, kind: str = INTERVAL_90) -> dict:
    kind = kind if math.isfinite(interval[0]) else ""
    return {"finding": finding, "paper": cited, "measured": measured, "ci_low": interval[0], "ci_high": interval[1],
            "interval": kind, "verdict": verdict[0], "reason": verdict[1], "n": int(n), "left_out": int(left_out)}


def _not_measurable(finding: str, cited: str, reason: str, n: int = 0, measured: float = math.nan) -> dict:
    return _row(finding, cited, measured, (math.nan, math.nan), ("not measurable", reason), n)


def _constant(params: pd.DataFrame, law: str, precision: str, constant: str) -> pd.Series | None:
    rows = params[(params["law"] == law) & (params["precision"] == precision) & (params["constant"] == constant)]
    return None if rows.empty else rows.iloc[0]


def _why_not_fitted(runs: pd.DataFrame, precision: str) -> str:
    """Why a precision's unified law has no constants, from the runs it would be fitted to."""
    rows = runs[runs["precision"] == precision]
    if rows.empty:
        return f"no {precision} runs on this grid"
    n = len(rows)
    if n < len(fit.DELTA_CONSTANTS):
        return f"{n} {precision} run{'s' * (n > 1)} for {len(fit.DELTA_CONSTANTS)} constants"
    single = [c for c in ("N", "D") if rows[c].nunique() < 2]
    if single:
        return f"its {n} runs have a single {', '.join(single)}: that exponent is not identified"
    free = len(fit.DELTA_CONSTANTS) - (rows["G"].nunique() < 2)
    if (points := fit.design_points(rows)) <= free:
        one_g = " (one G: gamma_G is not identified)" if free < len(fit.DELTA_CONSTANTS) else ""
        return f"its {n} runs sit at {points} distinct (N, D, G) points for {free} constants{one_g}: an exact fit"
    usable = rows.dropna(subset=["delta", "baseline"]) if "baseline" in rows else rows.dropna(subset=["delta"])
    if len(usable) > 1 and (ray := fit.one_ray(usable)):
        return ray
    return f"its {n} runs do not identify every constant (see the fit's log)"


def _cells_of(deltas: pd.DataFrame, precision: str) -> int:
    return int(deltas[deltas["precision"] == precision].groupby(["N", "D"]).ngroups)


def noise_floor(decomp: pd.DataFrame, column: str = "delta_W4A4") -> float:
    """The seed noise floor of δ: the pooled standard deviation over seeds of δ_W4A4 (the δ a grid repeats over
    seeds; every δ has the same sources of noise, a QAT run and its baseline) in every (size, tokens, G) with 2
    or more seeds (NaN when no cell has 2)."""
    groups = decomp.dropna(subset=[column]).groupby([*CELL, "G"])[column]
    var, dof = groups.var(ddof=1), groups.count() - 1
    ok = dof > 0
    return float(np.sqrt((var[ok] * dof[ok]).sum() / dof[ok].sum())) if ok.any() else math.nan


def _under_floor(values: np.ndarray, floor: float) -> str:
    if not math.isfinite(floor):
        return "seed noise floor not measured (no cell with 2 seeds)"
    return f"{int((np.abs(values) < floor).sum())} of {len(values)} cells under the seed noise floor {floor:.3f}"


def outside_labels(params: pd.DataFrame) -> list[str]:
    """The QAT labels of a run table from outside (not this project's precision strings) that have a unified
    law: their exponents' signs are findings too, beside the paper's W4A4 values."""
    return [label for label in sorted(params.loc[params["law"] == "unified", "precision"].unique()) if outside(label)]


def outside(label: str) -> bool:
    """Whether a precision label is a run table's own (qatlaw.external), not one of this project's strings."""
    return not prec.is_precision(label)


def law_findings(params: pd.DataFrame, draws: pd.DataFrame, deltas: pd.DataFrame) -> list[dict]:
    """Signs of the unified laws' exponents, and γD of weight- vs activation-only quantization (their draws
    paired by resample number: the same cells drawn for both)."""
    rows = []
    table1 = paper.constants()["unified"]
    for precision in (*SIGN_PRECISIONS, *outside_labels(params)):
        cited = table1.get(precision)
        fitted = _constant(params, "unified", precision, "gamma_N")
        for constant in ("gamma_N", "gamma_D", "gamma_G"):
            name = f"{precision} {constant} > 0"
            paper_value = f"{cited[constant]:.4f}" if cited else f"> 0 (W4A4: {table1['W4A4'][constant]:.4f})"
            row = _constant(params, "unified", precision, constant)
            if constant == "gamma_G" and fitted is not None and math.isfinite(fitted["value"]) and \
                    not math.isfinite(row["value"]):
                G = deltas.loc[deltas["precision"] == precision, "G"].dropna().unique()
                rows.append(_not_measurable(name, paper_value, f"one G ({', '.join(f'{g:g}' for g in G)}) among its "
                                            "runs: gamma_G is not identified (the law keeps k at that G)",
                                            int(fitted["n_runs"])))
                continue
            if row is None or not math.isfinite(row["value"]):
                rows.append(_not_measurable(name, paper_value, f"law not fitted: {_why_not_fitted(deltas, precision)}"))
                continue
            interval = (float(row["ci_low"]), float(row["ci_high"]))
            verdict = sign_verdict(*interval) if math.isfinite(interval[0]) else \
                ("not measurable", f"no interval: fewer than half the resamples of its {_cells_of(deltas, precision)} "
                                   "cells identify the law")
            rows.append(_row(name, paper_value, float(row["value"]), interval, verdict, int(row["n_runs"]),
                             int(row["n_dropped"])))
    cited_w, cited_a = (table1[p]["gamma_D"] for p in ("W4A16", "W16A4"))
    name, paper_value = "gamma_D W4A16 > gamma_D W16A4", f"{cited_w:.3f} − {cited_a:.3f} = {cited_w - cited_a:.3f}"
    w, a = (_constant(params, "unified", p, "gamma_D") for p in ("W4A16", "W16A4"))
    missing = [p for p, r in (("W4A16", w), ("W16A4", a)) if r is None or not math.isfinite(r["value"])]
    if missing:
        rows.append(_not_measurable(name, paper_value, "; ".join(f"{p} law not fitted: {_why_not_fitted(deltas, p)}"
                                                                 for p in missing)))
        return rows
    pick = draws[(draws["law"] == "unified") & (draws["constant"] == "gamma_D")]
    wide = pick.pivot_table(index="draw", columns="precision", values="value")
    paired = wide[["W4A16", "W16A4"]].dropna() if {"W4A16", "W16A4"} <= set(wide.columns) else wide.iloc[:0]
    interval = _interval((paired["W4A16"] - paired["W16A4"]).to_numpy()) if len(paired) else (math.nan, math.nan)
    rows.append(_row(name, paper_value, float(w["value"] - a["value"]), interval, sign_verdict(*interval),
                     int(w["n_runs"] + a["n_runs"]), int(w["n_dropped"] + a["n_dropped"])))
    return rows


def decomposition_finding(decomp: pd.DataFrame) -> dict:
    """k of δ_W4A4 ≈ k·(δ_W4A16 + δ_W16A4) through the origin, its interval over resampled cells and seeds, and
    the band [0.8, 1]."""
    ok = decomp[["delta_W4A4", "sum_components"]].notna().all(axis=1)
    part = decomp[ok].reset_index(drop=True)
    x, y = part["sum_components"].to_numpy(float), part["delta_W4A4"].to_numpy(float)
    name, cited = f"decomposition k in [{K_BAND[0]}, {K_BAND[1]}]", f"{paper.constants()['decomposition_k']}"
    if len(x) < 2:
        return _not_measurable(name, cited, "no cell with W4A4, W4A16 and W16A4 runs on this grid"
                               if not len(x) else "1 cell with W4A4, W4A16 and W16A4 runs", len(x))

    def slope(idx: np.ndarray) -> float:
        sxx = float(x[idx] @ x[idx])
        return float(x[idx] @ y[idx]) / sxx if sxx > 0 else math.nan

    interval = _interval(_resampled(_design(part), slope))
    return _row(name, cited, slope(np.arange(len(x))), interval, band_verdict(*interval, K_BAND), len(x))


def ratio_finding(decomp: pd.DataFrame) -> dict:
    """The activation error exceeds the weight error: mean δ_W16A4 − mean δ_W4A16 > 0 over the cells with both,
    with R = their ratio of means (the paper's 1.20–1.67) in the reason."""
    part = decomp.dropna(subset=["delta_W4A16", "delta_W16A4"]).reset_index(drop=True)
    low, high = paper.constants()["ratio_R"]
    name, cited = "delta_W16A4 > delta_W4A16 (R = ratio of means)", f"R = {low:.2f}–{high:.2f}"
    if len(part) < 2:
        return _not_measurable(name, cited, "fewer than 2 cells with W4A16 and W16A4 runs", len(part))
    w, a = part["delta_W4A16"].to_numpy(float), part["delta_W16A4"].to_numpy(float)
    interval = _interval(_resampled(_design(part), lambda i: float(a[i].mean() - w[i].mean())))
    verdict, why = sign_verdict(*interval)
    ratio = f"R = {a.mean() / w.mean():.2f}" if w.mean() > 0 else "R undefined (mean δ_W4A16 ≤ 0)"
    return _row(name, cited, float(a.mean() - w.mean()), interval,
                (verdict, f"{why}; {ratio}; δ_W4A16: {_under_floor(w, noise_floor(decomp))}"), len(part))


def fc2_findings(decomp: pd.DataFrame) -> list[dict]:
    """Change of δ_W4A4 with the FC2 input at 8 bit, per G, as a ratio of means over paired cells (Σ δ_fc2a8 /
    Σ δ_W4A4 − 1), and whether it is larger at the coarsest G than at the finest (the same cells resampled)."""
    cited = paper.constants()["fc2a8_change"]
    each = ", ".join(f"{v:+.1%} at G={g}" for g, v in cited.items())
    part = decomp.dropna(subset=["delta_W4A4", "delta_W4A4_fc2a8"]).reset_index(drop=True)
    if part.empty:
        return [_not_measurable("FC2-8-bit lowers delta_W4A4", each, "no W4A4-fc2a8 runs on this grid")]
    floor = noise_floor(decomp)

    def change(idx: np.ndarray) -> float:
        base = part["delta_W4A4"].to_numpy(float)[idx].sum()
        return float(part["delta_W4A4_fc2a8"].to_numpy(float)[idx].sum() / base - 1) if base > 0 else math.nan

    rows, groups = [], sorted(int(g) for g in part["G"].unique())
    for G in groups:
        sub = part.index[part["G"] == G].to_numpy()
        interval = _interval(_resampled(_design(part.loc[sub]), lambda i, sub=sub: change(sub[i])))
        verdict, why = sign_verdict(*interval, positive=False)
        rows.append(_row(f"FC2-8-bit lowers delta_W4A4 at G={G}", each, change(sub), interval,
                         (verdict, f"{why}; {_under_floor(part.loc[sub, 'delta_W4A4'].to_numpy(float), floor)}"),
                         len(sub)))
    if len(groups) >= 2:
        fine_g, coarse_g = min(cited), max(cited)
        contrast = f"{_minus(cited[coarse_g])} at G={coarse_g} vs {_minus(cited[fine_g])} at G={fine_g}"
        both = part[part["G"].isin([groups[0], groups[-1]])].reset_index(drop=True)
        coarse = both["G"].to_numpy() == groups[-1]

        def contrast_of(idx: np.ndarray) -> float:
            rows_ = both.iloc[idx]
            sums = [rows_[mask][["delta_W4A4", "delta_W4A4_fc2a8"]].sum() for mask in (coarse[idx], ~coarse[idx])]
            if min(s["delta_W4A4"] for s in sums) <= 0:
                return math.nan
            return float(np.subtract(*(s["delta_W4A4_fc2a8"] / s["delta_W4A4"] for s in sums)))

        interval = _interval(_resampled(_design(both), contrast_of))
        rows.append(_row(f"FC2-8-bit lowers delta more at G={groups[-1]} than at G={groups[0]}", contrast,
                         contrast_of(np.arange(len(both))), interval, sign_verdict(*interval, positive=False),
                         len(both)))
    return rows


def kurtosis_finding(outliers: pd.DataFrame, runs: pd.DataFrame, precision: str) -> dict:
    """FC2's input has the highest kurtosis of the four linear inputs: the gap FC2 − the highest other layer
    type (per-run means over blocks), with an interval over resampled cells and seeds."""
    per = outliers[outliers["precision"] == precision].groupby(["run_id", "layer_type"])["kurtosis_token"] \
        .mean().unstack("layer_type")
    name = f"FC2 input kurtosis highest ({precision} runs): fc2 − highest other"
    kurtosis = paper.constants()["fc2_input_kurtosis"]
    cited = f"FC2 {kurtosis['BF16']} (BF16), {kurtosis['W4A4']} (W4A4); others lower"
    if "fc2" not in per or per.empty:
        return _not_measurable(name, cited, f"no outlier statistics of {precision} runs (they need the models' "
                                            "weights)")
    others = per.drop(columns="fc2")
    gap = (per["fc2"] - others.max(axis=1)).to_numpy(float)
    cells = runs.set_index("run_id").reindex(per.index)[[*CELL, "seed"]].reset_index(drop=True)
    interval = _interval(_resampled(_design(cells), lambda i: float(gap[i].mean())))
    verdict = sign_verdict(*interval)
    top = per.mean().idxmax()
    reason = f"{verdict[1]}; mean kurtosis fc2 {per['fc2'].mean():.1f}, highest other {others.mean().idxmax()} " \
             f"{others.mean().max():.1f} (highest overall: {top})"
    return _row(name, cited, float(gap.mean()), interval, (verdict[0], reason), len(gap))


def error_findings(predictions: pd.DataFrame, runs: pd.DataFrame, precision: str = "W4A4") -> list[dict]:
    """The W4A4 law's mean relative error of δ in sample (the paper's like number: Table 2's 4.7%) and on the
    largest N predicted by a refit without it (the paper has no held-out number), each with its interval over
    resampled cells and seeds, against ERROR_BOUND. A run with δ ≤ 0 has no relative error: it is counted in
    ``left_out``."""
    cited = paper.constants()["table2_rel_error_pct"]["W4A4"]["unified"]
    rows = []
    for held_out, name, paper_value in (
            ("none", f"{precision} law in sample",
             f"{cited}% ({'' if precision == 'W4A4' else 'W4A4, '}in sample, Table 2)"),
            ("largest_N", f"{precision} law on the held-out largest N", "– (the paper reports in-sample errors only)")):
        name = f"{name}: mean relative error <= {ERROR_BOUND:.0%}"
        pred = predictions[(predictions["law"] == "unified") & (predictions["precision"] == precision)
                           & (predictions["held_out"] == held_out)]
        scored = pred[pred["observed"] > 0].reset_index(drop=True)
        if scored.empty:
            rows.append(_not_measurable(name, paper_value, f"no {precision} law" if held_out == "none" else
                                        "no held-out refit (the law is not fitted without the largest N)"))
            continue
        err = scored["rel_error"].to_numpy(float)
        cells = scored[["run_id"]].merge(runs[["run_id", *CELL, "seed"]], on="run_id", how="left")
        interval = _interval(_resampled(_design(cells), lambda i: float(err[i].mean())))
        verdict, why = band_verdict(*interval, (0.0, ERROR_BOUND))
        left = len(pred) - len(scored)
        note = f"; {left} run{'s' * (left != 1)} with δ ≤ 0 not scored" if left else ""
        rows.append(_row(name, paper_value, float(err.mean()), interval, (verdict, why + note), len(scored), left))
    return rows


def seed_noise(decomp: pd.DataFrame) -> pd.DataFrame:
    """Seed-to-seed spread of δ per cell, group and precision where a cell has at least 3 seeds: ``mean``,
    ``sd`` (ddof 1), ``cv`` = sd / mean and the seeds' values."""
    rows = []
    for column in ("delta_W4A4", "delta_W4A4_fc2a8", "delta_W4A16", "delta_W16A4"):
        for (size, tokens, G), sub in decomp.groupby(["size", "tokens_requested", "G"]):
            values = sub.sort_values("seed")[column].dropna().to_numpy(float)
            if len(values) >= 3:
                mean, sd = float(values.mean()), float(values.std(ddof=1))
                rows.append({"size": size, "tokens_requested": int(tokens), "G": int(G), "delta": column,
                             "seeds": len(values), "mean": mean, "sd": sd, "cv": sd / mean if mean else math.nan,
                             "values": " ".join(f"{v:.4f}" for v in values)})
    return pd.DataFrame(rows, columns=["size", "tokens_requested", "G", "delta", "seeds", "mean", "sd", "cv",
                                       "values"])


def seed_finding(noise: pd.DataFrame) -> list[dict]:
    """The seed CV of δ_W4A4 at every cell with 3 or more seeds against CV_BOUND, its 90% interval from the
    χ² distribution of the sample variance (n − 1 degrees of freedom; the mean held at its estimate)."""
    rows = []
    for r in noise[noise["delta"] == "delta_W4A4"].itertuples():
        dof = r.seeds - 1
        interval = (r.cv * math.sqrt(dof / chi2.ppf(fit.BOOT_QUANTILES[1], dof)),
                    r.cv * math.sqrt(dof / chi2.ppf(fit.BOOT_QUANTILES[0], dof)))
        rows.append(_row(f"seed CV of delta_W4A4 at {r.size}/{r.tokens_requested:.3g}/G{r.G} <= {CV_BOUND:.0%}",
                         "(target of this project)", r.cv, interval, band_verdict(*interval, (0.0, CV_BOUND)),
                         r.seeds))
    return rows


def _design_mean_row(name: str, cited: str, table: pd.DataFrame, column: str, empty_reason: str) -> dict:
    """A sign finding on the mean of per-(cell, seed) values, its interval over resampled cells and seeds."""
    part = table.dropna(subset=[column]).reset_index(drop=True)
    if part.empty:
        return _not_measurable(name, cited, empty_reason)
    values = part[column].to_numpy(float)
    interval = _interval(_resampled(_design(part), lambda i: float(values[i].mean())))
    return _row(name, cited, float(values.mean()), interval, sign_verdict(*interval), len(part),
                len(table) - len(part))


def _optimum_row(r, label: str, f_small: float, f_large: float, a_paper: float) -> dict:
    """f* inside (0, 1) in one cell, from its spread over seeds."""
    smallest = min(float(f) for f in r.fractions.split() if float(f) > 0)
    paper_f = split.optimum(r.S, a_paper) if r.S > 1 else math.nan
    name = f"f* inside (0, 1) at {r.size}/{r.tokens_requested:.3g} ({label}, S = {r.S:.3g})"
    cited = f"{f_small:.0%}–{f_large:.0%}+; f*(S) = {paper_f:.2f}"
    if not math.isfinite(r.f_low):
        return _row(name, cited, r.f_star, (math.nan, math.nan), ("not measurable", "one seed: no spread"),
                    r.n_seeds)
    spread = "the range of 2 seeds (not a 90% interval)" if r.spread == split.SEED_RANGE else "the 90% interval"
    if r.interior:
        verdict = ("reproduced", f"{spread} lies inside the trained fractions ({smallest:g}, 1)")
    elif r.f_low >= split.SCRATCH or r.f_high <= smallest:
        edge = "1 (QAT from scratch)" if r.f_low >= split.SCRATCH else f"the smallest fraction {smallest:g}"
        verdict = ("opposite", f"{spread} lies wholly at {edge}")
    else:
        edge = "1 (QAT from scratch)" if r.f_high >= split.SCRATCH else f"the smallest fraction {smallest:g}"
        verdict = ("within noise", f"{spread} reaches {edge}: the minimum is not bracketed")
    return _row(name, cited, r.f_star, (r.f_low, r.f_high), verdict, r.n_seeds, kind=r.spread)


def split_findings(runs: pd.DataFrame, metric: str) -> list[dict]:
    """The FP→QAT split's findings per precision and group (module docstring); none without split runs."""
    if not split.has_split(runs):
        return []
    cited = paper.constants()["split"]
    a_paper, (f_small, f_large) = cited["optimum"]["a"], cited["optimum_range"]
    deltas = split.split_deltas(runs, metric)
    optima, gaps = split.cell_optima(deltas), split.seed_gaps(deltas)
    rows = []
    for (precision, group), cells in optima.groupby(["precision", "group"], sort=True):
        label = f"{precision} G{group}"
        rows += [_optimum_row(r, label, f_small, f_large, a_paper) for r in cells.itertuples()]
        grows = f"f* grows with S ({label}): slope of ln f* on ln S"
        if cells["S"].nunique() < 3:  # a line through 2 cells fits exactly: nothing is left to resample
            rows.append(_not_measurable(grows, "> 0", f"{cells['S'].nunique()} cells of distinct S (need 3)",
                                        len(cells)))
        else:
            slope, draws = split.optimum_slope(deltas, precision, group, N_BOOT, SEED)
            interval = _interval(draws)
            rows.append(_row(grows, "> 0", slope, interval, sign_verdict(*interval), len(cells)))
        law = split.fit_optimum_law(optima, precision, group, seed=SEED)
        name = f"f*(S) = exp(-a / ln S) ({label}): a within ±{EQUIVALENCE_RTOL:.0%} of the paper's"
        a_cited = f"{a_paper} (MAE {cited['optimum']['mae']})"
        if not law.identified:
            rows.append(_not_measurable(name, a_cited, law.reason, law.n_cells))
        else:
            interval = law.intervals.get("a", (math.nan, math.nan))
            band = (a_paper * (1 - EQUIVALENCE_RTOL), a_paper * (1 + EQUIVALENCE_RTOL))
            verdict, why = band_verdict(*interval, band)
            rows.append(_row(name, a_cited, law.constants["a"], interval,
                             (verdict, f"{why} (over resampled cells)"), law.n_cells))
        mine = gaps[(gaps["precision"] == precision) & (gaps["group"].astype(str) == str(group))]
        rows.append(_design_mean_row(
            f"loss gap of QAT from scratch over f̂ ({label}): δ(f = 1) − δ(f̂), f̂ chosen on the other seeds",
            "> 0: from scratch is not optimal", mine, "scratch_gap",
            "one seed per cell: f̂ cannot be chosen apart from the runs that measure its gap"))
        rows.append(_design_mean_row(f"PTQ (f = 0) worse than any QAT ({label}): δ(PTQ) − the worst QAT δ",
                                     "> 0: every QAT fraction beats PTQ", mine, "ptq_gap",
                                     "no PTQ runs (f = 0) on this grid"))
    return rows


def format_findings(runs: pd.DataFrame, metric: str) -> list[dict]:
    """A format with a published ratio costs more than INT4 (:mod:`qatlaw.formats`: δ over the paired INT4 run's,
    pooled, above 1); nothing for a grid without runs of that format."""
    table = formats.pairs(runs, metric)
    rows = []
    for precision, (median, low, high) in formats.PUBLISHED.items():
        part = table[table["precision"] == precision]
        if part.empty:
            continue
        r = formats.pooled(part).iloc[0]
        verdict, why = sign_verdict(r["low"], r["high"], threshold=1.0)
        rows.append(_row(f"δ {precision} / δ INT4 W4A4 > 1 (paired, pooled)",
                         f"{median:.2f} [{low:.2f}, {high:.2f}] at 30–200M (Quartet; over the paper's INT4 law)",
                         float(r["ratio"]), (float(r["low"]), float(r["high"])),
                         (verdict, f"{why}; {r['cells']} cells, {r['pairs']} (cell, seed) pairs"), int(r["pairs"])))
    return rows


def vs_paper(runs: pd.DataFrame, metric: str, labels: list[str]) -> pd.DataFrame:
    """Every QAT run of the ``labels`` beside the paper's INT4 W4A4 law (Table 1) at its N, D and G: ``delta``
    (measured, of ``metric``), ``paper`` (the law's δ) and ``ratio`` = delta / paper, by label, N and D."""
    loss_col, delta_col = runtable.metric_columns(metric)
    deltas = runtable.delta_table(runtable.from_scratch(runs))
    deltas = deltas[deltas["precision"].isin(labels) & ~deltas["diverged"]]
    law = paper.constants()["unified"]["W4A4"]
    cited = fit.predict_delta(law, deltas["N"].to_numpy(float), deltas["D"].to_numpy(float),
                              deltas["G"].to_numpy(float))
    out = deltas[["precision", "size", "N", "D", "G", "seed"]].assign(
        delta=deltas[delta_col].to_numpy(float), paper=cited, ratio=deltas[delta_col].to_numpy(float) / cited)
    return out.sort_values(["precision", "N", "D"]).reset_index(drop=True)


def vs_paper_markdown(runs: pd.DataFrame, metric: str, labels: list[str]) -> str:
    """FINDINGS.md's section setting each run of a table from outside beside the paper's INT4 law (empty
    without such labels)."""
    if not labels:
        return ""
    table = vs_paper(runs, metric, labels)
    lines = ["## Beside the paper's INT4 law", "",
             "Each QAT run's δ beside δ of the paper's W4A4 law (Table 1: INT4 AbsMax, k 0.1582, γN 0.2186, γD "
             "0.0745, γG 0.7779) at its N, D and G. A different format, tokenizer and corpus: the ratio says how far "
             "this table's runs are from the paper's law, not whether the paper's constants hold.", "",
             "| precision | ratio measured / paper: median [min, max] | runs |", "|---|---|---|"]
    for label, part in table.groupby("precision"):
        lines.append(f"| {label} | {part['ratio'].median():.3g} [{part['ratio'].min():.3g}, "
                     f"{part['ratio'].max():.3g}] | {len(part)} |")
    lines += ["", "| precision | N | D | D/N | G | δ measured | δ paper law | ratio |", "|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        lines.append(f"| {r.precision} | {r.N:.4g} | {r.D:.4g} | {r.D / r.N:.0f} | {r.G:g} | {r.delta:.4f} | "
                     f"{r.paper:.4f} | {r.ratio:.3g} |")
    return "\n".join([*lines, ""])


def split_law_markdown(runs: pd.DataFrame, metric: str) -> str:
    """FINDINGS.md's section on the split laws' constants (the paper's beside this grid's, with 90% intervals);
    empty without split runs."""
    if not split.has_split(runs):
        return ""
    deltas = split.split_deltas(runs, metric)
    optima = split.cell_optima(deltas)
    cited = paper.constants()["split"]
    lines = ["## FP→QAT split laws (Dremov et al. 2025)", "",
             f"Forms and the paper's constants: `qatlaw.split`, `laws/paper.yaml` ({cited['source']}). "
             "The paper's bit factors 2^(−κB), 2^(−χB), 2^(−μB) are folded into θ, φ, λ (one law per precision); "
             "its loss-law constants are not in this project's sources (–).", "",
             "| law | precision | constant | paper | this grid | 90% interval | cells | runs |",
             "|---|---|---|---|---|---|---|---|"]
    for precision, group in deltas[split.GROUP].drop_duplicates().itertuples(index=False):
        for law, papers in ((split.fit_optimum_law(optima, precision, group), {"a": cited["optimum"]["a"]}),
                            (split.fit_loss_law(deltas, precision, group), cited["loss_law"])):
            if not law.identified:
                lines.append(f"| {'f*(S)' if 'a' in law.constants else 'loss'} | {precision} G{group} | – | – | "
                             f"{law.reason} | – | {law.n_cells} | {law.n_runs} |")
                continue
            for name, value in law.constants.items():
                low, high = law.intervals.get(name, (math.nan, math.nan))
                interval = f"[{_number(low)}, {_number(high)}]" if math.isfinite(low) else "–"
                cited_value = papers.get(name)
                lines.append(f"| {'f*(S)' if name == 'a' else 'loss'} | {precision} G{group} | {name} | "
                             f"{'–' if cited_value is None else cited_value} | {_number(value)} | {interval} | "
                             f"{law.n_cells} | {law.n_runs} |")
    return "\n".join([*lines, ""])


def findings(results: str | Path, metric: str = schema_default("fit", "metric")) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every finding of a results folder (the table of the module docstring) and its seed-noise table, with δ
    of ``metric`` (the fit's metric)."""
    root = Path(results)
    decomp = _analysis(root / "analysis" / "decomposition.parquet", decompose.DECOMPOSITION_COLUMNS, "decomposition",
                       ("metric", "delta_W4A4"))
    decomp = decomp[decomp["metric"] == metric]
    params = fit.read_params(root / "fit" / "params.parquet")
    draws = read_parquet(root / "fit" / "bootstrap.parquet", fit.BOOTSTRAP_COLUMNS, "bootstrap table")
    predictions = read_parquet(root / "fit" / "predictions.parquet", fit.PREDICTIONS_COLUMNS, "predictions table")
    outliers = _analysis(root / "analysis" / "outliers.parquet", OUTLIER_COLUMNS, "outliers table")
    runs = read_runs(root / "runs.parquet", all_fractions=True)  # the split rows; the others read f = 1 runs
    loss_col, delta_col = runtable.metric_columns(metric)
    deltas = runtable.delta_table(runtable.from_scratch(runs))
    deltas = deltas.assign(delta=deltas[delta_col], baseline=deltas[f"baseline_{loss_col}"])
    noise = seed_noise(decomp)
    rows = [*law_findings(params, draws, deltas), decomposition_finding(decomp), ratio_finding(decomp),
            *fc2_findings(decomp), kurtosis_finding(outliers, runs, "BF16"), kurtosis_finding(outliers, runs, "W4A4"),
            *(row for label in ("W4A4", *outside_labels(params)) for row in error_findings(predictions, runs, label)),
            *seed_finding(noise), *split_findings(runs, metric), *format_findings(runs, metric)]
    return pd.DataFrame(rows, columns=list(COLUMNS)), noise


OUTLIER_COLUMNS = ("run_id", "precision", "layer_type", "kurtosis_token")


def _analysis(path: Path, columns: tuple[str, ...], what: str, required: tuple[str, ...] | None = None) -> pd.DataFrame:
    """An analysis table of a results folder; empty (its columns, no rows) where the folder has none: a run
    table from outside (:mod:`qatlaw.external`) has no model weights to analyse, and no decomposition without
    W4A16 and W16A4 runs."""
    if not path.is_file():
        return pd.DataFrame(columns=list(columns))
    return read_parquet(path, required or columns, what)


def _number(value: float) -> str:
    if not math.isfinite(value):
        return "–"
    if value == 0:
        return "0"
    return f"{value:.3g}" if abs(value) >= 1e-3 else f"{value:.2e}"


def _interval_cell(low: float, high: float, kind: str) -> str:
    if not math.isfinite(low):
        return "–"
    return f"[{_number(low)}, {_number(high)}]" + (f" ({kind})" if kind and kind != INTERVAL_90 else "")


def laws_markdown(params: pd.DataFrame) -> str:
    """FINDINGS.md's table of the fitted Chinchilla and unified laws' constants (no verdict: what was fitted)."""
    lines = ["## The fitted laws", "",
             "Every constant with its 90% interval over resampled cells and seeds; `left out` counts runs the fit "
             "could not use (diverged, or a NaN loss). Each QAT run enters its δ law as its QAT loss, L_BF16 + δ, "
             "so a run whose δ came out ≤ 0 is fitted like any other. With α = β tied, the Chinchilla law's α "
             "and β are one constant; α is bounded at 0.", "",
             "| law | precision | constant | value | 90% interval | runs | left out |", "|---|---|---|---|---|---|---|"]
    laws = params[params["law"].isin(["chinchilla", "unified"])]
    fitted = laws.groupby(["law", "precision"])["value"].transform(lambda v: np.isfinite(v).any())
    for r in laws[fitted].itertuples():
        interval = _interval_cell(r.ci_low, r.ci_high, INTERVAL_90)
        lines.append(f"| {r.law} | {r.precision} | {r.constant} | {_number(r.value)} | {interval} | {r.n_runs} | "
                     f"{r.n_dropped} |")
    missing = laws[~fitted].drop_duplicates(["law", "precision"])
    if len(missing):
        lines += ["", "Not fitted (too few runs, or constants their runs do not identify): " + ", ".join(
            f"{r.law} {r.precision} ({r.n_runs} run{'s' * (r.n_runs != 1)})" for r in missing.itertuples()) + "."]
    return "\n".join([*lines, ""])


def findings_markdown(table: pd.DataFrame, noise: pd.DataFrame, title: str, note: str = "", extra: str = "") -> str:
    """FINDINGS.md: the findings table, the seed-noise table and ``extra`` sections (``note``: a paragraph under
    the title)."""
    lines = [f"# {title}", "", "Generated by `qatlaw findings` from this folder's Parquet files; every number is "
             "measured. Intervals are 90% bootstrap percentiles over resampled cells and the seeds inside them "
             "(a cell's runs share one BF16 baseline), or the range of 2 seeds where it says so. Verdicts: "
             "**reproduced** (the interval lies on the paper's side, or inside its band), **opposite** (wholly on "
             "the other side, or outside the band), **within noise** (measured; the interval spans the threshold "
             "or a band's edge), **not measurable** (this grid cannot test it, and why); see `qatlaw.findings`.",
             "", *([note, ""] if note else []),
             "| finding | paper | this grid | interval | verdict | why | n |", "|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        n = f"{r.n} (+{r.left_out} left out)" if r.left_out else f"{r.n}"
        lines.append(f"| {r.finding} | {r.paper} | {_number(r.measured)} | "
                     f"{_interval_cell(r.ci_low, r.ci_high, r.interval)} | **{r.verdict}** | {r.reason} | {n} |")
    counts = table["verdict"].value_counts()
    lines += ["", " · ".join(f"{v}: {counts.get(v, 0)}" for v in VERDICTS), ""]
    if len(noise):
        lines += ["## Seed noise (cells with 3 or more seeds)", "",
                  "| cell | δ | seeds | mean | sd | CV | per seed |", "|---|---|---|---|---|---|---|"]
        for r in noise.itertuples():
            lines.append(f"| {r.size} / {r.tokens_requested:.3g} / G{r.G} | {r.delta} | {r.seeds} | {r.mean:.4f} | "
                         f"{r.sd:.4f} | {r.cv:.1%} | {r.values} |")
        lines.append("")
    if extra:
        lines.append(extra)
    return "\n".join(lines)


def run_findings(results: str | Path, out_md: str | Path, out_parquet: str | Path, metric: str,
                 title: str, note: str = "") -> pd.DataFrame:
    """Write FINDINGS.md and findings.parquet for a results folder."""
    table, noise = findings(results, metric)
    params = fit.read_params(Path(results) / "fit" / "params.parquet")
    runs = read_runs(Path(results) / "runs.parquet", all_fractions=True)
    extra = "\n".join(part for part in (laws_markdown(params), vs_paper_markdown(runs, metric, outside_labels(params)),
                                         split_law_markdown(runs, metric), formats.markdown(runs, metric)) if part)
    write_parquet(table, out_parquet)
    with atomic_path(out_md) as tmp:
        Path(tmp).write_text(findings_markdown(table, noise, title, note, extra), encoding="utf-8")
    return table
