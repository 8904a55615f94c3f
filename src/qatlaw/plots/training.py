"""Beyond the paper: training curves (``training_curves``) of every precision in one cell of ``runs.parquet``,
from each run's ``metrics.parquet``: the smoothed training loss against the tokens seen (left) and its gap to BF16
at the same step, the δ trajectory (right).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import seaborn as sns

from qatlaw.grid import format_tokens
from qatlaw.plots.draw import empty, group_label, new_figure, si, styled, write_empty, write_figure
from qatlaw.precision import BASELINE
from qatlaw.report_inputs import metrics_path, read_input

PRECISION_ORDER = (BASELINE, "W4A4", "W4A16", "W16A4", "W4A4-fc2a8", "W16A4-fc2a8")


@styled
def training_curves(runs: str | Path, out_png: str | Path, caption_grid: str) -> None:
    """Smoothed training loss vs tokens of every precision in one cell (largest size and budget, smallest
    numeric group, smallest seed) and its gap to BF16; metrics from ``runs/<run_id>/metrics.parquet`` beside
    ``runs`` (or ``restored/runs/<run_id>/``: :func:`qatlaw.reference.metrics_path`)."""
    table = read_input(runs, "runs")
    fig, axes = new_figure(1, 2, (13, 5))
    if table.empty:
        write_empty(fig, axes.flat, "empty run table", out_png, caption_grid)
        return
    table = table.assign(N=pd.to_numeric(table["N"]).astype(float), group=table["group"].astype(str))
    top = table[table["N"] == table["N"].max()]
    top = top[top["tokens_requested"] == top["tokens_requested"].max()]
    top = top[top["seed"] == top["seed"].min()]
    groups = top.loc[top["precision"] != BASELINE, "group"]
    numeric = sorted(int(g) for g in groups.unique() if g.isdigit())
    group = str(numeric[0]) if numeric else (groups.iloc[0] if len(groups) else None)
    cell = top[(top["precision"] == BASELINE) | (top["group"] == group)]
    cell = cell.sort_values("precision", key=lambda column: column.map(_precision_key))
    curves = {r.precision: read_input(metrics_path(Path(runs).parent, r.run_id), "metrics")
              for r in cell.itertuples()}
    palette = dict(zip(curves, sns.color_palette("tab10", len(curves)), strict=True))
    base = curves.get(BASELINE)
    for precision, m in curves.items():
        is_base = precision == BASELINE
        style = {"color": "k" if is_base else palette[precision], "lw": 2 if is_base else 1.3, "label": precision}
        axes[0, 0].plot(m["tokens"], m["loss_ema"], **style)
        if base is not None and precision != BASELINE:
            gap = m.merge(base, on="step", suffixes=("", "_bf16"))
            axes[0, 1].plot(gap["tokens"], gap["loss_ema"] - gap["loss_ema_bf16"], **style)
    row = cell.iloc[0]
    where = f"{row['size']} (N = {si(row['N'])}), budget {format_tokens(int(row['tokens_requested']))}"
    axes[0, 0].set_title(f"smoothed training loss, {where}, {group_label(group) if group else 'BF16 only'}",
                         fontsize="medium")
    axes[0, 0].set_ylabel("loss_ema (nats)")
    axes[0, 1].axhline(0, color="k", lw=0.8)
    axes[0, 1].set_title("gap to BF16 at the same step (the δ trajectory)", fontsize="medium")
    axes[0, 1].set_ylabel("loss_ema − BF16 loss_ema (nats)")
    if base is None:
        empty(axes[0, 1], "no BF16 run in this cell")
    for ax in axes[0]:
        ax.set_xlabel("D seen (tokens)")
        ax.xaxis.set_major_formatter(lambda v, _: si(v))
    if len(curves) > 1 or base is None:
        axes[0, 1].set_ylim(_gap_limits(curves, base))
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside right upper", frameon=False)
    write_figure(fig, out_png, caption_grid, [f"runs of seed {int(row['seed'])}",
                                              "right: y range over the last 90% of steps"])


def _precision_key(precision: str) -> tuple[int, str]:
    """Sort key: the paper's precisions in PRECISION_ORDER, then the others by name."""
    return (PRECISION_ORDER.index(precision) if precision in PRECISION_ORDER else len(PRECISION_ORDER), precision)


def _gap_limits(curves: Mapping[str, pd.DataFrame], base: pd.DataFrame | None) -> tuple[float, float]:
    """y range of the gap panel over the last 90% of steps (the first steps' gaps dwarf the final δ)."""
    if base is None:
        return (-1.0, 1.0)
    gaps = []
    for precision, m in curves.items():
        if precision != BASELINE:
            gap = m.merge(base, on="step", suffixes=("", "_bf16"))
            gap = gap[gap["step"] > 0.1 * gap["step"].max()]
            gaps.append(gap["loss_ema"] - gap["loss_ema_bf16"])
    values = pd.concat(gaps) if gaps else pd.Series([0.0])
    low, high = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
    pad = 0.1 * (high - low) or 0.01
    return low - pad, high + pad
