"""The FP→QAT split (:mod:`qatlaw.split`), from the split runs of ``runs.parquet``: δ against the QAT fraction f
per cell, with the fitted split loss law, the measured optimum f* and the paper's f*(S)
(``split_loss_vs_fraction``), and the cells' f* against the tokens per parameter byte S beside the paper's
f*(S) = exp(−a / ln S) and this grid's fit of it (``split_optimum_vs_S``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns

from qatlaw import paper, split
from qatlaw.plots.draw import DELTA_LABEL, new_figure, si, styled, write_empty, write_figure
from qatlaw.plots.inputs import METRIC
from qatlaw.report_inputs import read_input

NO_OPTIMA = "no cell with 3 or more QAT fractions above 0: nothing to draw"  # why a split figure is empty


@styled
def split_loss_vs_fraction(runs: str | Path, out_png: str | Path, caption_grid: str, metric: str = METRIC) -> None:
    """δ against the QAT fraction f per cell (seeds as dots, their mean as a line, PTQ at f = 0), the fitted
    split loss law's curve where identified, the measured f* with its 90% interval and the paper's f*(S)."""
    deltas, optima = _split_inputs(runs, metric)
    if optima.empty:
        fig, axes = new_figure(1, 1, (6, 4))
        write_empty(fig, [axes[0, 0]], NO_OPTIMA, out_png, caption_grid)
        return
    ncols = min(3, len(optima))
    nrows = math.ceil(len(optima) / ncols)
    fig, axes = new_figure(nrows, ncols, (4.6 * ncols, 3.6 * nrows))
    a_paper = paper.constants()["split"]["optimum"]["a"]
    laws = {key: split.fit_loss_law(deltas, *key, n_boot=0)
            for key in optima[split.GROUP].drop_duplicates().itertuples(index=False)}
    notes = sorted({f"{law.precision} G{law.group}: {law.reason}" for law in laws.values() if not law.identified})
    for ax, r in zip(axes.flat, optima.itertuples()):
        cell = deltas[(deltas["precision"] == r.precision) & (deltas["group"] == r.group) &
                      (deltas["size"] == r.size) & (deltas["tokens_requested"] == r.tokens_requested)]
        trained = cell[cell[split.FRACTION] > 0]
        ax.scatter(cell[split.FRACTION], cell["delta"], s=14, color="0.45", zorder=3, label="runs (seeds)")
        mean = cell.groupby(split.FRACTION)["delta"].mean()
        ax.plot(mean.index, mean.to_numpy(), "-o", color="tab:blue", ms=4, label="seed mean")
        law = laws[(r.precision, r.group)]
        if law.identified:
            grid = np.linspace(trained[split.FRACTION].min(), 0.99, 100)
            ax.plot(grid, split.predict_delta(law.constants, r.N, r.S, grid), color="tab:orange", label="fitted law")
        if math.isfinite(r.f_low):
            ax.axvspan(r.f_low, r.f_high, color="tab:green", alpha=0.15)
        ax.axvline(r.f_star, color="tab:green", lw=1.5, label="f* (90% interval)")
        if r.S > 1:
            ax.axvline(split.optimum(r.S, a_paper), color="k", ls="--", lw=1, label="paper's f*(S)")
        low, high = trained["delta"].min(), trained["delta"].max()
        pad = 0.15 * (high - low) or 0.01
        ax.set_ylim(low - pad, high + pad)
        ptq = mean.get(0.0)
        if ptq is not None and ptq > high + pad:
            ax.annotate(f"PTQ δ = {ptq:.3g} ↑", (0.0, high + pad), xytext=(0.02, 0.92), textcoords="axes fraction",
                        fontsize="small", color="0.3")
        ax.set_xlim(-0.03, 1.03)
        ax.set_title(f"{r.precision} G{r.group}, {r.size}, D = {si(r.D)}, S = {r.S:.3g}", fontsize="medium")
        ax.set_xlabel("QAT fraction f (0: PTQ, 1: from scratch)")
        ax.set_ylabel(DELTA_LABEL)
    for ax in list(axes.flat)[len(optima):]:
        ax.set_visible(False)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside right upper", frameon=False)
    write_figure(fig, out_png, caption_grid, [f"δ of {metric}", *notes])


@styled
def split_optimum_vs_S(runs: str | Path, out_png: str | Path, caption_grid: str, metric: str = METRIC) -> None:
    """The cells' optimal QAT fraction f* (with 90% seed intervals) against the tokens per parameter byte S, the
    paper's f*(S) = exp(−a / ln S) beside this grid's fit of it."""
    _, optima = _split_inputs(runs, metric)
    fig, axes = new_figure(1, 1, (7.5, 5))
    ax = axes[0, 0]
    if optima.empty:
        write_empty(fig, [ax], NO_OPTIMA, out_png, caption_grid)
        return
    a_paper = paper.constants()["split"]["optimum"]["a"]
    S_all = optima["S"].to_numpy(float)
    low = max(1.5, S_all.min() / 3)  # f*(S) is defined for S > 1 only
    grid = np.geomspace(low, max(S_all.max() * 3, 10 * low), 200)
    ax.plot(grid, split.optimum(grid, a_paper), "k--", label=f"paper: a = {a_paper}")
    outside = int((S_all <= 1).sum())
    notes = [f"{outside} cells with S <= 1, outside the domain of f*(S)"] if outside else []
    groups = list(optima[split.GROUP].drop_duplicates().itertuples(index=False))
    palette = dict(zip(groups, sns.color_palette("tab10", len(groups))))
    for key in groups:
        cells = optima[(optima["precision"] == key[0]) & (optima["group"] == key[1])]
        color = palette[key]
        ax.plot(cells["S"], cells["f_star"], "o", color=color, label=f"{key[0]} G{key[1]}: cells")
        spread = cells[np.isfinite(cells["f_low"])]  # the seeds' 90% interval, or the range of 2 seeds
        ax.vlines(spread["S"], spread["f_low"], spread["f_high"], color=color)
        law = split.fit_optimum_law(optima, *key)
        if law.identified:
            low, high = law.intervals.get("a", (math.nan, math.nan))
            ax.plot(grid, split.optimum(grid, law.constants["a"]), color=color,
                    label=f"{key[0]} G{key[1]}: a = {law.constants['a']:.3g} [{low:.3g}, {high:.3g}]")
        else:
            notes.append(f"{key[0]} G{key[1]}: {law.reason}")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("S = D / (N · B/8), tokens per parameter byte")
    ax.set_ylabel("optimal QAT fraction f*")
    ax.set_title("f* against S (Dremov et al. 2025)", fontsize="medium")
    ax.legend(fontsize="small", frameon=False, loc="upper left")
    write_figure(fig, out_png, caption_grid, [f"δ of {metric}; bars: each cell's spread over seeds (90% interval, "
                                              "or the range of 2 seeds)", *notes])


def _split_inputs(runs: str | Path, metric: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The split runs' δ and the cells' optima (:mod:`qatlaw.split`) of a run table; empty without split runs."""
    table = read_input(runs, "runs", all_fractions=True)
    if not split.has_split(table):
        return pd.DataFrame(), pd.DataFrame()
    deltas = split.split_deltas(table, metric)
    return deltas, split.cell_optima(deltas)
