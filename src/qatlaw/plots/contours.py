"""The laws as contour maps over log10 N × log10 D at one fixed G (the argument, else the largest numeric group),
the trained grid's cells as points: Fig. 1 (``fig1_contour``: δ_W4A4 of the unified law, observed δ coloured on
the same scale) and Fig. 16 (``fig16_epm``: the effective parameter multiplier of W4A4 and, when fitted,
W4A4-fc2a8, with its EPM = 0.5 line). Inputs: ``params.parquet`` and ``decomposition.parquet``.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm, Normalize
from matplotlib.ticker import MaxNLocator

from qatlaw import fit, paper
from qatlaw.plots.draw import empty, new_figure, styled, write_empty, write_figure
from qatlaw.plots.inputs import METRIC, cell_means, constants, law_text, read_decomposition
from qatlaw.precision import BASELINE
from qatlaw.report_inputs import read_input


@styled
def fig1_contour(params: str | Path, decomposition: str | Path, out_png: str | Path, caption_grid: str,
                 G: int | None = None, metric: str = METRIC) -> None:
    """δ_W4A4 iso-lines of the unified law over log10 N × log10 D at a fixed G, observed runs as points."""
    prm, decomp = read_input(params, "params"), read_decomposition(decomposition, metric)
    G = _numeric_G(decomp, G)
    law = constants(prm, "unified", "W4A4")
    fig, axes = new_figure(1, 1, (7.5, 5.5))
    ax = axes[0, 0]
    cells = cell_means(decomp[decomp["G"] == G], "delta_W4A4")
    notes = [f"at G = {G}"]
    if law is None or G is None or G < 2 or decomp.empty:
        why = "unified W4A4 law not fitted (NaN constants): no contours" if law is None else "no W4A4 runs"
        write_empty(fig, [ax], why, out_png, caption_grid, notes)
        return
    log_n, log_d = _log10_range(decomp["N"]), _log10_range(decomp["D"])
    xx, yy = np.meshgrid(log_n, log_d)
    field = fit.predict_delta(law, 10.0**xx, 10.0**yy, G)
    positive = cells[cells["value"] > 0]
    if not np.isfinite(field).any():
        write_empty(fig, [ax], "the fitted W4A4 law is not finite over this range: no contours", out_png,
                    caption_grid, notes)
        return
    levels, norm = _levels(min(np.nanmin(field), positive["value"].min()) if len(positive) else np.nanmin(field),
                           max(np.nanmax(field), positive["value"].max()) if len(positive) else np.nanmax(field),
                           log=True)
    filled = ax.contourf(xx, yy, field, levels=levels, cmap="magma_r", norm=norm, alpha=0.85)
    lines = ax.contour(xx, yy, field, levels=levels, colors="k", linewidths=0.6)
    ax.clabel(lines, fmt=lambda v: f"{v:.3g}", fontsize="x-small")
    ax.scatter(np.log10(positive["N"]), np.log10(positive["D"]), c=positive["value"], cmap="magma_r", norm=norm,
               s=90, edgecolors="white", linewidths=1.5, zorder=3, label="observed W4A4 (colour: δ)")
    nonpos = cells[cells["value"] <= 0]
    if len(nonpos):
        ax.scatter(np.log10(nonpos["N"]), np.log10(nonpos["D"]), marker="x", c="tab:blue", s=70, zorder=3,
                   label=f"observed δ ≤ 0 ({len(nonpos)})")
        notes.append(f"{len(nonpos)} observed δ≤0 shown as ×")
    bar = fig.colorbar(filled, ax=ax, label="δ_W4A4 (nats)")
    bar.set_ticks(levels, labels=[f"{v:.2g}" for v in levels])
    bar.ax.minorticks_off()
    ax.set_xlabel("log10 N (non-embedding parameters)")
    ax.set_ylabel("log10 D (training tokens)")
    slope = law["gamma_N"] / law["gamma_D"] if law["gamma_D"] else math.inf
    cited = paper.constants()["unified"]["W4A4"]
    ax.set_title(f"δ_W4A4 contours at G = {G} (iso-line slope γN/γD = {slope:.3g}; "
                 f"paper {cited['gamma_N'] / cited['gamma_D']:.3g})")
    fig.suptitle(textwrap.fill(law_text(prm, "unified", "W4A4"), 95), fontsize="small")
    ax.legend(loc="best", fontsize="small", framealpha=0.9)
    write_figure(fig, out_png, caption_grid, notes)


@styled
def fig16_epm(params: str | Path, decomposition: str | Path, out_png: str | Path, caption_grid: str,
              G: int | None = None, metric: str = METRIC) -> None:
    """Effective parameter multiplier of the unified law over log10 N × log10 D at a fixed G, W4A4 and (when
    fitted) W4A4-fc2a8, with the EPM = 0.5 line (4 bit beats lossless 8 bit above it)."""
    prm, decomp = read_input(params, "params"), read_decomposition(decomposition, metric)
    G = _numeric_G(decomp, G)
    chin = constants(prm, "chinchilla", BASELINE)
    precisions = ["W4A4"] + (["W4A4-fc2a8"] if constants(prm, "unified", "W4A4-fc2a8") is not None else [])
    fig, axes = new_figure(1, len(precisions), (6.6 * len(precisions), 5.4))
    notes = [f"at G = {G}"]
    if decomp.empty or G is None or G < 2:
        write_empty(fig, [axes[0, 0]], "no decomposition rows to place the grid", out_png, caption_grid, notes)
        return
    xx, yy = np.meshgrid(_log10_range(decomp["N"]), _log10_range(decomp["D"]))
    fields = {}
    for ax, precision in zip(axes[0], precisions, strict=True):
        law = constants(prm, "unified", precision)
        ax.set_title(f"EPM of {precision}")
        if law is None or chin is None:
            empty(ax, f"{'unified ' + precision if law is None else 'Chinchilla'} law not fitted (NaN constants): "
                      "no EPM")
            continue
        field = fit.epm(10.0**xx, 10.0**yy, G, law, chin)
        if not np.isfinite(field).any():
            empty(ax, f"the EPM of {precision} is not finite over this range")
            continue
        fields[precision] = field
        levels, norm = _levels(np.nanmin(field), np.nanmax(field), log=False)
        filled = ax.contourf(xx, yy, field, levels=levels, cmap="viridis", norm=norm)
        ax.clabel(ax.contour(xx, yy, field, levels=levels[~np.isclose(levels, 0.5)], colors="w", linewidths=0.5),
                  fontsize="x-small", fmt=lambda v: f"{v:.2f}")
        if np.nanmin(field) < 0.5 < np.nanmax(field):
            ax.clabel(ax.contour(xx, yy, field, levels=[0.5], colors="red", linewidths=2.5), fmt="EPM = 0.5")
            where = "red line: EPM = 0.5"
        else:
            where = f"EPM {'>' if np.nanmin(field) >= 0.5 else '<'} 0.5 everywhere here"
        cells = decomp[decomp["G"] == G].drop_duplicates(["N", "D"])
        ax.scatter(np.log10(cells["N"]), np.log10(cells["D"]), marker="o", facecolors="none", edgecolors="k",
                   s=60, label="trained grid at this G")
        fig.colorbar(filled, ax=ax, label="EPM (effective parameter multiplier)")
        ax.set_title(f"EPM of {precision} ({where})", fontsize="medium")
        ax.set_xlabel("log10 N (non-embedding parameters)")
        ax.set_ylabel("log10 D (training tokens)")
        ax.legend(loc="lower right", fontsize="small")
    if len(fields) == 2:
        gain = fields["W4A4-fc2a8"] - fields["W4A4"]
        low, high = paper.constants()["fc2a8_epm_gain"]
        notes.append(f"FC2 input 8 bit raises EPM by {np.nanmin(gain):+.2f} to {np.nanmax(gain):+.2f} "
                     f"(paper {low:+.2f} to {high:+.2f})")
    notes.append("paper: W4A4 EPM > 0.5 in most cases")
    write_figure(fig, out_png, caption_grid, notes)


def _numeric_G(decomp: pd.DataFrame, G: int | None) -> int | None:
    """The fixed G of a contour figure: the argument, else the largest numeric group label, else the largest G."""
    if G is not None:
        return int(G)
    numeric = [int(g) for g in decomp["group"].unique() if str(g).isdigit()]
    if numeric:
        return max(numeric)
    finite = decomp["G"].dropna()
    return int(finite.max()) if len(finite) else None


def _levels(low: float, high: float, log: bool) -> tuple[np.ndarray, Normalize]:
    """About 10 contour levels over [low, high] and their colour norm; log-spaced (when ``log``) if the range
    spans more than a decade."""
    if not high > low:
        high = low + (0.1 * abs(low) or 1.0)
    if log and low > 0 and high / low > 10:
        levels = np.geomspace(low, high, 10)
        return levels, LogNorm(levels[0], levels[-1])
    levels = MaxNLocator(10).tick_values(low, high)
    return levels, Normalize(levels[0], levels[-1])


def _log10_range(values: pd.Series, pad: float = 0.5) -> np.ndarray:
    """64 points over log10 of the values, padded by ``pad`` decades on both sides."""
    logs = np.log10(values[values > 0].astype(float))
    return np.linspace(logs.min() - pad, logs.max() + pad, 64)
