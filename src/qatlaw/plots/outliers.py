"""Fig. 9 (``fig9_outliers``), the outliers behind the activation error, in two panels: (a) the mean per-token
input kurtosis per linear-layer type (bars; points: blocks), BF16 against W4A4, in the largest cell with both
(from ``outliers.parquet`` and ``runs.parquet``); (b) δ_W4A4 per quantization group with the FC2 input at 4 and
at 8 bit, in the largest cell with runs of both (from ``decomposition.parquet``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes

from qatlaw import paper
from qatlaw.grid import format_tokens
from qatlaw.plots.draw import empty, group_label, group_order, new_figure, si, styled, tidy_log, write_figure
from qatlaw.plots.inputs import METRIC, read_decomposition
from qatlaw.precision import BASELINE, LAYER_TYPES
from qatlaw.report_inputs import read_input


@styled
def fig9_outliers(outliers: str | Path, runs: str | Path, decomposition: str | Path, out_png: str | Path,
                  caption_grid: str, metric: str = METRIC) -> None:
    """(a) Input kurtosis per linear-layer type, BF16 vs W4A4, in the largest cell; (b) δ_W4A4 vs G with and
    without the FC2 input at 8 bit in the largest cell with runs of both."""
    out, table = read_input(outliers, "outliers"), read_input(runs, "runs")
    decomp = read_decomposition(decomposition, metric)
    fig, axes = new_figure(1, 2, (13, 5.2))
    notes = [_kurtosis_panel(axes[0, 0], out, table), _fc2_panel(axes[0, 1], decomp)]
    write_figure(fig, out_png, caption_grid, notes)


def _kurtosis_panel(ax: Axes, out: pd.DataFrame, table: pd.DataFrame) -> str:
    """Bars of the mean per-token input kurtosis per layer type (points: blocks), BF16 vs W4A4; a caption note."""
    facts = table[["run_id", "N", "tokens_requested"]].drop_duplicates("run_id")
    data = out.merge(facts, on="run_id", how="inner")
    data = data[data["precision"].isin([BASELINE, "W4A4"])]
    cells = data.groupby(["N", "tokens_requested"])["precision"].agg(set)
    cells = cells[cells.map(lambda s: {BASELINE, "W4A4"} <= s)]
    ax.set_title("(a) input kurtosis per linear layer")
    if cells.empty:
        empty(ax, "no cell with outlier statistics of both a BF16 and a W4A4 run")
        return ""
    n_max, t_max = max(cells.index)
    cell = data[(data["N"] == n_max) & (data["tokens_requested"] == t_max)]
    qat = cell[cell["precision"] == "W4A4"]
    numeric = [int(g) for g in qat["run_group"].astype(str).unique() if g.isdigit()]
    group = str(max(numeric)) if numeric else str(qat["run_group"].iloc[0])
    cell = cell[(cell["precision"] == BASELINE) | (cell["run_group"].astype(str) == group)]
    cell = cell.assign(run=np.where(cell["precision"] == BASELINE, "BF16", f"W4A4 {group_label(group)}"))
    hue_order = ["BF16", f"W4A4 {group_label(group)}"]
    layers = [t for t in LAYER_TYPES if t in set(cell["layer_type"])]
    sns.barplot(cell, x="layer_type", y="kurtosis_token", hue="run", order=layers, hue_order=hue_order, ax=ax,
                errorbar=None, palette=["0.55", "tab:orange"], alpha=0.8)
    with _seeded_numpy():  # seaborn jitters the points with numpy's global generator: the same figure every time
        sns.stripplot(cell, x="layer_type", y="kurtosis_token", hue="run", order=layers, hue_order=hue_order,
                      ax=ax, dodge=True, palette=["0.2", "saddlebrown"], size=4, legend=False)
    for bars in ax.containers:
        ax.bar_label(bars, fmt="%.3g", fontsize="small", label_type="center")
    ax.set_yscale("log")
    tidy_log(ax.yaxis)
    ax.set_xlabel("linear layer (input of)")
    ax.set_ylabel("kurtosis per token (Pearson, Gaussian = 3)")
    ax.axhline(3, color="0.5", ls=":", lw=1, label="Gaussian (3)")
    ax.set_title(f"(a) input kurtosis per linear layer, N = {si(n_max)}, D = {format_tokens(int(t_max))}")
    ax.legend(title=None, loc="best", fontsize="small")
    kurt = paper.constants()["fc2_input_kurtosis"]
    return (f"(a) bars: mean over {cell['layer_index'].nunique()} blocks (points) and seeds; "
            f"paper FC2 {kurt['BF16']} → {kurt['W4A4']}")


@contextlib.contextmanager
def _seeded_numpy(seed: int = 0) -> Iterator[None]:
    """numpy's global generator seeded for the block, and as it was after."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _fc2_panel(ax: Axes, decomp: pd.DataFrame) -> str:
    """δ_W4A4 with and without the FC2 input at 8 bit per group in the largest cell with runs of both (when no
    cell has both, the largest with either); a caption note, naming the missing variant in that case."""
    ax.set_title("(b) δ_W4A4 vs G, FC2 input at 4 or 8 bit")
    variants = {"delta_W4A4": ("W4A4", "tab:orange"), "delta_W4A4_fc2a8": ("W4A4, FC2 input 8 bit", "tab:blue")}
    finite = np.isfinite(decomp[list(variants)].astype(float))
    held = finite.groupby([decomp["N"], decomp["tokens_requested"]]).any()
    counts = held.sum(axis=1)
    if not counts.any():
        empty(ax, "no W4A4 or W4A4-fc2a8 runs")
        return ""
    n_max, t_max = max(counts.index[counts == counts.max()])
    present = [col for col in variants if held.loc[(n_max, t_max), col]]
    cell = decomp[(decomp["N"] == n_max) & (decomp["tokens_requested"] == t_max) & finite.any(axis=1)]
    order = group_order(cell)
    means = cell.groupby("group")[[*variants, "G"]].mean().reindex(order)
    x = np.arange(len(order))
    for col in present:
        label, color = variants[col]
        ax.plot(x, means[col], "o-", color=color, label=label, ms=7)
    for i, row in enumerate(means.itertuples()):
        if np.isfinite(row.delta_W4A4) and np.isfinite(row.delta_W4A4_fc2a8) and row.delta_W4A4 > 0:
            change = (row.delta_W4A4_fc2a8 - row.delta_W4A4) / row.delta_W4A4
            ax.annotate(f"{change:+.0%}", (i, max(row.delta_W4A4, row.delta_W4A4_fc2a8)), textcoords="offset points",
                        xytext=(0, 8), ha="center", fontsize="small")
    ax.axhline(0, color="0.6", lw=0.6)
    ax.set_xticks(x, [group_label(g, G) for g, G in zip(order, means["G"], strict=True)])
    ax.set_xlim(-0.5, len(order) - 0.5)
    ax.margins(y=0.2)
    ax.set_xlabel("quantization group (fine → coarse)")
    ax.set_ylabel("δ_W4A4 (nats)")
    ax.set_title(f"(b) δ_W4A4 vs G at N = {si(n_max)}, D = {format_tokens(int(t_max))}")
    ax.legend(loc="best", fontsize="small")
    missing = [label for col, (label, _) in variants.items() if col not in present]
    if missing:
        return f"(b) no cell has runs of every variant: {', '.join(missing)} missing"
    changes = paper.constants()["fc2a8_change"].items()
    cited = ", ".join(f"{change:.1%} at G={G}".replace("-", "−") for G, change in changes)
    return f"(b) labels: relative change of δ with the FC2 input at 8 bit (paper {cited})"
