"""How well the laws fit: predicted against observed per run with the y = x line, runs held out of a refit
(largest N, largest D) marked, the mean relative errors in the titles and the fitted constants in a box. Fig. 5
(``fig5_fit``: δ_W4A4 of the unified law with each run's 90% bootstrap band; for a run table from outside, its
own QAT labels), Fig. 10 (``fig10_chinchilla``: BF16 loss, linear axes, point size ∝ D), Fig. 11
(``fig11_components_fit``: W4A16, W16A4) and Fig. 12 (``fig12_fc2_fit``: W4A4-fc2a8, W16A4-fc2a8); δ on log
axes. Inputs: ``predictions.parquet``, ``params.parquet`` and, for Fig. 5, ``bootstrap.parquet``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes

from qatlaw import paper
from qatlaw.plots.draw import empty, new_figure, styled, tidy_log, write_figure
from qatlaw.plots.inputs import law_band, law_text
from qatlaw.precision import BASELINE
from qatlaw.report_inputs import read_input

HELD_OUT_MARKERS = {"none": "o", "largest_N": "^", "largest_D": "s"}
HELD_OUT_COLORS = {"largest_N": "tab:red", "largest_D": "tab:green"}
HELD_OUT_LABELS = {"none": "in-sample fit", "largest_N": "held out: largest N", "largest_D": "held out: largest D"}


@styled
def fig5_fit(predictions: str | Path, params: str | Path, bootstrap: str | Path, out_png: str | Path,
             caption_grid: str) -> None:
    """Predicted vs observed δ_W4A4 of the unified law with its 90% bootstrap band, held-out refits marked; for a
    run table from outside without W4A4 runs, the same for each of its own QAT labels."""
    from qatlaw import findings

    labels = findings.outside_labels(read_input(params, "params"))
    w4a4 = read_input(predictions, "predictions")["precision"].eq("W4A4").any()
    if labels and not w4a4:
        _fit_figure(predictions, params, out_png, caption_grid, tuple(labels), "δ (nats)", bootstrap)
    else:
        _fit_figure(predictions, params, out_png, caption_grid, ("W4A4",), "δ_W4A4 (nats)", bootstrap)


@styled
def fig10_chinchilla(predictions: str | Path, params: str | Path, out_png: str | Path, caption_grid: str) -> None:
    """Predicted vs observed BF16 loss of the Chinchilla law; point size ∝ D."""
    preds, prm = read_input(predictions, "predictions"), read_input(params, "params")
    fig, axes = new_figure(1, 1, (6.2, 5.8))
    ax = axes[0, 0]
    note = _fit_scatter(ax, preds, prm, "chinchilla", BASELINE, False)
    rows = preds[(preds["law"] == "chinchilla") & (preds["held_out"] == "none")]
    if len(rows) > 1:
        mse = float((rows["residual"] ** 2).mean())
        r2 = 1 - float((rows["residual"] ** 2).sum() / ((rows["observed"] - rows["observed"].mean()) ** 2).sum())
        cited = paper.constants()["chinchilla_fit"]
        ax.set_title(ax.get_title() + f"\nMSE {mse:.2g}, R² {r2:.3f} (paper {cited['mse']}, {cited['r2']})",
                     fontsize="medium")
    ax.set_xlabel("observed BF16 loss (nats)")
    ax.set_ylabel("predicted BF16 loss (nats)")
    ax.set_aspect("equal", adjustable="box")
    _constants_box(ax, law_text(prm, "chinchilla", BASELINE))
    write_figure(fig, out_png, caption_grid, [note, "point size ∝ D"])


@styled
def fig11_components_fit(predictions: str | Path, params: str | Path, out_png: str | Path,
                         caption_grid: str) -> None:
    """Predicted vs observed δ of the weight-only (W4A16) and activation-only (W16A4) laws."""
    _fit_figure(predictions, params, out_png, caption_grid, ("W4A16", "W16A4"), "δ (nats)")


@styled
def fig12_fc2_fit(predictions: str | Path, params: str | Path, out_png: str | Path, caption_grid: str) -> None:
    """Predicted vs observed δ of the laws with the FC2 input at 8 bit (W4A4-fc2a8, W16A4-fc2a8)."""
    _fit_figure(predictions, params, out_png, caption_grid, ("W4A4-fc2a8", "W16A4-fc2a8"), "δ (nats)")


def _fit_scatter(ax: Axes, preds: pd.DataFrame, params: pd.DataFrame, law: str, precision: str,
                 log: bool) -> str:
    """Predicted vs observed of one law with held-out runs marked and the y = x line; returns a caption note."""
    rows = preds[(preds["law"] == law) & (preds["precision"] == precision)]
    dropped = params.loc[(params["law"] == law) & (params["precision"] == precision), "n_dropped"]
    n_dropped = int(dropped.max()) if len(dropped) and np.isfinite(dropped.max()) else 0
    note = (f"{precision}: {n_dropped} run{'s' * (n_dropped != 1)} left out of the fit (diverged, or a NaN loss)"
            if n_dropped else "")
    if rows.empty:
        ax.set_title(precision)
        empty(ax, f"{law} law for {precision} not fitted (too few valid runs): no predictions")
        return note
    if log:  # a run whose δ came out ≤ 0 is in the fit but has no place on log axes: counted in the caption
        hidden = int((rows["observed"] <= 0).sum())
        rows = rows[rows["observed"] > 0]
        if hidden:
            note = "; ".join(filter(None, [note, f"{precision}: {hidden} run{'s' * (hidden != 1)} with δ ≤ 0 "
                                                 "fitted, not shown on log axes"]))
        if rows.empty:
            ax.set_title(precision)
            empty(ax, f"{law} law for {precision}: no run with δ > 0 to show on log axes")
            return note
    D = rows["D"].to_numpy(float)
    sizes = 30 + 170 * D / D.max() if law == "chinchilla" else np.full(len(rows), 50.0)
    for held, marker in HELD_OUT_MARKERS.items():
        part = (rows["held_out"] == held).to_numpy()
        if part.any():
            filled = {"facecolors": "tab:blue", "edgecolors": "k"} if held == "none" else \
                {"facecolors": "none", "edgecolors": HELD_OUT_COLORS[held]}
            ax.scatter(rows.loc[part, "observed"], rows.loc[part, "predicted"], s=sizes[part], marker=marker,
                       label=f"{HELD_OUT_LABELS[held]} ({int(part.sum())})", alpha=0.8, linewidths=1.2, **filled)
    both = pd.concat([rows["observed"], rows["predicted"]])
    low, high = both.min(), both.max()
    if log:
        pad = max((high / low) ** 0.08, 1.2)
        lims = (low / pad, high * pad)
    else:
        pad = max(0.05 * (high - low), 0.01)
        lims = (low - pad, high + pad)
    ax.plot(lims, lims, "--", color="0.4", lw=1, label="y = x")
    ax.set_xlim(lims)
    ax.set_ylim(lims)
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
        tidy_log(ax.xaxis)
        tidy_log(ax.yaxis)
    inside = rows[rows["held_out"] == "none"]
    title = f"{precision}: mean rel. error {inside['rel_error'].mean():.1%} (n={len(inside)})"
    for held in ("largest_N", "largest_D"):
        part = rows[rows["held_out"] == held]
        if len(part):
            title += f"\nheld-out {held.split('_')[1]}: {part['rel_error'].mean():.1%} (n={len(part)})"
    if (rows["held_out"] == "none").all():
        title += "\nno held-out refit (too few N or D without the largest)"
    ax.set_title(title, fontsize="medium")
    ax.legend(loc="upper left", fontsize="small", framealpha=0.9)
    return note


def _constants_box(ax: Axes, text: str) -> None:
    """The fitted constants in the lower right corner of a fit panel (where a good fit has no points)."""
    ax.text(0.98, 0.02, text.replace(" · ", "\n").replace(" (", "\n("), transform=ax.transAxes, ha="right",
            va="bottom", fontsize="x-small", bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85,
                                                   "edgecolor": "0.8"})


def _band_bars(ax: Axes, preds: pd.DataFrame, draws: pd.DataFrame, precision: str) -> bool:
    """Vertical bars over the in-sample predictions of the unified law: its 90% bootstrap band at each run."""
    rows = preds[(preds["law"] == "unified") & (preds["precision"] == precision) & (preds["held_out"] == "none")]
    limits = None if rows.empty else law_band(draws, "unified", precision, rows["N"].to_numpy(float),
                                              rows["D"].to_numpy(float), rows["G"].to_numpy(float))
    if limits is None:
        return False
    ax.vlines(rows["observed"], *limits, color="tab:blue", alpha=0.35, lw=2, zorder=1)
    return True


def _fit_figure(predictions: str | Path, params: str | Path, out_png: str | Path, caption_grid: str,
                precisions: Sequence[str], what: str, bootstrap: str | Path | None = None) -> None:
    """One fit-quality panel of the unified law per precision, on log axes (with ``bootstrap``: each in-sample
    prediction's 90% band as a bar)."""
    preds, prm = read_input(predictions, "predictions"), read_input(params, "params")
    draws = None if bootstrap is None else read_input(bootstrap, "bootstrap")
    fig, axes = new_figure(1, len(precisions), (5.6 * len(precisions), 5.4))
    notes = []
    for ax, precision in zip(axes[0], precisions, strict=True):
        if draws is not None and _band_bars(ax, preds, draws, precision):
            notes.append("bars: 90% bootstrap band of the law at each run")
        notes.append(_fit_scatter(ax, preds, prm, "unified", precision, True))
        _constants_box(ax, law_text(prm, "unified", precision))
        ax.set_xlabel(f"observed {what}")
        ax.set_ylabel(f"predicted {what}")
        ax.set_aspect("equal", adjustable="box")
    write_figure(fig, out_png, caption_grid, list(dict.fromkeys(notes)))
