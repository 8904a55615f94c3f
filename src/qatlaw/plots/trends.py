"""δ against N, D and G, one log-log panel each (N at the largest D, D at the largest N, G at both): the observed
cells' means over seeds with their seed range as bars, one colour per quantization group, and the fitted unified
law as lines. Fig. 4 (``fig4_trends``: δ_W4A4, with the law's 90% bootstrap band) and Fig. 7
(``fig7_components``: weight-only W4A16 above, activation-only W16A4 below). Inputs: ``params.parquet``,
``decomposition.parquet`` and, for Fig. 4, ``bootstrap.parquet``.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import NullFormatter
from numpy.typing import ArrayLike

from qatlaw import fit
from qatlaw.plots.draw import (
    DELTA_LABEL,
    empty,
    group_colors,
    group_label,
    group_order,
    new_figure,
    si,
    styled,
    tidy_log,
    write_figure,
)
from qatlaw.plots.inputs import METRIC, cell_means, constants, law_band, law_text, read_decomposition
from qatlaw.report_inputs import read_input


@styled
def fig4_trends(params: str | Path, decomposition: str | Path, bootstrap: str | Path, out_png: str | Path,
                caption_grid: str, metric: str = METRIC) -> None:
    """δ_W4A4 vs N, vs D and vs G: observed cells with their seed range, and the fitted unified law with its 90%
    bootstrap band."""
    prm, decomp = read_input(params, "params"), read_decomposition(decomposition, metric)
    draws = read_input(bootstrap, "bootstrap")
    fig, axes = new_figure(1, 3, (14, 4.6))
    colors = group_colors(group_order(decomp))
    n_dropped = _trend_panels(axes[0], decomp, prm, "W4A4", "delta_W4A4", colors, draws)
    axes[0, 0].set_ylabel(f"δ_W4A4: {DELTA_LABEL}")
    fitted = constants(prm, "unified", "W4A4") is not None
    _trend_legend(fig, decomp, colors, fitted)
    fig.suptitle("δ_W4A4 vs N, D and G · fitted " + textwrap.fill(law_text(prm, "unified", "W4A4"), 80),
                 fontsize="medium")
    write_figure(fig, out_png, caption_grid, [_dropped(n_dropped)])


@styled
def fig7_components(params: str | Path, decomposition: str | Path, out_png: str | Path, caption_grid: str,
                    metric: str = METRIC) -> None:
    """Weight-only (W4A16) and activation-only (W16A4) δ vs N, D and G, observed and fitted."""
    prm, decomp = read_input(params, "params"), read_decomposition(decomposition, metric)
    fig, axes = new_figure(2, 3, (14, 8.5))
    colors = group_colors(group_order(decomp))
    notes = []
    for row, (precision, what) in enumerate((("W4A16", "weight-only"), ("W16A4", "activation-only"))):
        n = _trend_panels(axes[row], decomp, prm, precision, f"delta_{precision}", colors)
        axes[row, 0].set_ylabel(f"δ_{precision} ({what}, nats)")
        for ax in axes[row]:
            ax.set_title(f"{precision}: {ax.get_title()}")
        notes.append(f"{precision}: {_dropped(n) or '0 dropped'}; {law_text(prm, 'unified', precision)}")
    _trend_legend(fig, decomp, colors, any(constants(prm, "unified", p) is not None for p in ("W4A16", "W16A4")))
    fig.suptitle("Weight-only (top) and activation-only (bottom) quantization error")
    write_figure(fig, out_png, caption_grid, notes)


def _observed(ax: Axes, rows: pd.DataFrame, x: str, color: tuple) -> None:
    """Observed cells: the mean over seeds, with a bar over the seeds' range where a cell has several."""
    pos = rows[rows["value"] > 0]
    ax.plot(pos[x], pos["value"], "o", color=color, ms=6)
    spread = pos[(pos["seeds"] > 1) & (pos["low"] > 0)]
    if len(spread):
        ax.errorbar(spread[x], spread["value"],
                    yerr=[spread["value"] - spread["low"], spread["high"] - spread["value"]],
                    fmt="none", ecolor=color, elinewidth=1.2, capsize=3)


def _trend_panels(axes: Sequence[Axes], decomp: pd.DataFrame, params: pd.DataFrame, precision: str,
                  column: str, colors: dict[str, tuple], draws: pd.DataFrame | None = None) -> int:
    """δ of one precision vs N (at the largest D), vs D (at the largest N) and vs G (at both) in three axes:
    observed means over seeds as points (bars: the seeds' range), the unified law as lines with its 90%
    bootstrap band where ``draws`` are given. Returns how many cells were dropped for δ ≤ 0."""
    def band(ax: Axes, grid: np.ndarray, N: ArrayLike, D: ArrayLike, G: ArrayLike, color: tuple) -> None:
        limits = None if draws is None else law_band(draws, "unified", precision, N, D, G)
        if limits is not None:
            ax.fill_between(grid, *limits, color=color, alpha=0.15, lw=0)

    cells = cell_means(decomp, column)
    law = constants(params, "unified", precision)
    if cells.empty:
        for ax in axes:
            empty(ax, f"no {precision} runs")
        return 0
    n_dropped = int((cells["value"] <= 0).sum())
    max_n, max_t = cells["N"].max(), cells["tokens_requested"].max()
    at_t, at_n = cells[cells["tokens_requested"] == max_t], cells[cells["N"] == max_n]
    d_label = si(at_t["D"].mean())
    panels = (
        (axes[0], at_t, "N", f"vs N at D = {d_label} tokens", "N (non-embedding parameters)"),
        (axes[1], at_n, "D", f"vs D at N = {si(max_n)}", "D (training tokens)"),
    )
    for ax, sub, x, title, xlabel in panels:
        for group in [g for g in colors if g in set(sub["group"])]:
            rows = sub[sub["group"] == group].sort_values(x)
            _observed(ax, rows, x, colors[group])
            if law is not None and rows[x].nunique() > 1:
                grid = np.geomspace(rows[x].min(), rows[x].max(), 64)
                other = {c: np.exp(np.interp(np.log(grid), np.log(rows[x]), np.log(rows[c])))
                         for c in ("N", "D", "G") if c != x}
                point = {x: grid, **other}
                ax.plot(grid, fit.predict_delta(law, point["N"], point["D"], point["G"]), "-",
                        color=colors[group], lw=1.5)
                band(ax, grid, point["N"], point["D"], point["G"], colors[group])
        _finish_trend(ax, sub, x, title, xlabel, law is not None)
    ax = axes[2]
    sub = at_n[at_n["tokens_requested"] == max_t].sort_values("G")
    for group in [g for g in colors if g in set(sub["group"])]:
        _observed(ax, sub[sub["group"] == group], "G", colors[group])
    if law is not None and sub["G"].nunique() > 1:
        grid = np.geomspace(sub["G"].min(), sub["G"].max(), 64)
        n_fix, d_fix = sub["N"].mean(), sub["D"].mean()
        ax.plot(grid, fit.predict_delta(law, n_fix, d_fix, grid), "-", color="0.25", lw=1.5)
        band(ax, grid, n_fix, d_fix, grid, (0.25, 0.25, 0.25))
    _finish_trend(ax, sub, "G", f"vs G at N = {si(max_n)}, D = {si(sub['D'].mean()) if len(sub) else '–'}",
                  "G (elements per quantization group)", law is not None)
    return n_dropped


def _finish_trend(ax: Axes, sub: pd.DataFrame, x: str, title: str, xlabel: str, fitted: bool) -> None:
    """Axes, ticks and title of a trend panel, or an explanation when it has nothing to show."""
    ax.set_title(title)
    if not (sub["value"] > 0).any() and not (fitted and sub[x].nunique() > 1):
        empty(ax, f"no δ > 0 here ({len(sub)} cells, all δ ≤ 0)" if len(sub) else "no runs here")
        return
    if not (sub["value"] > 0).any():
        ax.text(0.5, 0.95, "law only: every δ ≤ 0 here", ha="center", va="top", transform=ax.transAxes,
                color="0.35")
    ax.set_xlabel(xlabel)
    channel_G = set(sub.loc[sub["group"] == "channel", "G"])
    _log_x(ax, sub[x], 2 if x == "G" else 10, si if x != "G" else
           lambda g: f"{g:.0f}" + ("\n(channel)" if g in channel_G else ""))
    ax.set_yscale("log")
    tidy_log(ax.yaxis)
    if sub[x].nunique() == 1:
        ax.set_xlim(sub[x].iloc[0] / 1.5, sub[x].iloc[0] * 1.5)


def _trend_legend(fig: Figure, decomp: pd.DataFrame, colors: dict[str, tuple], fitted: bool) -> None:
    """Figure legend of the trend figures: one entry per group, and the law's line."""
    G_of = decomp.groupby("group")["G"].agg(lambda g: g.iloc[0] if g.nunique() == 1 else np.nan)
    handles = [Line2D([], [], color=c, marker="o", ls="-" if fitted else "",
                      label=group_label(g, G_of.get(g))) for g, c in colors.items()]
    handles += [Line2D([], [], color="0.3", marker="o", ls="",
                       label="observed (mean over seeds;\nbar: range of seeds)")]
    if fitted:
        handles += [Line2D([], [], color="0.3", ls="-", label="unified law (fit;\nband: 90% bootstrap)")]
    fig.legend(handles=handles, loc="outside right upper", frameon=False)


def _dropped(n: int) -> str:
    """Caption note for n cells left off a log axis."""
    return f"{n} dropped (δ≤0)" if n else ""


def _log_x(ax: Axes, values: Sequence[float], base: float, label: Callable[[float], str]) -> None:
    """Log x axis with ticks at the observed values (when few), labelled by ``label``."""
    ticks = sorted({float(v) for v in values if np.isfinite(v) and v > 0})
    ax.set_xscale("log", base=base)
    if 0 < len(ticks) <= 8:
        ax.xaxis.set_ticks(ticks, labels=[label(t) for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
