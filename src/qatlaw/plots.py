"""The paper's figures (and two beyond it), drawn from the workflow's Parquet outputs only, never by training.

Every figure is one function ``<name>(<inputs>, out_png, caption_grid)`` that writes ``out_png`` and an SVG
with the same stem (reproducible: no dates, fixed SVG ids). ``qatlaw.outputs.FIGURES`` names the input files each
figure reads (keys of ``qatlaw.outputs.INPUTS``, the default paths); :func:`make_figure` is the one entry point for the workflow.
``caption_grid`` (see :func:`qatlaw.outputs.grid_caption`) is printed under the figure with notes on what was left out, e.g.
"2 dropped (δ≤0)": a non-positive δ cannot go on a log axis. Missing precisions, unfitted laws (NaN constants)
and empty panels are drawn as explanations, never errors; only a missing input file or a missing column is
a :class:`qatlaw.report_inputs.PlotError`. The paper's numbers come from :func:`qatlaw.paper.constants`.

N is the non-embedding parameter count, D the training tokens, G the quantization group length (for
``channel`` the hidden size), δ a loss difference against the BF16 baseline in nats.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import textwrap
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm, Normalize, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import (
    FixedLocator,
    FuncFormatter,
    LogLocator,
    MaxNLocator,
    NullFormatter,
    NullLocator,
)
from numpy.typing import ArrayLike

from qatlaw import fit, paper, split
from qatlaw.config import schema_default
from qatlaw.grid import format_tokens
from qatlaw.io import atomic_path
from qatlaw.outputs import EXTERNAL_FIGURES, FIGURES, SPLIT_FIGURES
from qatlaw.precision import BASELINE, LAYER_TYPES
from qatlaw.report_inputs import CONSTANT_SYMBOLS, PlotError, metrics_path, read_input, select_inputs

PRECISION_ORDER = (BASELINE, "W4A4", "W4A16", "W16A4", "W4A4-fc2a8", "W16A4-fc2a8")
METRIC = schema_default("fit", "metric")  # default δ: of the config's default metric (fit.metric)
HELD_OUT_MARKERS = {"none": "o", "largest_N": "^", "largest_D": "s"}
HELD_OUT_COLORS = {"largest_N": "tab:red", "largest_D": "tab:green"}
HELD_OUT_LABELS = {"none": "in-sample fit", "largest_N": "held out: largest N", "largest_D": "held out: largest D"}
DELTA_LABEL = "δ (loss − BF16 loss, nats)"
STYLE = {
    **sns.axes_style("whitegrid"),
    **sns.plotting_context("paper", font_scale=1.15),
    "svg.hashsalt": "qatlaw",  # fixed SVG element ids
    "svg.fonttype": "none",  # text stays text: searchable, smaller files
    "figure.dpi": 100,
    "savefig.dpi": 150,
}
CAPTION_WIDTH = 120  # characters per caption line
RATIO_CMAP = mpl.colormaps["RdBu_r"].with_extremes(bad="white")  # NaN cells blank


# ---------------------------------------------------------------------------------------------- inputs

def _decomposition(path: str | Path, metric: str) -> pd.DataFrame:
    """Rows of ``metric`` from ``decomposition.parquet``, with numeric N, D and G."""
    df = read_input(path, "decomposition")
    df = df[df["metric"] == metric].copy()
    for col in ("N", "D", "G", "tokens_requested"):
        df[col] = pd.to_numeric(df[col]).astype(float)
    df["group"] = df["group"].astype(str)
    return df


def _cells(decomp: pd.DataFrame, column: str) -> pd.DataFrame:
    """Mean of ``column`` over seeds per (size, tokens_requested, group) with finite values, as ``value``, with
    the lowest and highest seed (``low``, ``high``) and the number of seeds (``seeds``)."""
    keys = ["size", "tokens_requested", "group"]
    rows = decomp[np.isfinite(decomp[column].astype(float))]
    out = rows.groupby(keys, as_index=False).agg(N=("N", "mean"), D=("D", "mean"), G=("G", "mean"),
                                                   value=(column, "mean"), low=(column, "min"),
                                                   high=(column, "max"), seeds=(column, "size"))
    return out.sort_values(["N", "tokens_requested", "G"], ignore_index=True)


def constants(params: pd.DataFrame, law: str, precision: str) -> dict[str, float] | None:
    """Fitted constants of a law, or None when it is absent or was not fitted (NaN); a unified law fitted at one G
    keeps its γG NaN (not identified)."""
    rows = params[(params["law"] == law) & (params["precision"] == precision)]
    values = dict(zip(rows["constant"], rows["value"].astype(float), strict=True))
    fitted = [v for c, v in values.items() if not (law in ("unified", "no_D") and c == "gamma_G")]
    return values if values and all(np.isfinite(fitted)) else None


def _intervals(params: pd.DataFrame, law: str, precision: str) -> dict[str, tuple[float, float]]:
    """Finite bootstrap intervals of a law's constants."""
    rows = params[(params["law"] == law) & (params["precision"] == precision)]
    return {r.constant: (float(r.ci_low), float(r.ci_high)) for r in rows.itertuples()
            if np.isfinite(float(r.ci_low)) and np.isfinite(float(r.ci_high))}


def law_text(params: pd.DataFrame, law: str, precision: str) -> str:
    """The fitted constants of a law with their 90% intervals, e.g. 'k=0.158 [0.12, 0.2] · γN=0.219 ...'."""
    values = constants(params, law, precision)
    if values is None:
        return f"{law} law for {precision} not fitted"
    ci = _intervals(params, law, precision)
    parts = []
    for name, value in values.items():
        if not np.isfinite(value):
            parts.append(f"{CONSTANT_SYMBOLS.get(name, name)} not identified (one G; k at that G)")
            continue
        interval = f" [{ci[name][0]:.3g}, {ci[name][1]:.3g}]" if name in ci else ""
        parts.append(f"{CONSTANT_SYMBOLS.get(name, name)}={value:.3g}{interval}")
    return " · ".join(parts) + (" (90% bootstrap CI)" if ci else " (no bootstrap CI)")


# ---------------------------------------------------------------------------------------------- drawing

def _styled(func: Callable[..., None]) -> Callable[..., None]:
    """Run a figure function under the package's plot style."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs) -> None:
        with mpl.rc_context(STYLE):
            func(*args, **kwargs)
    return wrapper


def _figure(nrows: int, ncols: int, size: tuple[float, float]) -> tuple[Figure, np.ndarray]:
    """A constrained-layout figure on the Agg canvas and its axes as a 2-D array."""
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, np.atleast_2d(fig.subplots(nrows, ncols, squeeze=False))


def _save(fig: Figure, out_png: str | Path, caption_grid: str, notes: Sequence[str] = ()) -> None:
    """Add the caption line (grid and notes) under the figure and write out_png and the SVG beside it."""
    out_png = Path(out_png)
    if out_png.suffix != ".png":
        raise PlotError(f"{out_png}: figure output must end in .png")
    fig.text(0.5, 0.0, _caption([part for part in (caption_grid, *notes) if part]), ha="center", va="top",
             fontsize="small", color="0.3")
    for path, fmt, metadata in ((out_png, "png", {"Software": None}),
                                (out_png.with_suffix(".svg"), "svg", {"Date": None, "Creator": None})):
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, bbox_inches="tight", pad_inches=0.15, metadata=metadata)


def _caption(parts: Sequence[str]) -> str:
    """Parts joined by ' · ' into lines of at most CAPTION_WIDTH characters, breaking between parts where possible."""
    lines: list[str] = []
    for part in parts:
        if lines and len(lines[-1]) + 3 + len(part) <= CAPTION_WIDTH:
            lines[-1] += " · " + part
        else:
            lines.append(part)
    return "\n".join(textwrap.fill(line, CAPTION_WIDTH) for line in lines)


def _empty(ax: Axes, message: str) -> None:
    """An axes that explains why it has no data."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.text(0.5, 0.5, textwrap.fill(message, 40), ha="center", va="center", transform=ax.transAxes,
            color="0.35")


def si(x: float) -> str:
    """Short form of a count: 123200 -> '123K', 2.5e9 -> '2.5B'."""
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


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


def _tidy_log(axis: Axis) -> None:
    """Readable ticks on a log axis whose limits are final: 3-5 plain numbers when it spans less than a
    decade, else the decades with 2 and 5 between them."""
    low, high = axis.get_view_interval()
    if high / low < 10:
        axis.set_major_locator(FixedLocator([t for t in MaxNLocator(4).tick_values(low, high) if low <= t <= high]))
        axis.set_minor_locator(NullLocator())
    else:
        axis.set_minor_locator(LogLocator(10, subs=(2.0, 5.0)))
        axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))


def _group_order(df: pd.DataFrame) -> list[str]:
    """Group labels from fine to coarse (by their median G)."""
    return list(df.groupby("group")["G"].median().sort_values(kind="stable").index)


def _group_colors(groups: Sequence[str]) -> dict[str, tuple]:
    """One colour per group label, fine to coarse."""
    return dict(zip(groups, sns.color_palette("viridis", len(groups)), strict=True))


def _group_label(group: str, G: float | None = None) -> str:
    """'G=32', or 'channel (G=64)' when the channel group has one G."""
    if group == "channel":
        return "channel" if G is None or not np.isfinite(G) else f"channel (G={int(G)})"
    return f"G={group}"


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


# ---------------------------------------------------------------------------------------------- trends

def law_band(draws: pd.DataFrame, law: str, precision: str, N: ArrayLike, D: ArrayLike,
             G: ArrayLike) -> tuple[np.ndarray, np.ndarray] | None:
    """5th and 95th percentile of a δ law's prediction over its bootstrap draws (None without draws)."""
    preds = fit.draw_predictions(draws, law, precision, N, D, G)
    if preds is None:
        return None
    low, high = np.quantile(preds, fit.BOOT_QUANTILES, axis=0)
    return low, high


def _observed(ax: Axes, rows: pd.DataFrame, x: str, color: tuple) -> None:
    """Observed cells: the mean over seeds, with a bar over the seeds' range where a cell has several."""
    pos = rows[rows["value"] > 0]
    ax.plot(pos[x], pos["value"], "o", color=color, ms=6)
    spread = pos[(pos["seeds"] > 1) & (pos["low"] > 0)]
    if len(spread):
        ax.errorbar(spread[x], spread["value"], yerr=[spread["value"] - spread["low"], spread["high"] - spread["value"]],
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

    cells = _cells(decomp, column)
    law = constants(params, "unified", precision)
    if cells.empty:
        for ax in axes:
            _empty(ax, f"no {precision} runs")
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
        _empty(ax, f"no δ > 0 here ({len(sub)} cells, all δ ≤ 0)" if len(sub) else "no runs here")
        return
    if not (sub["value"] > 0).any():
        ax.text(0.5, 0.95, "law only: every δ ≤ 0 here", ha="center", va="top", transform=ax.transAxes,
                color="0.35")
    ax.set_xlabel(xlabel)
    channel_G = set(sub.loc[sub["group"] == "channel", "G"])
    _log_x(ax, sub[x], 2 if x == "G" else 10, si if x != "G" else
           lambda g: f"{g:.0f}" + ("\n(channel)" if g in channel_G else ""))
    ax.set_yscale("log")
    _tidy_log(ax.yaxis)
    if sub[x].nunique() == 1:
        ax.set_xlim(sub[x].iloc[0] / 1.5, sub[x].iloc[0] * 1.5)


def _trend_legend(fig: Figure, decomp: pd.DataFrame, colors: dict[str, tuple], fitted: bool) -> None:
    """Figure legend of the trend figures: one entry per group, and the law's line."""
    G_of = decomp.groupby("group")["G"].agg(lambda g: g.iloc[0] if g.nunique() == 1 else np.nan)
    handles = [Line2D([], [], color=c, marker="o", ls="-" if fitted else "",
                      label=_group_label(g, G_of.get(g))) for g, c in colors.items()]
    handles += [Line2D([], [], color="0.3", marker="o", ls="", label="observed (mean over seeds;\nbar: range of seeds)")]
    if fitted:
        handles += [Line2D([], [], color="0.3", ls="-", label="unified law (fit;\nband: 90% bootstrap)")]
    fig.legend(handles=handles, loc="outside right upper", frameon=False)


@_styled
def fig1_contour(params: str | Path, decomposition: str | Path, out_png: str | Path, caption_grid: str,
                 G: int | None = None, metric: str = METRIC) -> None:
    """δ_W4A4 iso-lines of the unified law over log10 N × log10 D at a fixed G, observed runs as points."""
    prm, decomp = read_input(params, "params"), _decomposition(decomposition, metric)
    G = _numeric_G(decomp, G)
    law = constants(prm, "unified", "W4A4")
    fig, axes = _figure(1, 1, (7.5, 5.5))
    ax = axes[0, 0]
    cells = _cells(decomp[decomp["G"] == G], "delta_W4A4")
    notes = [f"at G = {G}"]
    if law is None or G is None or G < 2 or decomp.empty:
        _empty(ax, "unified W4A4 law not fitted (NaN constants): no contours" if law is None else "no W4A4 runs")
        _save(fig, out_png, caption_grid, notes)
        return
    log_n, log_d = _log10_range(decomp["N"]), _log10_range(decomp["D"])
    xx, yy = np.meshgrid(log_n, log_d)
    field = fit.predict_delta(law, 10.0**xx, 10.0**yy, G)
    positive = cells[cells["value"] > 0]
    if not np.isfinite(field).any():
        _empty(ax, "the fitted W4A4 law is not finite over this range: no contours")
        _save(fig, out_png, caption_grid, notes)
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
    _save(fig, out_png, caption_grid, notes)


@_styled
def fig4_trends(params: str | Path, decomposition: str | Path, bootstrap: str | Path, out_png: str | Path,
                caption_grid: str, metric: str = METRIC) -> None:
    """δ_W4A4 vs N, vs D and vs G: observed cells with their seed range, and the fitted unified law with its 90%
    bootstrap band."""
    prm, decomp = read_input(params, "params"), _decomposition(decomposition, metric)
    draws = read_input(bootstrap, "bootstrap")
    fig, axes = _figure(1, 3, (14, 4.6))
    colors = _group_colors(_group_order(decomp))
    n_dropped = _trend_panels(axes[0], decomp, prm, "W4A4", "delta_W4A4", colors, draws)
    axes[0, 0].set_ylabel(f"δ_W4A4: {DELTA_LABEL}")
    fitted = constants(prm, "unified", "W4A4") is not None
    _trend_legend(fig, decomp, colors, fitted)
    fig.suptitle("δ_W4A4 vs N, D and G · fitted " + textwrap.fill(law_text(prm, "unified", "W4A4"), 80),
                 fontsize="medium")
    _save(fig, out_png, caption_grid, [_dropped(n_dropped)])


@_styled
def fig7_components(params: str | Path, decomposition: str | Path, out_png: str | Path, caption_grid: str, metric: str = METRIC) -> None:
    """Weight-only (W4A16) and activation-only (W16A4) δ vs N, D and G, observed and fitted."""
    prm, decomp = read_input(params, "params"), _decomposition(decomposition, metric)
    fig, axes = _figure(2, 3, (14, 8.5))
    colors = _group_colors(_group_order(decomp))
    notes = []
    for row, (precision, what) in enumerate((("W4A16", "weight-only"), ("W16A4", "activation-only"))):
        n = _trend_panels(axes[row], decomp, prm, precision, f"delta_{precision}", colors)
        axes[row, 0].set_ylabel(f"δ_{precision} ({what}, nats)")
        for ax in axes[row]:
            ax.set_title(f"{precision}: {ax.get_title()}")
        notes.append(f"{precision}: {_dropped(n) or '0 dropped'}; {law_text(prm, 'unified', precision)}")
    _trend_legend(fig, decomp, colors, any(constants(prm, "unified", p) is not None for p in ("W4A16", "W16A4")))
    fig.suptitle("Weight-only (top) and activation-only (bottom) quantization error")
    _save(fig, out_png, caption_grid, notes)


# ---------------------------------------------------------------------------------------------- fit quality

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
        _empty(ax, f"{law} law for {precision} not fitted (too few valid runs): no predictions")
        return note
    if log:  # a run whose δ came out ≤ 0 is in the fit but has no place on log axes: counted in the caption
        hidden = int((rows["observed"] <= 0).sum())
        rows = rows[rows["observed"] > 0]
        if hidden:
            note = "; ".join(filter(None, [note, f"{precision}: {hidden} run{'s' * (hidden != 1)} with δ ≤ 0 "
                                                 "fitted, not shown on log axes"]))
        if rows.empty:
            ax.set_title(precision)
            _empty(ax, f"{law} law for {precision}: no run with δ > 0 to show on log axes")
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
        _tidy_log(ax.xaxis)
        _tidy_log(ax.yaxis)
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
    fig, axes = _figure(1, len(precisions), (5.6 * len(precisions), 5.4))
    notes = []
    for ax, precision in zip(axes[0], precisions, strict=True):
        if draws is not None and _band_bars(ax, preds, draws, precision):
            notes.append("bars: 90% bootstrap band of the law at each run")
        notes.append(_fit_scatter(ax, preds, prm, "unified", precision, True))
        _constants_box(ax, law_text(prm, "unified", precision))
        ax.set_xlabel(f"observed {what}")
        ax.set_ylabel(f"predicted {what}")
        ax.set_aspect("equal", adjustable="box")
    _save(fig, out_png, caption_grid, list(dict.fromkeys(notes)))


@_styled
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


@_styled
def fig10_chinchilla(predictions: str | Path, params: str | Path, out_png: str | Path, caption_grid: str) -> None:
    """Predicted vs observed BF16 loss of the Chinchilla law; point size ∝ D."""
    preds, prm = read_input(predictions, "predictions"), read_input(params, "params")
    fig, axes = _figure(1, 1, (6.2, 5.8))
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
    _save(fig, out_png, caption_grid, [note, "point size ∝ D"])


@_styled
def fig11_components_fit(predictions: str | Path, params: str | Path, out_png: str | Path,
                         caption_grid: str) -> None:
    """Predicted vs observed δ of the weight-only (W4A16) and activation-only (W16A4) laws."""
    _fit_figure(predictions, params, out_png, caption_grid, ("W4A16", "W16A4"), "δ (nats)")


@_styled
def fig12_fc2_fit(predictions: str | Path, params: str | Path, out_png: str | Path, caption_grid: str) -> None:
    """Predicted vs observed δ of the laws with the FC2 input at 8 bit (W4A4-fc2a8, W16A4-fc2a8)."""
    _fit_figure(predictions, params, out_png, caption_grid, ("W4A4-fc2a8", "W16A4-fc2a8"), "δ (nats)")


# ---------------------------------------------------------------------------------------------- decomposition

@_styled
def fig6_decomposition(decomposition: str | Path, decomposition_fit: str | Path, out_png: str | Path,
                       caption_grid: str, metric: str = METRIC) -> None:
    """δ_W4A4 vs δ_W4A16 + δ_W16A4 per cell, coloured by group, with the fitted and the paper's slope k."""
    decomp = _decomposition(decomposition, metric)
    kfit = read_input(decomposition_fit, "decomposition_fit")
    kfit = kfit[kfit["metric"] == metric]
    fig, axes = _figure(1, 1, (7.8, 5.8))
    ax = axes[0, 0]
    rows = decomp[np.isfinite(decomp[["delta_W4A4", "sum_components"]].astype(float)).all(axis=1)]
    if rows.empty:
        _empty(ax, "no cell has W4A4, W4A16 and W16A4 runs")
        _save(fig, out_png, caption_grid)
        return
    colors = _group_colors(_group_order(decomp))
    for group, color in colors.items():
        part = rows[rows["group"] == group]
        if len(part):
            ax.scatter(part["sum_components"], part["delta_W4A4"], color=color, s=60, edgecolors="k",
                       linewidths=0.5, label=_group_label(group), zorder=3)
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
    _save(fig, out_png, caption_grid)


@_styled
def fig8_ratio(decomposition: str | Path, out_png: str | Path, caption_grid: str, metric: str = METRIC) -> None:
    """Heatmaps of R = δ_W16A4 / δ_W4A16 over (N, D) for the finest and coarsest group, without and with the
    FC2 input at 8 bit."""
    decomp = _decomposition(decomposition, metric)
    order = _group_order(decomp)
    groups = list(dict.fromkeys([order[0], order[-1]])) if order else []
    fig, axes = _figure(2, max(len(groups), 1), (5.2 * max(len(groups), 1) + 1.2, 8.2))
    if not groups:
        for ax in axes.flat:
            _empty(ax, "no decomposition rows")
        _save(fig, out_png, caption_grid)
        return
    ratios = {"ratio_R": ("delta_W16A4", "R = δ_W16A4 / δ_W4A16"),
              "ratio_R_fc2a8": ("delta_W16A4_fc2a8", "R = δ_W16A4-fc2a8 / δ_W4A16 (FC2 input 8 bit)")}
    tables, n_dropped = {}, 0
    for col, (numerator, _) in ratios.items():
        rows = decomp[decomp["group"].isin(groups) & np.isfinite(decomp[col].astype(float))]
        positive = (rows[numerator] > 0) & (rows["delta_W4A16"] > 0)
        n_dropped += int((~positive).sum())
        for group in groups:
            tables[(col, group)] = _cells(rows[positive & (rows["group"] == group)], col)
    budgets = sorted(decomp["tokens_requested"].unique(), reverse=True)
    sizes = sorted(decomp["N"].unique())
    finite = pd.concat([t["value"] for t in tables.values()])
    spread = max(float(np.nanmax(np.abs(finite - 1))), 0.1) if len(finite) else 1.0
    norm = TwoSlopeNorm(1.0, max(0.0, 1 - spread), 1 + spread)
    for row, (col, (_, what)) in enumerate(ratios.items()):
        for c, group in enumerate(groups):
            ax, cells = axes[row, c], tables[(col, group)]
            ax.set_title(f"{what}\n{_group_label(group)}", fontsize="medium")
            if cells.empty:
                _empty(ax, f"no {_group_label(group)} cell has both runs")
                continue
            grid = cells.pivot_table(index="tokens_requested", columns="N", values="value", aggfunc="mean")
            grid = grid.reindex(index=budgets, columns=sizes)
            _heatmap(ax, grid, norm)
            ax.set_xlabel("N (non-embedding parameters)")
            ax.set_ylabel("D (token budget)")
    fig.colorbar(ScalarMappable(norm, RATIO_CMAP), ax=axes, label="R (> 1: activation error dominates)", shrink=0.8)
    (low, high), (low8, high8) = (paper.constants()[key] for key in ("ratio_R", "ratio_R_fc2a8"))
    _save(fig, out_png, caption_grid, [f"blank cells: a run is missing or diverged, or a δ ≤ 0 ({n_dropped} dropped)",
                                       f"paper: R {low:.2f}–{high:.2f} without, {low8:.2f}–{high8:.2f} with FC2 "
                                       "input 8 bit"])


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


@_styled
def fig9_outliers(outliers: str | Path, runs: str | Path, decomposition: str | Path, out_png: str | Path,
                  caption_grid: str, metric: str = METRIC) -> None:
    """(a) Input kurtosis per linear-layer type, BF16 vs W4A4, in the largest cell; (b) δ_W4A4 vs G with and
    without the FC2 input at 8 bit in the largest cell with runs of both."""
    out, table = read_input(outliers, "outliers"), read_input(runs, "runs")
    decomp = _decomposition(decomposition, metric)
    fig, axes = _figure(1, 2, (13, 5.2))
    notes = [_kurtosis_panel(axes[0, 0], out, table), _fc2_panel(axes[0, 1], decomp)]
    _save(fig, out_png, caption_grid, notes)


def _kurtosis_panel(ax: Axes, out: pd.DataFrame, table: pd.DataFrame) -> str:
    """Bars of the mean per-token input kurtosis per layer type (points: blocks), BF16 vs W4A4; a caption note."""
    facts = table[["run_id", "N", "tokens_requested"]].drop_duplicates("run_id")
    data = out.merge(facts, on="run_id", how="inner")
    data = data[data["precision"].isin([BASELINE, "W4A4"])]
    cells = data.groupby(["N", "tokens_requested"])["precision"].agg(set)
    cells = cells[cells.map(lambda s: {BASELINE, "W4A4"} <= s)]
    ax.set_title("(a) input kurtosis per linear layer")
    if cells.empty:
        _empty(ax, "no cell with outlier statistics of both a BF16 and a W4A4 run")
        return ""
    n_max, t_max = max(cells.index)
    cell = data[(data["N"] == n_max) & (data["tokens_requested"] == t_max)]
    qat = cell[cell["precision"] == "W4A4"]
    numeric = [int(g) for g in qat["run_group"].astype(str).unique() if g.isdigit()]
    group = str(max(numeric)) if numeric else str(qat["run_group"].iloc[0])
    cell = cell[(cell["precision"] == BASELINE) | (cell["run_group"].astype(str) == group)]
    cell = cell.assign(run=np.where(cell["precision"] == BASELINE, "BF16", f"W4A4 {_group_label(group)}"))
    hue_order = ["BF16", f"W4A4 {_group_label(group)}"]
    layers = [t for t in LAYER_TYPES if t in set(cell["layer_type"])]
    sns.barplot(cell, x="layer_type", y="kurtosis_token", hue="run", order=layers, hue_order=hue_order, ax=ax,
                errorbar=None, palette=["0.55", "tab:orange"], alpha=0.8)
    with _seeded_numpy():  # seaborn jitters the points with numpy's global generator: the same figure every time
        sns.stripplot(cell, x="layer_type", y="kurtosis_token", hue="run", order=layers, hue_order=hue_order,
                      ax=ax, dodge=True, palette=["0.2", "saddlebrown"], size=4, legend=False)
    for bars in ax.containers:
        ax.bar_label(bars, fmt="%.3g", fontsize="small", label_type="center")
    ax.set_yscale("log")
    _tidy_log(ax.yaxis)
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
        _empty(ax, "no W4A4 or W4A4-fc2a8 runs")
        return ""
    n_max, t_max = max(counts.index[counts == counts.max()])
    present = [col for col in variants if held.loc[(n_max, t_max), col]]
    cell = decomp[(decomp["N"] == n_max) & (decomp["tokens_requested"] == t_max) & finite.any(axis=1)]
    order = _group_order(cell)
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
    ax.set_xticks(x, [_group_label(g, G) for g, G in zip(order, means["G"], strict=True)])
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


# ---------------------------------------------------------------------------------------------- EPM

@_styled
def fig16_epm(params: str | Path, decomposition: str | Path, out_png: str | Path, caption_grid: str,
              G: int | None = None, metric: str = METRIC) -> None:
    """Effective parameter multiplier of the unified law over log10 N × log10 D at a fixed G, W4A4 and (when
    fitted) W4A4-fc2a8, with the EPM = 0.5 line (4 bit beats lossless 8 bit above it)."""
    prm, decomp = read_input(params, "params"), _decomposition(decomposition, metric)
    G = _numeric_G(decomp, G)
    chin = constants(prm, "chinchilla", BASELINE)
    precisions = ["W4A4"] + (["W4A4-fc2a8"] if constants(prm, "unified", "W4A4-fc2a8") is not None else [])
    fig, axes = _figure(1, len(precisions), (6.6 * len(precisions), 5.4))
    notes = [f"at G = {G}"]
    if decomp.empty or G is None or G < 2:
        _empty(axes[0, 0], "no decomposition rows to place the grid")
        _save(fig, out_png, caption_grid, notes)
        return
    xx, yy = np.meshgrid(_log10_range(decomp["N"]), _log10_range(decomp["D"]))
    fields = {}
    for ax, precision in zip(axes[0], precisions, strict=True):
        law = constants(prm, "unified", precision)
        ax.set_title(f"EPM of {precision}")
        if law is None or chin is None:
            _empty(ax, f"{'unified ' + precision if law is None else 'Chinchilla'} law not fitted (NaN constants): "
                       "no EPM")
            continue
        field = fit.epm(10.0**xx, 10.0**yy, G, law, chin)
        if not np.isfinite(field).any():
            _empty(ax, f"the EPM of {precision} is not finite over this range")
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
    _save(fig, out_png, caption_grid, notes)


# ---------------------------------------------------------------------------------------------- beyond the paper

@_styled
def mixed_layer_ranking(mixed_ranking: str | Path, out_png: str | Path, caption_grid: str, metric: str = METRIC) -> None:
    """Mean relative change of δ when one tensor goes to 8 bit, per override (best first), with n per bar."""
    rank = read_input(mixed_ranking, "mixed_ranking")
    rank = rank[rank["metric"] == metric]
    rank = rank.assign(other_base=rank["base_precision"] != "W4A4").sort_values(
        ["other_base", "base_precision", "rank"], ignore_index=True)
    fig, axes = _figure(1, 1, (8.5, 1.6 + 0.45 * max(len(rank), 3)))
    ax = axes[0, 0]
    if rank.empty:
        _empty(ax, "no override runs in the grid")
        _save(fig, out_png, caption_grid)
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
    _save(fig, out_png, caption_grid, ["mean over the cells where the base run has δ > 0"])


@_styled
def training_curves(runs: str | Path, out_png: str | Path, caption_grid: str) -> None:
    """Smoothed training loss vs tokens of every precision in one cell (largest size and budget, smallest
    numeric group, smallest seed) and its gap to BF16; metrics from ``runs/<run_id>/metrics.parquet`` beside
    ``runs`` (or ``restored/runs/<run_id>/``: :func:`qatlaw.reference.metrics_path`)."""
    table = read_input(runs, "runs")
    fig, axes = _figure(1, 2, (13, 5))
    if table.empty:
        for ax in axes.flat:
            _empty(ax, "empty run table")
        _save(fig, out_png, caption_grid)
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
    axes[0, 0].set_title(f"smoothed training loss, {where}, {_group_label(group) if group else 'BF16 only'}",
                         fontsize="medium")
    axes[0, 0].set_ylabel("loss_ema (nats)")
    axes[0, 1].axhline(0, color="k", lw=0.8)
    axes[0, 1].set_title("gap to BF16 at the same step (the δ trajectory)", fontsize="medium")
    axes[0, 1].set_ylabel("loss_ema − BF16 loss_ema (nats)")
    if base is None:
        _empty(axes[0, 1], "no BF16 run in this cell")
    for ax in axes[0]:
        ax.set_xlabel("D seen (tokens)")
        ax.xaxis.set_major_formatter(lambda v, _: si(v))
    if len(curves) > 1 or base is None:
        axes[0, 1].set_ylim(_gap_limits(curves, base))
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside right upper", frameon=False)
    _save(fig, out_png, caption_grid, [f"runs of seed {int(row['seed'])}",
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


# ---------------------------------------------------------------------------------------------- FP→QAT split

def _split_inputs(runs: str | Path, metric: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The split runs' δ and the cells' optima (:mod:`qatlaw.split`) of a run table; empty without split runs."""
    table = read_input(runs, "runs", all_fractions=True)
    if not split.has_split(table):
        return pd.DataFrame(), pd.DataFrame()
    deltas = split.split_deltas(table, metric)
    return deltas, split.cell_optima(deltas)


@_styled
def split_loss_vs_fraction(runs: str | Path, out_png: str | Path, caption_grid: str, metric: str = METRIC) -> None:
    """δ against the QAT fraction f per cell (seeds as dots, their mean as a line, PTQ at f = 0), the fitted
    split loss law's curve where identified, the measured f* with its 90% interval and the paper's f*(S)."""
    deltas, optima = _split_inputs(runs, metric)
    if optima.empty:
        fig, axes = _figure(1, 1, (6, 4))
        _empty(axes[0, 0], "no cell with 3 or more QAT fractions above 0: nothing to draw")
        _save(fig, out_png, caption_grid)
        return
    ncols = min(3, len(optima))
    nrows = math.ceil(len(optima) / ncols)
    fig, axes = _figure(nrows, ncols, (4.6 * ncols, 3.6 * nrows))
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
    _save(fig, out_png, caption_grid, [f"δ of {metric}", *notes])


@_styled
def split_optimum_vs_S(runs: str | Path, out_png: str | Path, caption_grid: str, metric: str = METRIC) -> None:
    """The cells' optimal QAT fraction f* (with 90% seed intervals) against the tokens per parameter byte S, the
    paper's f*(S) = exp(−a / ln S) beside this grid's fit of it."""
    _, optima = _split_inputs(runs, metric)
    fig, axes = _figure(1, 1, (7.5, 5))
    ax = axes[0, 0]
    if optima.empty:
        _empty(ax, "no cell with 3 or more QAT fractions above 0: nothing to draw")
        _save(fig, out_png, caption_grid)
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
    _save(fig, out_png, caption_grid, [f"δ of {metric}; bars: each cell's spread over seeds (90% interval, or the "
                                       "range of 2 seeds)", *notes])


# ---------------------------------------------------------------------------------------------- entry point

@_styled
def delta_vs_paper(runs: str | Path, out_png: str | Path, caption_grid: str, metric: str = METRIC) -> None:
    """Each measured δ of a run table's own QAT labels against δ of the paper's INT4 W4A4 law at its N, D and G
    (y = x: the paper's law), point size ∝ D/N."""
    from qatlaw import findings

    table = read_input(runs, "runs")
    labels = sorted(p for p in table["precision"].unique() if findings.outside(p))
    rows = findings.vs_paper(table, metric, labels)
    fig, axes = _figure(1, 1, (6.4, 5.8))
    ax = axes[0, 0]
    if rows.empty:
        _empty(ax, "no QAT runs of a label from outside this project")
        _save(fig, out_png, caption_grid)
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
    _save(fig, out_png, caption_grid, [f"δ of {metric}; point size ∝ D/N"])


CATALOGUE = {**FIGURES, **SPLIT_FIGURES, **EXTERNAL_FIGURES}
FIGURE_FUNCTIONS: dict[str, Callable[..., None]] = {name: globals()[name] for name in CATALOGUE}


def make_figure(name: str, inputs: Mapping[str, str | Path], out_png: str | Path, caption_grid: str,
                metric: str = METRIC) -> None:
    """Draw figure ``name`` of ``FIGURES`` or ``SPLIT_FIGURES`` from its input files (keys as in its catalogue
    entry); figures of quantization errors show δ of ``metric`` (``val_loss`` or ``loss``)."""
    files = select_inputs("figure", name, CATALOGUE, inputs)
    func = FIGURE_FUNCTIONS[name]
    extra = {"metric": metric} if "metric" in inspect.signature(func).parameters else {}
    func(**files, out_png=out_png, caption_grid=caption_grid, **extra)


@_styled
def plan_figure(law, N: float, D: float, options: pd.DataFrame, out_png: str | Path) -> None:
    """δ against D (a decade either side of ``D``) at N for every option of a plan (``qatlaw plan --plot``),
    the best option drawn thick and D marked."""
    grid = np.geomspace(D / 10, D * 10, 64)
    fig, axes = _figure(1, 1, (8.5, 5.5))
    ax = axes[0, 0]
    palette = dict(zip(sorted(options["precision"].unique()),
                       sns.color_palette("tab10", options["precision"].nunique())))
    styles = dict(zip(sorted(options["G"].unique()), ["-", "--", "-.", ":"] * 4))
    for row in options.itertuples():
        law_constants = constants(law.params, "unified", row.precision)
        if law_constants is None:
            continue
        ax.plot(grid, fit.predict_delta(law_constants, N, grid, row.G), styles[row.G], color=palette[row.precision],
                lw=3 if row.best else 1.3, label=f"{row.precision} G={row.G}" + (" (best)" if row.best else ""))
    ax.axvline(D, color="0.5", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    _tidy_log(ax.yaxis)
    ax.set_xlabel("D (training tokens)")
    ax.set_ylabel(DELTA_LABEL)
    ax.set_title(f"law {law.name}: δ at N = {si(N)} (vertical line: D = {si(D)})")
    fig.legend(loc="outside right upper", fontsize="small", frameon=False)
    _save(fig, out_png, "", [f"source: {law.source}"])
