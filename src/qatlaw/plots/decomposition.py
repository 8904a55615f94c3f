"""The W4A4 error against its weight-only (W4A16) and activation-only (W16A4) parts, from
``decomposition.parquet``: Fig. 6 (``fig6_decomposition``: δ_W4A4 against δ_W4A16 + δ_W16A4 per cell, one
colour per group, with the fitted slope k of ``decomposition_fit.parquet`` and the paper's) and Fig. 8
(``fig8_ratio``: heatmaps of R = δ_W16A4 / δ_W4A16 over N × token budget for the finest and the coarsest group,
without and with the FC2 input at 8 bit).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import TwoSlopeNorm

from qatlaw import paper
from qatlaw.grid import format_tokens
from qatlaw.plots.draw import (
    empty,
    group_colors,
    group_label,
    group_order,
    new_figure,
    si,
    styled,
    write_empty,
    write_figure,
)
from qatlaw.plots.inputs import METRIC, cell_means, read_decomposition
from qatlaw.report_inputs import read_input

RATIO_CMAP = mpl.colormaps["RdBu_r"].with_extremes(bad="white")  # NaN cells blank


@styled
def fig6_decomposition(decomposition: str | Path, decomposition_fit: str | Path, out_png: str | Path,
                       caption_grid: str, metric: str = METRIC) -> None:
    """δ_W4A4 vs δ_W4A16 + δ_W16A4 per cell, coloured by group, with the fitted and the paper's slope k."""
    decomp = read_decomposition(decomposition, metric)
    kfit = read_input(decomposition_fit, "decomposition_fit")
    kfit = kfit[kfit["metric"] == metric]
    fig, axes = new_figure(1, 1, (7.8, 5.8))
    ax = axes[0, 0]
    rows = decomp[np.isfinite(decomp[["delta_W4A4", "sum_components"]].astype(float)).all(axis=1)]
    if rows.empty:
        write_empty(fig, [ax], "no cell has W4A4, W4A16 and W16A4 runs", out_png, caption_grid)
        return
    colors = group_colors(group_order(decomp))
    for group, color in colors.items():
        part = rows[rows["group"] == group]
        if len(part):
            ax.scatter(part["sum_components"], part["delta_W4A4"], color=color, s=60, edgecolors="k",
                       linewidths=0.5, label=group_label(group), zorder=3)
    span = np.array([min(0.0, rows["sum_components"].min()), max(0.0, rows["sum_components"].max()) * 1.1])
    title = "δ_W4A4 vs δ_W4A16 + δ_W16A4"
    if len(kfit) and np.isfinite(kfit["k"].iloc[0]):
        fitrow = kfit.iloc[0]
        ax.plot(span, fitrow["k"] * span, "-", color="tab:red", label=f"fit: y = {fitrow['k']:.3f} x")
        title += (f"\nk = {fitrow['k']:.3f}, uncentred R² = {fitrow['r2']:.3f}, n = {int(fitrow['n'])} "
                  f"({int(fitrow['n_dropped'])} without all three δ)")
    k = paper.constants()["decomposition_k"]
    ax.plot(span, k * span, "--", color="0.4", label=f"paper: y = {k} x")
    ax.axhline(0, color="0.6", lw=0.6)
    ax.axvline(0, color="0.6", lw=0.6)
    ax.set_xlabel("δ_W4A16 + δ_W16A4 (nats)")
    ax.set_ylabel("δ_W4A4 (nats)")
    ax.set_title(title, fontsize="medium")
    ax.legend(loc="best", fontsize="small", framealpha=0.9)
    write_figure(fig, out_png, caption_grid)


@styled
def fig8_ratio(decomposition: str | Path, out_png: str | Path, caption_grid: str, metric: str = METRIC) -> None:
    """Heatmaps of R = δ_W16A4 / δ_W4A16 over (N, D) for the finest and coarsest group, without and with the
    FC2 input at 8 bit."""
    decomp = read_decomposition(decomposition, metric)
    order = group_order(decomp)
    groups = list(dict.fromkeys([order[0], order[-1]])) if order else []
    fig, axes = new_figure(2, max(len(groups), 1), (5.2 * max(len(groups), 1) + 1.2, 8.2))
    if not groups:
        write_empty(fig, axes.flat, "no decomposition rows", out_png, caption_grid)
        return
    ratios = {"ratio_R": ("delta_W16A4", "R = δ_W16A4 / δ_W4A16"),
              "ratio_R_fc2a8": ("delta_W16A4_fc2a8", "R = δ_W16A4-fc2a8 / δ_W4A16 (FC2 input 8 bit)")}
    tables, n_dropped = {}, 0
    for col, (numerator, _) in ratios.items():
        rows = decomp[decomp["group"].isin(groups) & np.isfinite(decomp[col].astype(float))]
        positive = (rows[numerator] > 0) & (rows["delta_W4A16"] > 0)
        n_dropped += int((~positive).sum())
        for group in groups:
            tables[(col, group)] = cell_means(rows[positive & (rows["group"] == group)], col)
    budgets = sorted(decomp["tokens_requested"].unique(), reverse=True)
    sizes = sorted(decomp["N"].unique())
    finite = pd.concat([t["value"] for t in tables.values()])
    spread = max(float(np.nanmax(np.abs(finite - 1))), 0.1) if len(finite) else 1.0
    norm = TwoSlopeNorm(1.0, max(0.0, 1 - spread), 1 + spread)
    for row, (col, (_, what)) in enumerate(ratios.items()):
        for c, group in enumerate(groups):
            ax, cells = axes[row, c], tables[(col, group)]
            ax.set_title(f"{what}\n{group_label(group)}", fontsize="medium")
            if cells.empty:
                empty(ax, f"no {group_label(group)} cell has both runs")
                continue
            grid = cells.pivot_table(index="tokens_requested", columns="N", values="value", aggfunc="mean")
            grid = grid.reindex(index=budgets, columns=sizes)
            _heatmap(ax, grid, norm)
            ax.set_xlabel("N (non-embedding parameters)")
            ax.set_ylabel("D (token budget)")
    fig.colorbar(ScalarMappable(norm, RATIO_CMAP), ax=axes, label="R (> 1: activation error dominates)", shrink=0.8)
    (low, high), (low8, high8) = (paper.constants()[key] for key in ("ratio_R", "ratio_R_fc2a8"))
    write_figure(fig, out_png, caption_grid,
                 [f"blank cells: a run is missing or diverged, or a δ ≤ 0 ({n_dropped} dropped)",
                  f"paper: R {low:.2f}–{high:.2f} without, {low8:.2f}–{high8:.2f} with FC2 input 8 bit"])


def _heatmap(ax: Axes, grid: pd.DataFrame, norm: TwoSlopeNorm) -> None:
    """Cells of ``grid`` (rows: token budgets, columns: N) coloured and annotated with their value; NaN blank."""
    values = grid.to_numpy(float)
    ax.imshow(np.ma.masked_invalid(values), cmap=RATIO_CMAP, norm=norm, aspect="auto")
    for (i, j), value in np.ndenumerate(values):
        if np.isfinite(value):
            dark = abs(norm(value) - 0.5) > 0.35
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if dark else "black")
    ax.set_xticks(range(grid.shape[1]), [si(n) for n in grid.columns])
    ax.set_yticks(range(grid.shape[0]), [format_tokens(int(t)) for t in grid.index])
    ax.grid(False)
