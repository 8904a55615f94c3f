"""A run table from outside (:mod:`qatlaw.external`) beside the paper (``delta_vs_paper``): each measured δ of its
own QAT labels in ``runs.parquet`` against δ of the paper's INT4 W4A4 law at the run's N, D and G, with the
y = x line (the paper's law) and point size ∝ D/N.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import seaborn as sns

from qatlaw.plots.draw import DELTA_LABEL, new_figure, styled, write_empty, write_figure
from qatlaw.plots.inputs import METRIC
from qatlaw.report_inputs import read_input


@styled
def delta_vs_paper(runs: str | Path, out_png: str | Path, caption_grid: str, metric: str = METRIC) -> None:
    """Each measured δ of a run table's own QAT labels against δ of the paper's INT4 W4A4 law at its N, D and G
    (y = x: the paper's law), point size ∝ D/N."""
    from qatlaw import findings

    table = read_input(runs, "runs")
    labels = sorted(p for p in table["precision"].unique() if findings.outside(p))
    rows = findings.vs_paper(table, metric, labels)
    fig, axes = new_figure(1, 1, (6.4, 5.8))
    ax = axes[0, 0]
    if rows.empty:
        write_empty(fig, [ax], "no QAT runs of a label from outside this project", out_png, caption_grid)
        return
    colors = dict(zip(labels, sns.color_palette("tab10", len(labels))))
    ratio = rows["D"] / rows["N"]
    for label, part in rows.groupby("precision"):
        ax.scatter(part["paper"], part["delta"], s=20 + 60 * np.log10(ratio[part.index] / ratio.min() + 1),
                   color=colors[label], edgecolors="k", linewidths=0.5, label=f"{label} (median ratio "
                   f"{part['ratio'].median():.2g})", zorder=3)
    span = np.array([0.0, max(rows["paper"].max(), rows["delta"].max()) * 1.1])
    ax.plot(span, span, "--", color="0.4", label="y = x: the paper's INT4 law")
    ax.set_xlabel("δ of the paper's W4A4 law at the run's N, D, G (nats)")
    ax.set_ylabel(f"measured δ: {DELTA_LABEL}")
    ax.set_title("measured δ against the paper's INT4 law", fontsize="medium")
    ax.legend(fontsize="small", frameon=False)
    write_figure(fig, out_png, caption_grid, [f"δ of {metric}; point size ∝ D/N"])
