"""Figures: every figure renders from a synthetic set of the workflow's Parquet outputs (and from a set where
the laws could not be fitted), outputs are reproducible, bad inputs give one-line errors."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from conftest import CAPTION, write_results

from qatlaw import outputs, plots
from qatlaw.plots.training import training_curves
from qatlaw.report_inputs import PlotError


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_results(tmp_path_factory.mktemp("full"))


@pytest.fixture(scope="module")
def unfitted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_results(tmp_path_factory.mktemp("unfitted"), fitted=False)


def assert_figure(png: Path) -> None:
    assert png.stat().st_size > 10_000, png
    image = mpimg.imread(png)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    svg = png.with_suffix(".svg").read_text()
    assert "<svg" in svg and CAPTION in svg


# Caption notes the synthetic set must produce: the δ ≤ 0 cells are dropped from log axes and counted
EXPECTED_NOTES = {"fig4_trends": "1 dropped (δ≤0)", "fig7_components": "W16A4: 9 dropped (δ≤0)",
                  "fig1_contour": "1 observed δ≤0 shown as ×", "fig12_fc2_fit": "W16A4-fc2a8 not fitted"}


@pytest.mark.parametrize("name", list(outputs.FIGURES))
def test_every_figure_renders(name: str, results: dict[str, Path], tmp_path: Path):
    png = tmp_path / f"{name}.png"
    plots.make_figure(name, results, png, CAPTION)
    assert_figure(png)
    assert EXPECTED_NOTES.get(name, CAPTION) in png.with_suffix(".svg").read_text()


# every figure that reads a law, but fig7, which draws its trends with fig4's code
UNFITTED = [n for n, keys in outputs.FIGURES.items() if {"params", "predictions"} & set(keys) and n != "fig7_components"]


@pytest.mark.parametrize("name", UNFITTED)
def test_figures_explain_unfitted_laws(name: str, unfitted: dict[str, Path], tmp_path: Path):
    png = tmp_path / f"{name}.png"
    plots.make_figure(name, unfitted, png, CAPTION)
    assert_figure(png)
    assert "not fitted" in png.with_suffix(".svg").read_text()


def fig9_without_fc2a8(results: dict[str, Path], tmp_path: Path, cells: set[tuple[int, int]] | None) -> str:
    """fig9's SVG text with the W4A4-fc2a8 δ removed from ``cells`` (N, tokens_requested; None: every cell)."""
    decomp = pd.read_parquet(results["decomposition"])
    drop = [cells is None or cell in cells for cell in zip(decomp["N"], decomp["tokens_requested"], strict=True)]
    decomp.loc[drop, "delta_W4A4_fc2a8"] = np.nan
    decomp.to_parquet(tmp_path / "decomposition.parquet")
    png = tmp_path / "fig9.png"
    plots.make_figure("fig9_outliers", results | {"decomposition": tmp_path / "decomposition.parquet"}, png, CAPTION)
    return png.with_suffix(".svg").read_text()


def test_fig9_fc2_panel_takes_the_largest_cell_with_both_variants(results: dict[str, Path], tmp_path: Path):
    svg = fig9_without_fc2a8(results, tmp_path, {(1_000_000, 4_000_000)})
    assert "(b) δ_W4A4 vs G at N = 1M, D = 2M" in svg and "W4A4, FC2 input 8 bit" in svg
    assert "no cell has runs of every variant" not in svg


def test_fig9_fc2_panel_names_the_variant_no_cell_has(results: dict[str, Path], tmp_path: Path):
    svg = fig9_without_fc2a8(results, tmp_path, None)
    assert "(b) δ_W4A4 vs G at N = 1M, D = 4M" in svg
    # in the caption only: no legend entry without data
    assert svg.count("W4A4, FC2 input 8 bit") == 1
    assert "(b) no cell has runs of every variant: W4A4, FC2 input 8 bit missing" in svg


@pytest.mark.parametrize("name", ["mixed_layer_ranking", "fig9_outliers"])  # fig9: jittered points
def test_outputs_are_reproducible(name: str, results: dict[str, Path], tmp_path: Path):
    first, second = tmp_path / "a" / "f.png", tmp_path / "b" / "f.png"
    for png in (first, second):
        plots.make_figure(name, results, png, CAPTION)
    assert first.read_bytes() == second.read_bytes()
    assert first.with_suffix(".svg").read_bytes() == second.with_suffix(".svg").read_bytes()
    assert "<dc:date>" not in first.with_suffix(".svg").read_text()


def test_bad_inputs_are_one_line_errors(results: dict[str, Path], tmp_path: Path):
    with pytest.raises(PlotError, match=r"nowhere\.parquet: params table not found"):
        plots.make_figure("fig1_contour", results | {"params": tmp_path / "nowhere.parquet"}, tmp_path / "x.png",
                          CAPTION)
    broken = tmp_path / "decomposition.parquet"
    pd.read_parquet(results["decomposition"]).drop(columns=["ratio_R"]).to_parquet(broken)
    with pytest.raises(PlotError, match=r"decomposition\.parquet: decomposition table lacks columns ratio_R; expected columns size, "):
        plots.make_figure("fig8_ratio", results | {"decomposition": broken}, tmp_path / "x.png", CAPTION)
    with pytest.raises(PlotError, match="no input file given for outliers"):
        plots.make_figure("fig9_outliers", {"runs": results["runs"]}, tmp_path / "x.png", CAPTION)
    with pytest.raises(PlotError, match="unknown figure"):
        plots.make_figure("fig99", results, tmp_path / "x.png", CAPTION)


def test_training_curves_need_the_metrics_of_every_run(results: dict[str, Path], tmp_path: Path):
    (tmp_path / "runs.parquet").write_bytes(results["runs"].read_bytes())
    with pytest.raises(PlotError, match=r"s3/4M/seed0/BF16/metrics\.parquet: metrics table not found"):
        training_curves(tmp_path / "runs.parquet", tmp_path / "x.png", CAPTION)


def test_grid_caption():
    grid = {"sizes": ["0.1M", "0.3M"], "tokens": ["100K", "200K"], "groups": [32, "channel"], "seeds": [0]}
    assert outputs.grid_caption(grid) == "sizes 0.1M,0.3M · tokens 100K,200K · G 32,channel · seeds 0"


def test_grid_caption_lists_the_sub_grids_values():
    grid = {"sizes": ["0.1M"], "tokens": ["1M"], "groups": [8], "seeds": [0],
            "extra": [{"sizes": ["0.3M"], "tokens": ["1M", "4M"], "groups": [8, 64], "seeds": [0, 1]}]}
    assert outputs.grid_caption(grid) == ("sizes 0.1M,0.3M · tokens 1M,4M · G 8,64 · seeds 0,1 · 1 sub-grids "
                                          "(not a full product)")
