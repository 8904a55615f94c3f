"""The paper's tables from the fit outputs, next to the paper's numbers, as CSV and Markdown.

Every table is one function ``<name>(<inputs>, out_stem)`` that writes ``<out_stem>.csv`` and
``<out_stem>.md`` (e.g. ``results/tables/table1_constants``) and returns the table. ``TABLES`` names the input
files each table reads (keys of :data:`qatlaw.outputs.INPUTS`); :func:`make_table` is the entry point for the
workflow. The paper's numbers come from :func:`qatlaw.paper.constants`.

- ``table1_constants`` (paper Table 1): the unified law's k, γN, γD, γG per precision and the Chinchilla
  constants, with their 90% bootstrap intervals. Columns ``setting``, ``law``, ``precision``, ``constant``,
  ``value``, ``ci_low``, ``ci_high``, ``paper``, ``n_runs``, ``n_dropped``.
- ``table2_laws`` (paper Table 2): mean relative error |δ̂ − δ|/δ (over the runs with δ > 0) of the EPM laws (one per granularity) and of
  the unified law, per precision. Columns ``precision``, ``method``, ``law``, ``n_laws``, ``n_runs``,
  ``rel_error_pct``, ``heldout_largest_N_pct``, ``heldout_largest_D_pct``, ``paper_rel_error_pct``.
- ``table4_no_D`` (paper Table 4): relative error of the unified law without and with its D term. Columns
  ``precision``, ``n_runs``, ``without_D_pct``, ``with_D_pct``, ``heldout_largest_D_without_pct``,
  ``heldout_largest_D_with_pct``, ``paper_without_D_pct``, ``paper_with_D_pct``.
- ``gap_opening`` (not in the paper): when, in each QAT run, the gap to its BF16 baseline opens: the smoothed
  training-loss gap (loss_ema − the baseline's loss_ema at the same step) at 25, 50, 75 and 100% of the steps, and
  ``opened_at``, the fraction of steps after which the gap stays at or above half its final value. A run's δ is
  only meaningful once its gap has opened. Columns ``run_id``, ``size``, ``N``, ``D``, ``precision``, ``G``,
  ``seed``, ``gap_25``, ``gap_50``, ``gap_75``, ``gap_100``, ``opened_at``.

A law that could not be fitted shows NaN (Markdown: "not fitted"); a missing input file or column is a
:class:`qatlaw.report_inputs.PlotError`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from qatlaw import fit, paper
from qatlaw.io import atomic_path
from qatlaw.outputs import TABLES
from qatlaw.precision import BASELINE
from qatlaw.report_inputs import CONSTANT_SYMBOLS, metrics_path, read_input, select_inputs

SETTINGS = {"W4A4": "δ_W4A4", "W4A16": "δ_W4A16 (weight only)", "W16A4": "δ_W16A4 (activation only)",
            "W4A4-fc2a8": "δ_W4A4, FC2 input 8 bit", "W16A4-fc2a8": "δ_W16A4, FC2 input 8 bit"}
METHODS = {"epm": "EPM, one law per G (Eq. 3)", "unified": "unified law (Eq. 5)"}
TABLE1_COLUMNS = ("setting", "law", "precision", "constant", "value", "ci_low", "ci_high", "paper", "n_runs",
                  "n_dropped")
TABLE2_COLUMNS = ("precision", "method", "law", "n_laws", "n_runs", "rel_error_pct", "heldout_largest_N_pct",
                  "heldout_largest_D_pct", "paper_rel_error_pct")
GAP_COLUMNS = ("run_id", "size", "N", "D", "precision", "G", "seed", "gap_25", "gap_50", "gap_75", "gap_100",
               "opened_at")
GAP_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
TABLE4_COLUMNS = ("precision", "n_runs", "without_D_pct", "with_D_pct", "heldout_largest_D_without_pct",
                  "heldout_largest_D_with_pct", "paper_without_D_pct", "paper_with_D_pct")


def _precisions(params: pd.DataFrame) -> list[str]:
    """The paper's precisions present in a params table, in its order, then any other precision whose unified
    law was fitted (the single-cell ablation precisions are left out)."""
    unified = params[params["law"] == "unified"]
    present = set(unified["precision"])
    fitted = set(unified.loc[unified["value"].notna(), "precision"])
    table1 = paper.constants()["unified"]
    return [p for p in table1 if p in present] + sorted(fitted - set(table1))


def _pct(value: float) -> float:
    """A fraction as a percentage (NaN stays NaN)."""
    return 100 * float(value) if np.isfinite(value) else math.nan


def _percent(value: float, missing: str = "n/a") -> str:
    """A percentage cell of the Markdown tables."""
    return f"{value:.1f}%" if np.isfinite(value) else missing


def _cell(value: object) -> str:
    """A Markdown cell: numbers to 4 significant digits, NaN as 'not fitted'."""
    if isinstance(value, float | np.floating):
        return "not fitted" if not np.isfinite(value) else f"{value:.4g}"
    return "" if value is None or value is pd.NA else str(value)


def _write(table: pd.DataFrame, out_stem: str | Path, title: str, notes: str,
           markdown: Callable[[pd.Series], list[str]], header: list[str]) -> None:
    """Write ``<out_stem>.csv`` (the table) and ``<out_stem>.md`` (title, Markdown rows, notes)."""
    with atomic_path(Path(f"{out_stem}.csv")) as tmp:
        table.to_csv(tmp, index=False)
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(markdown(row)) + " |" for _, row in table.iterrows()]
    with atomic_path(Path(f"{out_stem}.md")) as tmp:
        tmp.write_text("\n".join(lines + ["", notes, ""]))


def table1_constants(params: str | Path, out_stem: str | Path) -> pd.DataFrame:
    """Paper Table 1: fitted constants of the unified law per precision and of Chinchilla, with intervals."""
    prm, published = read_input(params, "params"), paper.constants()
    rows = []
    blocks = [("unified", p, SETTINGS.get(p, f"δ_{p}"), fit.DELTA_CONSTANTS, published["unified"].get(p, {}))
              for p in _precisions(prm)]
    blocks.append(("chinchilla", BASELINE, "Chinchilla (BF16 loss)", ("E", "A", "alpha", "B", "beta"),
                   published["chinchilla"]))
    for law, precision, setting, names, cited in blocks:
        fitted = prm[(prm["law"] == law) & (prm["precision"] == precision)].set_index("constant")
        for name in names:
            row = fitted.loc[name] if name in fitted.index else None
            rows.append({"setting": setting, "law": law, "precision": precision, "constant": name,
                         "value": math.nan if row is None else float(row["value"]),
                         "ci_low": math.nan if row is None else float(row["ci_low"]),
                         "ci_high": math.nan if row is None else float(row["ci_high"]),
                         "paper": cited.get(name, math.nan),
                         "n_runs": pd.NA if row is None else int(row["n_runs"]),
                         "n_dropped": pd.NA if row is None else int(row["n_dropped"])})
    table = pd.DataFrame(rows, columns=list(TABLE1_COLUMNS)).astype({"n_runs": "Int64", "n_dropped": "Int64"})

    def markdown(row: pd.Series) -> list[str]:
        ci = f"[{row['ci_low']:.4g}, {row['ci_high']:.4g}]" if np.isfinite([row["ci_low"], row["ci_high"]]).all() \
            else "–"
        return [row["setting"], CONSTANT_SYMBOLS[row["constant"]], _cell(row["value"]), ci,
                _cell(row["paper"]) if np.isfinite(row["paper"]) else "–",
                f"{_cell(row['n_runs'])} ({_cell(row['n_dropped'])} left out)"]
    _write(table, out_stem, "Table 1: fitted constants (this run vs the paper)",
           "δ = k · D^γD · (log2 G)^γG / N^γN per precision, fitted to the QAT loss L_BF16 + δ (a run whose δ ≤ 0 "
           "enters); L = E + A/N^α + B/D^β for BF16. 90% bootstrap intervals over resampled cells and the seeds "
           "inside them; left-out runs diverged or had a NaN loss.", markdown,
           ["setting", "constant", "fitted", "90% CI", "paper", "runs"])
    return table


def table2_laws(comparison: str | Path, params: str | Path, out_stem: str | Path) -> pd.DataFrame:
    """Paper Table 2: relative error of the EPM laws (one per granularity) vs the one unified law."""
    comp, prm = read_input(comparison, "comparison"), read_input(params, "params")
    published = paper.constants()["table2_rel_error_pct"]
    rows = []
    for precision in _precisions(prm):
        for law, method in METHODS.items():
            match = comp[(comp["law"] == law) & (comp["precision"] == precision)]
            if match.empty:
                continue
            row = match.iloc[0]
            values = prm.loc[(prm["law"] == law) & (prm["precision"] == precision), "value"]
            n_laws = int(values.notna().any()) if law == "unified" else int(values.notna().sum())
            rows.append({"precision": precision, "method": method, "law": law, "n_laws": n_laws,
                         "n_runs": int(row["n_runs"]), "rel_error_pct": _pct(row["rel_error"]),
                         "heldout_largest_N_pct": _pct(row["heldout_largest_N_rel_error"]),
                         "heldout_largest_D_pct": _pct(row["heldout_largest_D_rel_error"]),
                         "paper_rel_error_pct": published.get(precision, {}).get(law, math.nan)})
    table = pd.DataFrame(rows, columns=list(TABLE2_COLUMNS))

    def markdown(row: pd.Series) -> list[str]:
        return [row["precision"], row["method"], str(row["n_laws"]), str(row["n_runs"]),
                *(_percent(row[c]) for c in ("rel_error_pct", "heldout_largest_N_pct", "heldout_largest_D_pct")),
                _percent(row["paper_rel_error_pct"], "–")]
    _write(table, out_stem, "Table 2: EPM laws vs the unified law (mean relative error |δ̂ − δ|/δ)",
           "In sample, and on the runs of the largest N / largest D predicted by a refit without them.", markdown,
           ["precision", "method", "laws fitted", "runs", "relative error", "held-out largest N",
            "held-out largest D", "paper"])
    return table


def table4_no_D(comparison: str | Path, params: str | Path, out_stem: str | Path) -> pd.DataFrame:
    """Paper Table 4: relative error of the unified law without (no_D) and with its D term."""
    comp = read_input(comparison, "comparison").set_index(["law", "precision"])
    published = paper.constants()["table4_rel_error_pct"]
    rows = []
    for precision in _precisions(read_input(params, "params")):
        without = comp.loc[("no_D", precision)] if ("no_D", precision) in comp.index else None
        with_d = comp.loc[("unified", precision)] if ("unified", precision) in comp.index else None
        cited = published.get(precision, {})
        rows.append({"precision": precision,
                     "n_runs": int((with_d if with_d is not None else without)["n_runs"]),
                     "without_D_pct": _pct(without["rel_error"]) if without is not None else math.nan,
                     "with_D_pct": _pct(with_d["rel_error"]) if with_d is not None else math.nan,
                     "heldout_largest_D_without_pct":
                         _pct(without["heldout_largest_D_rel_error"]) if without is not None else math.nan,
                     "heldout_largest_D_with_pct":
                         _pct(with_d["heldout_largest_D_rel_error"]) if with_d is not None else math.nan,
                     "paper_without_D_pct": cited.get("without_D", math.nan),
                     "paper_with_D_pct": cited.get("with_D", math.nan)})
    table = pd.DataFrame(rows, columns=list(TABLE4_COLUMNS))

    def markdown(row: pd.Series) -> list[str]:
        return [row["precision"], str(row["n_runs"]),
                *(_percent(row[c]) for c in TABLE4_COLUMNS[2:6]),
                *(_percent(row[c], "–") for c in TABLE4_COLUMNS[6:])]
    _write(table, out_stem, "Table 4: the unified law without and with the D term (mean relative error)",
           "Without D: δ = k · (log2 G)^γG / N^γN. Held out: the runs of the largest D, predicted by a refit "
           "without them.", markdown,
           ["precision", "runs", "without D", "with D", "held-out largest D, without D",
            "held-out largest D, with D", "paper without D", "paper with D"])
    return table


def opened_at(gap: pd.Series) -> float:
    """Fraction of the steps (``gap``, one value per step in order) after which the gap stays at or above half its
    final value; NaN when the final gap is not positive."""
    final = float(gap.iloc[-1])
    if not final > 0:
        return math.nan
    below = np.flatnonzero(gap.to_numpy(float) < final / 2)
    return 0.0 if below.size == 0 else float(below[-1] + 1) / len(gap)


def gap_opening(runs: str | Path, out_stem: str | Path) -> pd.DataFrame:
    """When the gap of each QAT run to the BF16 baseline of its cell opens, from the per-step metrics."""
    table = read_input(runs, "runs")
    table = table[~table.get("diverged", pd.Series(False, index=table.index)).astype(bool)]
    keys = ["size", "tokens_requested", "seed"]
    bases = {tuple(r[k] for k in keys): r["run_id"] for _, r in table[table["precision"] == BASELINE].iterrows()}
    curves: dict[str, pd.DataFrame] = {}

    def curve(run_id: str) -> pd.DataFrame:
        if run_id not in curves:
            curves[run_id] = read_input(metrics_path(Path(runs).parent, run_id), "metrics")[["step", "loss_ema"]]
        return curves[run_id]

    rows = []
    for _, run in table[table["precision"] != BASELINE].iterrows():
        base = bases.get(tuple(run[k] for k in keys))
        if base is None:
            continue
        both = curve(run["run_id"]).merge(curve(base), on="step", suffixes=("", "_bf16")).sort_values("step")
        gap = both["loss_ema"] - both["loss_ema_bf16"]
        at = {f"gap_{round(100 * f)}": float(gap.iloc[max(0, math.ceil(f * len(gap)) - 1)]) for f in GAP_FRACTIONS}
        rows.append({"run_id": run["run_id"], "size": run["size"], "N": int(run["N"]), "D": int(run["D"]),
                     "precision": run["precision"], "G": run["G"], "seed": int(run["seed"]), **at,
                     "opened_at": opened_at(gap)})
    out = pd.DataFrame(rows, columns=list(GAP_COLUMNS))

    def markdown(row: pd.Series) -> list[str]:
        return [row["run_id"], *(f"{row[f'gap_{round(100 * f)}']:.4f}" for f in GAP_FRACTIONS),
                f"{100 * row['opened_at']:.0f}%" if np.isfinite(row["opened_at"]) else "never"]
    _write(out, out_stem, "When the QAT–BF16 gap opens",
           "Smoothed training-loss gap to the BF16 baseline of the same size, tokens and seed at a share of the "
           "steps; opened at: the share of steps after which the gap stays at or above half its final value "
           "(never: the final gap is not positive).", markdown,
           ["run", *(f"gap at {round(100 * f)}%" for f in GAP_FRACTIONS), "opened at"])
    return out


TABLE_FUNCTIONS: dict[str, Callable[..., pd.DataFrame]] = {name: globals()[name] for name in TABLES}


def make_table(name: str, inputs: Mapping[str, str | Path], out_stem: str | Path) -> pd.DataFrame:
    """Write table ``name`` of ``TABLES`` as ``<out_stem>.csv`` and ``.md`` from its input files."""
    files = select_inputs("table", name, TABLES, inputs)
    return TABLE_FUNCTIONS[name](**files, out_stem=out_stem)
