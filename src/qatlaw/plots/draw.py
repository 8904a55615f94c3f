"""How every figure is drawn and written: the plot style, a figure's canvas, its caption line and its PNG and SVG
files, an axes that explains why it has no data, and what the figure families share on their axes (δ's label,
short counts, readable log ticks, a colour and a label per quantization group).
"""

from __future__ import annotations

import functools
import textwrap
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullLocator

from qatlaw.io import atomic_path
from qatlaw.report_inputs import PlotError

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


def styled(func: Callable[..., None]) -> Callable[..., None]:
    """Run a figure function under the package's plot style."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs) -> None:
        with mpl.rc_context(STYLE):
            func(*args, **kwargs)
    return wrapper


def new_figure(nrows: int, ncols: int, size: tuple[float, float]) -> tuple[Figure, np.ndarray]:
    """A constrained-layout figure on the Agg canvas and its axes as a 2-D array."""
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, np.atleast_2d(fig.subplots(nrows, ncols, squeeze=False))


def write_figure(fig: Figure, out_png: str | Path, caption_grid: str, notes: Sequence[str] = ()) -> None:
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


def empty(ax: Axes, message: str) -> None:
    """An axes that explains why it has no data."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.text(0.5, 0.5, textwrap.fill(message, 40), ha="center", va="center", transform=ax.transAxes,
            color="0.35")


def write_empty(fig: Figure, axes: Iterable[Axes], message: str, out_png: str | Path, caption_grid: str,
                notes: Sequence[str] = ()) -> None:
    """Write a figure with nothing to draw: ``message`` on each of ``axes``, then the caption and the files as
    :func:`write_figure` does."""
    for ax in axes:
        empty(ax, message)
    write_figure(fig, out_png, caption_grid, notes)


def si(x: float) -> str:
    """Short form of a count: 123200 -> '123K', 2.5e9 -> '2.5B'."""
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def tidy_log(axis: Axis) -> None:
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


def group_order(df: pd.DataFrame) -> list[str]:
    """Group labels from fine to coarse (by their median G)."""
    return list(df.groupby("group")["G"].median().sort_values(kind="stable").index)


def group_colors(groups: Sequence[str]) -> dict[str, tuple]:
    """One colour per group label, fine to coarse."""
    return dict(zip(groups, sns.color_palette("viridis", len(groups)), strict=True))


def group_label(group: str, G: float | None = None) -> str:
    """'G=32', or 'channel (G=64)' when the channel group has one G."""
    if group == "channel":
        return "channel" if G is None or not np.isfinite(G) else f"channel (G={int(G)})"
    return f"G={group}"
