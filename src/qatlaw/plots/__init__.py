"""The paper's figures (and a few beyond it), drawn from the workflow's Parquet outputs only, never by training.

Every figure is one function ``<name>(<inputs>, out_png, caption_grid)`` that writes ``out_png`` and an SVG
with the same stem (reproducible: no dates, fixed SVG ids). ``qatlaw.outputs.FIGURES`` names the input files each
figure reads (keys of ``qatlaw.outputs.INPUTS``, the default paths); :func:`make_figure` is the one entry point for
the workflow. ``caption_grid`` (see :func:`qatlaw.outputs.grid_caption`) is printed under the figure with notes on
what was left out, e.g. "2 dropped (δ≤0)": a non-positive δ cannot go on a log axis. Missing precisions, unfitted
laws (NaN constants) and empty panels are drawn as explanations, never errors; only a missing input file or a
missing column is a :class:`qatlaw.report_inputs.PlotError`. The paper's numbers come from
:func:`qatlaw.paper.constants`.

N is the non-embedding parameter count, D the training tokens, G the quantization group length (for
``channel`` the hidden size), δ a loss difference against the BF16 baseline in nats.

One module per family of figures: :mod:`~qatlaw.plots.contours` (Figs. 1 and 16), :mod:`~qatlaw.plots.trends`
(Figs. 4 and 7), :mod:`~qatlaw.plots.fit_quality` (Figs. 5, 10, 11 and 12), :mod:`~qatlaw.plots.decomposition`
(Figs. 6 and 8), :mod:`~qatlaw.plots.outliers` (Fig. 9), :mod:`~qatlaw.plots.mixed` and
:mod:`~qatlaw.plots.training` (beyond the paper), :mod:`~qatlaw.plots.split` (the FP→QAT split),
:mod:`~qatlaw.plots.external` (a run table from outside) and :mod:`~qatlaw.plots.plan` (``qatlaw plan --plot``);
what they share is in :mod:`~qatlaw.plots.draw` (style, canvas, caption, files, axes) and
:mod:`~qatlaw.plots.inputs` (decomposition cells, fitted laws). This module maps each figure's name to its function.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from pathlib import Path

from qatlaw.outputs import EXTERNAL_FIGURES, FIGURES, SPLIT_FIGURES
from qatlaw.plots.contours import fig1_contour, fig16_epm
from qatlaw.plots.decomposition import fig6_decomposition, fig8_ratio
from qatlaw.plots.external import delta_vs_paper
from qatlaw.plots.fit_quality import fig5_fit, fig10_chinchilla, fig11_components_fit, fig12_fc2_fit
from qatlaw.plots.inputs import METRIC
from qatlaw.plots.mixed import mixed_layer_ranking
from qatlaw.plots.outliers import fig9_outliers
from qatlaw.plots.split import split_loss_vs_fraction, split_optimum_vs_S
from qatlaw.plots.training import training_curves
from qatlaw.plots.trends import fig4_trends, fig7_components
from qatlaw.report_inputs import select_inputs

CATALOGUE = {**FIGURES, **SPLIT_FIGURES, **EXTERNAL_FIGURES}
FIGURE_FUNCTIONS: dict[str, Callable[..., None]] = {func.__name__: func for func in (
    fig1_contour, fig4_trends, fig5_fit, fig6_decomposition, fig7_components, fig8_ratio, fig9_outliers,
    fig10_chinchilla, fig11_components_fit, fig12_fc2_fit, fig16_epm, mixed_layer_ranking, training_curves,
    split_loss_vs_fraction, split_optimum_vs_S, delta_vs_paper)}


def make_figure(name: str, inputs: Mapping[str, str | Path], out_png: str | Path, caption_grid: str,
                metric: str = METRIC) -> None:
    """Draw figure ``name`` of ``FIGURES`` or ``SPLIT_FIGURES`` from its input files (keys as in its catalogue
    entry); figures of quantization errors show δ of ``metric`` (``val_loss`` or ``loss``)."""
    files = select_inputs("figure", name, CATALOGUE, inputs)
    func = FIGURE_FUNCTIONS[name]
    extra = {"metric": metric} if "metric" in inspect.signature(func).parameters else {}
    func(**files, out_png=out_png, caption_grid=caption_grid, **extra)
