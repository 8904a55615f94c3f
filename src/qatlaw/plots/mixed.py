"""Beyond the paper: which single tensor at 8 bit lowers δ most (``mixed_layer_ranking``), from
``mixed_ranking.parquet``. One horizontal bar per override (best first, W4A4's before other bases): the mean
relative change of δ against its base precision in %, with the number of cells per bar and the paper's
W4A4-fc2a8 changes as vertical lines.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qatlaw import paper
from qatlaw.plots.draw import new_figure, styled, write_empty, write_figure
from qatlaw.plots.inputs import METRIC
from qatlaw.report_inputs import read_input


@styled
def mixed_layer_ranking(mixed_ranking: str | Path, out_png: str | Path, caption_grid: str,
                        metric: str = METRIC) -> None:
    """Mean relative change of δ when one tensor goes to 8 bit, per override (best first), with n per bar."""
    rank = read_input(mixed_ranking, "mixed_ranking")
    rank = rank[rank["metric"] == metric]
    rank = rank.assign(other_base=rank["base_precision"] != "W4A4").sort_values(
        ["other_base", "base_precision", "rank"], ignore_index=True)
    fig, axes = new_figure(1, 1, (8.5, 1.6 + 0.45 * max(len(rank), 3)))
    ax = axes[0, 0]
    if rank.empty:
        write_empty(fig, [ax], "no override runs in the grid", out_png, caption_grid)
        return
    labels = [f"{r.override} (on {r.base_precision})" for r in rank.itertuples()]
    values = 100 * rank["mean_relative_change"].astype(float)
    colors = ["tab:blue" if v < 0 else "tab:red" for v in values.fillna(0)]
    y = np.arange(len(rank))
    ax.barh(y, values.fillna(0), color=colors, alpha=0.8)
    span = float(np.nanmax(np.abs(values))) if values.notna().any() else 1.0
    for i, (value, n) in enumerate(zip(values, rank["n_relative"], strict=True)):
        text = f"n={int(n)}" if np.isfinite(value) else "n=0 (no base δ > 0)"
        ax.text((value if np.isfinite(value) else 0) + (0.02 * span if not value < 0 else -0.02 * span), i, text,
                va="center", ha="left" if not value < 0 else "right", fontsize="small")
    for (G, change), style in zip(paper.constants()["fc2a8_change"].items(), (":", "--"), strict=True):
        ax.axvline(100 * change, color="0.4", ls=style, lw=1, label=f"paper fc2a8, G={G}: {change:+.1%}")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    low = min(-50.0, float(np.nanmin(values)) if values.notna().any() else 0.0)
    high = max(10.0, float(np.nanmax(values)) if values.notna().any() else 0.0)
    ax.set_xlim(low - 0.25 * (high - low), high + 0.25 * (high - low))
    ax.set_xlabel("mean relative change of δ vs the base precision (%)")
    ax.set_title("Which single tensor at 8 bit lowers δ most (negative: less error)")
    ax.legend(loc="best", fontsize="small")
    write_figure(fig, out_png, caption_grid, ["mean over the cells where the base run has δ > 0"])
