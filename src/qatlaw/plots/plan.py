"""The figure of ``qatlaw plan --plot``: δ of a law's unified fit against D, a decade either side of the planned D,
at the planned N, one line per option of the plan (precision and G), the best one thick.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns

from qatlaw import fit
from qatlaw.plots.draw import DELTA_LABEL, new_figure, si, styled, tidy_log, write_figure
from qatlaw.plots.inputs import constants


@styled
def plan_figure(laws: list, N: float, D: float, options: pd.DataFrame, out_png: str | Path) -> None:
    """δ against D (a decade either side of ``D``) at N for every option of a plan (``qatlaw plan --plot``), each
    by its own law, the best option drawn thick and D marked."""
    by_name = {law.name: law for law in laws}
    grid = np.geomspace(D / 10, D * 10, 64)
    fig, axes = new_figure(1, 1, (8.5, 5.5))
    ax = axes[0, 0]
    palette = dict(zip(sorted(options["precision"].unique()),
                       sns.color_palette("tab10", options["precision"].nunique())))
    styles = dict(zip(sorted(options["G"].unique()), ["-", "--", "-.", ":"] * 4))
    for row in options.itertuples():
        law_constants = constants(by_name[row.law].params, "unified", row.precision)
        if law_constants is None:
            continue
        ax.plot(grid, fit.predict_delta(law_constants, N, grid, row.G), styles[row.G], color=palette[row.precision],
                lw=3 if row.best else 1.3, label=f"{row.precision} G={row.G}" + (" (best)" if row.best else ""))
    ax.axvline(D, color="0.5", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    tidy_log(ax.yaxis)
    ax.set_xlabel("D (training tokens)")
    ax.set_ylabel(DELTA_LABEL)
    ax.set_title(f"law {', '.join(by_name)}: δ at N = {si(N)} (vertical line: D = {si(D)})")
    fig.legend(loc="outside right upper", fontsize="small", frameon=False)
    write_figure(fig, out_png, "", [f"source: {law.source}" for law in laws])
