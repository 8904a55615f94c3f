"""The catalogue of the workflow's figures and tables: their names and the Parquet inputs each one reads.

Kept free of plotting imports, so the Snakefile can build one rule per figure without loading matplotlib.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

INPUTS: dict[str, str] = {
    "runs": "results/runs.parquet",
    "decomposition": "results/analysis/decomposition.parquet",
    "decomposition_fit": "results/analysis/decomposition_fit.parquet",
    "outliers": "results/analysis/outliers.parquet",
    "mixed_ranking": "results/analysis/mixed_ranking.parquet",
    "params": "results/fit/params.parquet",
    "predictions": "results/fit/predictions.parquet",
    "comparison": "results/fit/comparison.parquet",  # tables only
    "bootstrap": "results/fit/bootstrap.parquet",
}
FIGURES: dict[str, tuple[str, ...]] = {
    "fig1_contour": ("params", "decomposition"),
    "fig4_trends": ("params", "decomposition", "bootstrap"),
    "fig5_fit": ("predictions", "params", "bootstrap"),
    "fig6_decomposition": ("decomposition", "decomposition_fit"),
    "fig7_components": ("params", "decomposition"),
    "fig8_ratio": ("decomposition",),
    "fig9_outliers": ("outliers", "runs", "decomposition"),
    "fig10_chinchilla": ("predictions", "params"),
    "fig11_components_fit": ("predictions", "params"),
    "fig12_fc2_fit": ("predictions", "params"),
    "fig16_epm": ("params", "decomposition"),
    "mixed_layer_ranking": ("mixed_ranking",),
    "training_curves": ("runs",),  # and runs/<run_id>/metrics.parquet beside runs.parquet
}
# Figures of the FP→QAT split (qatlaw.split): part of a run only when its grid trains QAT fractions below 1
# (split_grid), so a grid without them has exactly the outputs above.
SPLIT_FIGURES: dict[str, tuple[str, ...]] = {
    "split_loss_vs_fraction": ("runs",),
    "split_optimum_vs_S": ("runs",),
}
# Figures of a run table from outside (qatlaw.external): its QAT labels beside the paper's INT4 law.
EXTERNAL_FIGURES: dict[str, tuple[str, ...]] = {
    "delta_vs_paper": ("runs",),
}
TABLES: dict[str, tuple[str, ...]] = {
    "table1_constants": ("params",),
    "table2_laws": ("comparison", "params"),
    "table4_no_D": ("comparison", "params"),
    "gap_opening": ("runs",),  # and runs/<run_id>/metrics.parquet beside runs.parquet
}


# Outputs of the mixed-precision stage (qatlaw.mixed), which compares each run of a precision with per-layer
# overrides (W4A4-fc2a8, the ablation's) with its base: part of a run only when its grid has such a run, so a grid
# without one (a W4A4-only split grid) has no stage with nothing to compare.
MIXED_ANALYSES = ("results/analysis/mixed_precision.parquet", INPUTS["mixed_ranking"])
MIXED_FIGURES = ("mixed_layer_ranking",)


def split_grid(grid: Mapping[str, Sequence]) -> bool:
    """Whether a config's grid (or one of its extra sub-grids) trains a QAT fraction below 1 (grid.qat_fractions,
    default [1.0]: QAT from scratch only)."""
    return any(float(f) < 1 for sub in [grid, *grid.get("extra", [])] for f in sub.get("qat_fractions", [1.0]))


def grid_caption(grid: Mapping[str, Sequence]) -> str:
    """The caption line of a config's grid, e.g. 'sizes 0.1M,0.3M · tokens 100K,200K · G 32,channel · seeds 0':
    every value of the main grid and its extra sub-grids (a fractional design is not their product)."""
    subgrids = [grid, *grid.get("extra", [])]
    parts = [("sizes", "sizes"), ("tokens", "tokens"), ("G", "groups"), ("seeds", "seeds")]
    values = {key: list(dict.fromkeys(str(v) for sub in subgrids for v in sub.get(key, grid.get(key, []))))
              for _, key in parts}
    text = " · ".join(f"{label} {','.join(values[key])}" for label, key in parts if values[key])
    return text + (f" · {len(subgrids) - 1} sub-grids (not a full product)" if len(subgrids) > 1 else "")


# The report category of each figure that is not the law fit's: the stage it belongs to.
FIGURE_CATEGORIES = {
    "training_curves": "1. Training",
    "fig6_decomposition": "2. Weight vs activation error",
    "fig7_components": "2. Weight vs activation error",
    "fig8_ratio": "2. Weight vs activation error",
    "fig9_outliers": "3. Outliers and mixed precision",
    "mixed_layer_ranking": "3. Outliers and mixed precision",
    **dict.fromkeys(SPLIT_FIGURES, "6. FP→QAT split"),
}


def figure_category(figure: str) -> str:
    """Report category of a figure: the stage it belongs to (law-fit figures by default)."""
    return FIGURE_CATEGORIES.get(figure, "4. Scaling law fit")


def named_inputs(keys: Sequence[str]) -> dict[str, str]:
    """Workflow files of the given input roles (see INPUTS)."""
    return {key: INPUTS[key] for key in keys}


def input_args(keys: Sequence[str]) -> str:
    """The same as KEY=PATH arguments for `qatlaw figure` / `qatlaw table`."""
    return " ".join(f"{key}={path}" for key, path in named_inputs(keys).items())
