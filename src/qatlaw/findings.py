"""The paper's findings, each set beside a grid's measured number, its 90% interval and a verdict.

:func:`findings` reads a results folder (the workflow's ``results/`` or a shipped ``reference/<grid>/``) and
returns one row per finding (``findings.parquet``; :func:`write_findings_md` renders it as FINDINGS.md):

| column | meaning |
|---|---|
| ``finding`` | short name, e.g. ``W4A4 gamma_N > 0`` |
| ``paper`` | the paper's number or claim |
| ``measured``, ``ci_low``, ``ci_high`` | this grid's number and its 90% interval (NaN where none applies) |
| ``verdict`` | ``reproduced``, ``not reproduced`` or ``opposite`` |
| ``reason`` | why, in the terms of the rule that decided it |
| ``n`` | runs, cells or draws behind the number |

Every interval is a bootstrap percentile interval (5th–95th): of the law fit's own draws
(``fit/bootstrap.parquet``) for fitted constants, and of ``N_BOOT`` resamples of cells (seeded) for the
decomposition slope, the FC2 changes and the kurtosis gap. A sign claim is ``reproduced`` when its interval
lies wholly on the paper's side of zero, ``opposite`` when it lies wholly on the other side, and ``not
reproduced`` when it spans zero (indistinguishable from noise at this grid). The paper's numbers come from
:func:`qatlaw.paper.constants`.

A run table with runs of a QAT fraction below 1 (the FP→QAT split, :mod:`qatlaw.split`) adds the split's findings
(Dremov et al. 2025) per precision and group: f* inside (0, 1) per cell (its seed-bootstrap interval), f* growing
with S (the slope of ln f* on ln S over resampled cells), the constant a of f*(S) = exp(−a / ln S), the loss gap
of QAT from scratch over f*, and PTQ worse than any QAT fraction (both over resampled cells); FINDINGS.md then
also lists both split laws' constants. Without such runs the findings are exactly those above.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from qatlaw import fit, paper, split
from qatlaw.config import schema_default
from qatlaw.io import atomic_path, read_parquet, write_parquet
from qatlaw.runtable import read_runs

COLUMNS = ("finding", "paper", "measured", "ci_low", "ci_high", "verdict", "reason", "n")
N_BOOT = 2000
SEED = 0
SIGN_PRECISIONS = ("W4A4", "W4A16", "W16A4")  # the unified laws whose exponents' signs are findings
K_RANGE = (0.8, 1.0)
HELD_OUT_BOUND = 0.10
CV_BOUND = 0.10


def _interval(values: np.ndarray) -> tuple[float, float]:
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    if not len(values):
        return math.nan, math.nan
    low, high = np.quantile(values, fit.BOOT_QUANTILES)
    return float(low), float(high)


def _resampled(n: int, stat: Callable[[np.ndarray], float]) -> np.ndarray:
    """``stat`` of N_BOOT resamples (with replacement) of the indices 0..n-1."""
    rng = np.random.default_rng(SEED)
    return np.array([stat(rng.integers(0, n, n)) for _ in range(N_BOOT)])


def _sign_verdict(low: float, high: float, positive: bool = True) -> tuple[str, str]:
    if not (math.isfinite(low) and math.isfinite(high)):
        return "not reproduced", "no interval (too few runs to resample)"
    if (low > 0) if positive else (high < 0):
        return "reproduced", "90% interval excludes 0 on the paper's side"
    if (high < 0) if positive else (low > 0):
        return "opposite", "90% interval excludes 0 on the other side"
    return "not reproduced", "90% interval spans 0: within noise at this grid"


def _minus(fraction: float) -> str:
    """A percentage with a typographic minus sign, e.g. −42.9%."""
    return f"{fraction:.1%}".replace("-", "−")


def _row(finding: str, cited: str, measured: float, interval: tuple[float, float], verdict: tuple[str, str],
         n: int) -> dict:
    return {"finding": finding, "paper": cited, "measured": measured, "ci_low": interval[0],
            "ci_high": interval[1], "verdict": verdict[0], "reason": verdict[1], "n": int(n)}


def _constant(params: pd.DataFrame, law: str, precision: str, constant: str) -> pd.Series | None:
    rows = params[(params["law"] == law) & (params["precision"] == precision) & (params["constant"] == constant)]
    return None if rows.empty else rows.iloc[0]


def law_findings(params: pd.DataFrame, draws: pd.DataFrame) -> list[dict]:
    """Signs of the unified laws' exponents, and γD of weight- vs activation-only quantization."""
    rows = []
    table1 = paper.constants()["unified"]
    for precision in SIGN_PRECISIONS:
        cited = table1[precision]
        for constant in ("gamma_N", "gamma_D", "gamma_G"):
            row = _constant(params, "unified", precision, constant)
            if row is None or not math.isfinite(row["value"]):
                rows.append(_row(f"{precision} {constant} > 0", f"{cited[constant]:.4f}", math.nan,
                                 (math.nan, math.nan), ("not reproduced", "law not fitted (too few runs)"), 0))
                continue
            interval = (float(row["ci_low"]), float(row["ci_high"]))
            rows.append(_row(f"{precision} {constant} > 0", f"{cited[constant]:.4f}", float(row["value"]), interval,
                             _sign_verdict(*interval), int(row["n_runs"])))
    cited_w, cited_a = (table1[p]["gamma_D"] for p in ("W4A16", "W16A4"))
    w, a = (_constant(params, "unified", p, "gamma_D") for p in ("W4A16", "W16A4"))
    if w is None or a is None or not (math.isfinite(w["value"]) and math.isfinite(a["value"])):
        rows.append(_row("gamma_D W4A16 > gamma_D W16A4", f"{cited_w:.3f} > {cited_a:.3f}", math.nan,
                         (math.nan, math.nan), ("not reproduced", "a law is not fitted"), 0))
        return rows
    pick = (draws["law"] == "unified") & (draws["constant"] == "gamma_D")
    dw = draws[pick & (draws["precision"] == "W4A16")]["value"].to_numpy(float)
    da = draws[pick & (draws["precision"] == "W16A4")]["value"].to_numpy(float)
    n = min(len(dw), len(da))  # independent resamples of two run sets: draw i of one against draw i of the other
    interval = _interval(dw[:n] - da[:n]) if n else (math.nan, math.nan)
    rows.append(_row("gamma_D W4A16 > gamma_D W16A4", f"{cited_w:.3f} − {cited_a:.3f} = {cited_w - cited_a:.3f}",
                     float(w["value"] - a["value"]), interval, _sign_verdict(*interval), n))
    return rows


def decomposition_finding(decomp: pd.DataFrame) -> dict:
    """k of δ_W4A4 ≈ k·(δ_W4A16 + δ_W16A4) through the origin, with an interval over resampled cells."""
    ok = decomp[["delta_W4A4", "sum_components"]].notna().all(axis=1)
    x, y = decomp.loc[ok, "sum_components"].to_numpy(float), decomp.loc[ok, "delta_W4A4"].to_numpy(float)
    name, cited = f"decomposition k in [{K_RANGE[0]}, {K_RANGE[1]}]", f"{paper.constants()['decomposition_k']}"
    if len(x) < 2:
        return _row(name, cited, math.nan, (math.nan, math.nan), ("not reproduced", "fewer than 2 cells"), len(x))

    def slope(idx: np.ndarray) -> float:
        sxx = float(x[idx] @ x[idx])
        return float(x[idx] @ y[idx]) / sxx if sxx > 0 else math.nan

    k, interval = slope(np.arange(len(x))), _interval(_resampled(len(x), slope))
    inside = K_RANGE[0] <= k <= K_RANGE[1]
    verdict = ("reproduced", f"k within [{K_RANGE[0]}, {K_RANGE[1]}]") if inside else \
        ("not reproduced", f"k outside [{K_RANGE[0]}, {K_RANGE[1]}]")
    return _row(name, cited, k, interval, verdict, len(x))


def ratio_finding(decomp: pd.DataFrame) -> dict:
    """R = δ_W16A4 / δ_W4A16 > 1 (activation error dominates), mean over cells with both δ > 0."""
    ok = (decomp["delta_W4A16"] > 0) & (decomp["delta_W16A4"] > 0)
    r = (decomp.loc[ok, "delta_W16A4"] / decomp.loc[ok, "delta_W4A16"]).to_numpy(float)
    low, high = paper.constants()["ratio_R"]
    name, cited = "R = delta_W16A4 / delta_W4A16 > 1", f"{low:.2f}–{high:.2f}"
    if len(r) < 2:
        return _row(name, cited, math.nan, (math.nan, math.nan), ("not reproduced", "fewer than 2 cells"), len(r))
    log_r = np.log(r)
    interval = tuple(float(np.exp(v)) for v in _interval(_resampled(len(r), lambda i: float(log_r[i].mean()))))
    verdict = _sign_verdict(math.log(interval[0]), math.log(interval[1]))
    verdict = (verdict[0], verdict[1].replace("excludes 0", "excludes 1").replace("spans 0", "spans 1"))
    return _row(name + " (geometric mean)", cited, float(np.exp(log_r.mean())), interval, verdict, len(r))


def fc2_findings(decomp: pd.DataFrame) -> list[dict]:
    """Relative change of δ_W4A4 with the FC2 input at 8 bit, per G (paired by cell and seed), and whether it
    is larger at the coarsest G than at the finest."""
    ok = (decomp["delta_W4A4"] > 0) & decomp["delta_W4A4_fc2a8"].notna()
    part = decomp[ok].assign(change=lambda d: d["delta_W4A4_fc2a8"] / d["delta_W4A4"] - 1)
    cited = paper.constants()["fc2a8_change"]
    each = ", ".join(f"{v:+.1%} at G={g}" for g, v in cited.items())
    fine_g, coarse_g = min(cited), max(cited)
    contrast = f"{_minus(cited[coarse_g])} at G={coarse_g} vs {_minus(cited[fine_g])} at G={fine_g}"
    rows, changes = [], {}
    for G, sub in part.groupby("G"):
        c = sub["change"].to_numpy(float)
        changes[int(G)] = c
        interval = _interval(_resampled(len(c), lambda i, c=c: float(c[i].mean()))) if len(c) > 1 else \
            (math.nan, math.nan)
        rows.append(_row(f"FC2-8-bit lowers delta_W4A4 at G={int(G)}", each, float(c.mean()), interval,
                         _sign_verdict(*interval, positive=False), len(c)))
    if len(changes) >= 2:
        fine, coarse = changes[min(changes)], changes[max(changes)]
        rng = np.random.default_rng(SEED)
        diffs = np.array([rng.choice(coarse, len(coarse)).mean() - rng.choice(fine, len(fine)).mean()
                          for _ in range(N_BOOT)])
        interval = _interval(diffs)
        rows.append(_row(f"FC2-8-bit lowers delta more at G={max(changes)} than at G={min(changes)}",
                         contrast, float(coarse.mean() - fine.mean()), interval,
                         _sign_verdict(*interval, positive=False), len(coarse) + len(fine)))
    return rows


def kurtosis_finding(outliers: pd.DataFrame, precision: str) -> dict:
    """FC2's input has the highest kurtosis of the four linear inputs: the gap FC2 − the highest other layer
    type (per-run means over blocks), with an interval over resampled runs."""
    runs = outliers[outliers["precision"] == precision]
    per = runs.groupby(["run_id", "layer_type"])["kurtosis_token"].mean().unstack("layer_type")
    name = f"FC2 input kurtosis highest ({precision} runs)"
    kurtosis = paper.constants()["fc2_input_kurtosis"]
    cited = f"FC2 {kurtosis['BF16']} (BF16), {kurtosis['W4A4']} (W4A4); others lower"
    if "fc2" not in per or per.empty:
        return _row(name, cited, math.nan, (math.nan, math.nan), ("not reproduced", "no outlier statistics"), 0)
    others = per.drop(columns="fc2")
    gap = (per["fc2"] - others.max(axis=1)).to_numpy(float)
    interval = _interval(_resampled(len(gap), lambda i: float(gap[i].mean())))
    verdict = _sign_verdict(*interval)
    top = per.mean().idxmax()
    reason = f"{verdict[1]}; mean kurtosis fc2 {per['fc2'].mean():.1f}, highest other {others.mean().idxmax()} " \
             f"{others.mean().max():.1f} (highest overall: {top})"
    return _row(name + ": fc2 − highest other", cited, float(gap.mean()), interval, (verdict[0], reason), len(gap))


def held_out_finding(comparison: pd.DataFrame) -> dict:
    """Mean relative error of the W4A4 law refitted without the largest N, on that N's runs."""
    rows = comparison[(comparison["law"] == "unified") & (comparison["precision"] == "W4A4")]
    value = float(rows["heldout_largest_N_rel_error"].iloc[0]) if len(rows) else math.nan
    name = f"held-out largest N: W4A4 mean relative error <= {HELD_OUT_BOUND:.0%}"
    cited = f"{paper.constants()['table2_rel_error_pct']['W4A4']['unified']}%"
    if not math.isfinite(value):
        return _row(name, cited, value, (math.nan, math.nan), ("not reproduced", "no held-out refit"), 0)
    verdict = ("reproduced", f"within {HELD_OUT_BOUND:.0%}") if value <= HELD_OUT_BOUND else \
        ("not reproduced", f"above {HELD_OUT_BOUND:.0%}")
    return _row(name, cited, value, (math.nan, math.nan), verdict, int(rows["n_runs"].iloc[0]))


def chinchilla_findings(params: pd.DataFrame) -> list[dict]:
    """The Chinchilla fit on BF16 runs: more runs than constants, α and β > 0 with finite intervals."""
    rows = []
    cited = paper.constants()["chinchilla"]
    for constant in ("alpha", "beta"):
        row = _constant(params, "chinchilla", "BF16", constant)
        if row is None or not math.isfinite(row["value"]):
            rows.append(_row(f"Chinchilla {constant} > 0", f"{cited[constant]}", math.nan, (math.nan, math.nan),
                             ("not reproduced", "not fitted"), 0))
            continue
        n = int(row["n_runs"])
        interval = (float(row["ci_low"]), float(row["ci_high"]))
        verdict = _sign_verdict(*interval)
        if n <= len(fit.CHINCHILLA_CONSTANTS) - 1:  # α = β tied: 4 free constants
            verdict = ("not reproduced", f"{n} runs for 4 constants: an exact fit, not a measurement")
        rows.append(_row(f"Chinchilla {constant} > 0", f"{cited[constant]} (tied alpha = beta)", float(row["value"]),
                         interval, verdict, n))
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
    rows = []
    for r in noise[noise["delta"] == "delta_W4A4"].itertuples():
        verdict = ("reproduced", f"CV within {CV_BOUND:.0%}") if r.cv <= CV_BOUND else \
            ("not reproduced", f"CV above {CV_BOUND:.0%}: seeds disagree on delta")
        rows.append(_row(f"seed CV of delta_W4A4 at {r.size}/{r.tokens_requested:.3g}/G{r.G} <= {CV_BOUND:.0%}",
                         "(target of this project)", r.cv, (math.nan, math.nan), verdict, r.seeds))
    return rows


def _cell_mean_row(name: str, cited: str, values: np.ndarray) -> dict:
    """A sign finding on the mean of per-cell values, its interval over resampled cells."""
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return _row(name, cited, float(values.mean()) if len(values) else math.nan, (math.nan, math.nan),
                    ("not reproduced", f"{len(values)} cell(s): too few to resample"), len(values))
    interval = _interval(_resampled(len(values), lambda i: float(values[i].mean())))
    return _row(name, cited, float(values.mean()), interval, _sign_verdict(*interval), len(values))


def split_findings(runs: pd.DataFrame, metric: str) -> list[dict]:
    """The FP→QAT split's findings per precision and group (module docstring); none without split runs."""
    if not split.has_split(runs):
        return []
    cited = paper.constants()["split"]
    a_paper, (f_small, f_large) = cited["optimum"]["a"], cited["optimum_range"]
    deltas = split.split_deltas(runs, metric)
    optima = split.cell_optima(deltas)
    rows = []
    for (precision, group), cells in optima.groupby(["precision", "group"], sort=True):
        label = f"{precision} G{group}"
        for r in cells.itertuples():
            smallest = min(float(f) for f in r.fractions.split() if float(f) > 0)
            if r.interior:
                verdict = ("reproduced", f"90% interval inside the trained fractions ({smallest:g}, 1)")
            elif not math.isfinite(r.f_low):
                verdict = ("not reproduced", "one seed: no interval")
            else:
                edge = "1 (QAT from scratch)" if r.f_high >= split.SCRATCH else f"the smallest fraction {smallest:g}"
                verdict = ("not reproduced", f"90% interval reaches {edge}: the minimum is not bracketed")
            paper_f = split.optimum(r.S, a_paper) if r.S > 1 else math.nan
            rows.append(_row(f"f* inside (0, 1) at {r.size}/{r.tokens_requested:.3g} ({label}, S = {r.S:.3g})",
                             f"{f_small:.0%}–{f_large:.0%}+; f*(S) = {paper_f:.2f}", r.f_star, (r.f_low, r.f_high),
                             verdict, r.n_seeds))
        log_s, log_f = np.log(cells["S"].to_numpy(float)), np.log(cells["f_star"].to_numpy(float))
        grows = f"f* grows with S ({label}): slope of ln f* on ln S"
        if len(np.unique(log_s)) < 3:  # a line through 2 cells fits exactly: its resampled slopes are one value
            rows.append(_row(grows, "> 0", math.nan, (math.nan, math.nan),
                             ("not reproduced", "fewer than 3 cells of distinct S: no interval"), len(cells)))
        else:
            def slope(i: np.ndarray) -> float:
                return float(np.polyfit(log_s[i], log_f[i], 1)[0]) if len(np.unique(log_s[i])) > 1 else math.nan
            interval = _interval(_resampled(len(cells), slope))
            rows.append(_row(grows, "> 0", slope(np.arange(len(cells))), interval, _sign_verdict(*interval),
                             len(cells)))
        law = split.fit_optimum_law(optima, precision, group, seed=SEED)
        name = f"f*(S) = exp(-a / ln S) ({label}): a"
        a_cited = f"{a_paper} (MAE {cited['optimum']['mae']})"
        if not law.identified:
            rows.append(_row(name, a_cited, math.nan, (math.nan, math.nan), ("not reproduced", law.reason),
                             law.n_cells))
        else:
            low, high = law.intervals.get("a", (math.nan, math.nan))
            verdict = ("reproduced", "the paper's a lies in the 90% interval") if low <= a_paper <= high else \
                ("not reproduced", "the paper's a lies outside the 90% interval" if math.isfinite(low) else
                 "no interval (too few cells to resample)")
            rows.append(_row(name, a_cited, law.constants["a"], (low, high), verdict, law.n_cells))
        rows.append(_cell_mean_row(f"loss gap of QAT from scratch over f* ({label}): δ(f = 1) − δ(f*)",
                                   "> 0: from scratch is not optimal", cells["scratch_gap"].to_numpy(float)))
        rows.append(_cell_mean_row(f"PTQ (f = 0) worse than any QAT ({label}): δ(PTQ) − the worst QAT δ",
                                   "> 0: every QAT fraction beats PTQ", cells["ptq_gap"].to_numpy(float)))
    return rows


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
    decomp = read_parquet(root / "analysis" / "decomposition.parquet", ("metric", "delta_W4A4"), "decomposition")
    decomp = decomp[decomp["metric"] == metric]
    params = fit.read_params(root / "fit" / "params.parquet")
    draws = read_parquet(root / "fit" / "bootstrap.parquet", fit.BOOTSTRAP_COLUMNS, "bootstrap table")
    comparison = read_parquet(root / "fit" / "comparison.parquet", fit.COMPARISON_COLUMNS, "comparison table")
    outliers = read_parquet(root / "analysis" / "outliers.parquet", ("run_id", "precision", "layer_type",
                                                                     "kurtosis_token"), "outliers table")
    runs = read_runs(root / "runs.parquet", all_fractions=True)  # the split rows; the others read f = 1 runs
    noise = seed_noise(decomp)
    rows = [*law_findings(params, draws), decomposition_finding(decomp), ratio_finding(decomp),
            *fc2_findings(decomp), kurtosis_finding(outliers, "BF16"), kurtosis_finding(outliers, "W4A4"),
            held_out_finding(comparison), *chinchilla_findings(params), *seed_finding(noise),
            *split_findings(runs, metric)]
    return pd.DataFrame(rows, columns=list(COLUMNS)), noise


def _number(value: float) -> str:
    if not math.isfinite(value):
        return "–"
    return f"{value:.3g}" if abs(value) >= 1e-3 else f"{value:.2e}"


def findings_markdown(table: pd.DataFrame, noise: pd.DataFrame, title: str, note: str = "", extra: str = "") -> str:
    """FINDINGS.md: the findings table, the seed-noise table and ``extra`` sections (``note``: a paragraph under
    the title)."""
    lines = [f"# {title}", "", "Generated by `qatlaw findings` from this folder's Parquet files; every number is "
             "measured. 90% intervals are bootstrap percentiles (see `qatlaw.findings`); \"not reproduced\" "
             "with an interval spanning 0 means within noise at this grid.", "", *([note, ""] if note else []),
             "| finding | paper | this grid | 90% interval | verdict | why | n |", "|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        interval = f"[{_number(r.ci_low)}, {_number(r.ci_high)}]" if math.isfinite(r.ci_low) else "–"
        lines.append(f"| {r.finding} | {r.paper} | {_number(r.measured)} | {interval} | **{r.verdict}** | "
                     f"{r.reason} | {r.n} |")
    counts = table["verdict"].value_counts()
    lines += ["", " · ".join(f"{v}: {counts.get(v, 0)}" for v in ("reproduced", "not reproduced", "opposite")), ""]
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
    extra = split_law_markdown(read_runs(Path(results) / "runs.parquet", all_fractions=True), metric)
    write_parquet(table, out_parquet)
    with atomic_path(out_md) as tmp:
        Path(tmp).write_text(findings_markdown(table, noise, title, note, extra), encoding="utf-8")
    return table
