"""Figures: every figure renders from a synthetic set of the workflow's Parquet outputs (and from a set where
the laws could not be fitted), outputs are reproducible, bad inputs give one-line errors."""

from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from qatlaw import decompose, fit, mixed, outputs, plots, runtable
from qatlaw.precision import LAYER_TYPES

SIZES = {"s1": (100_000, 64), "s2": (300_000, 128), "s3": (1_000_000, 256)}  # N, hidden size
TOKENS = (1_000_000, 2_000_000, 4_000_000)
GROUPS = ("32", "128", "channel")
LAWS = {  # (k, γN, γD, γG) per precision; W16A4-fc2a8 is left unfitted (NaN) in the params table
    "W4A4": (0.16, 0.22, 0.075, 0.78), "W4A16": (0.25, 0.36, 0.16, 0.35), "W16A4": (0.10, 0.18, 0.033, 0.98),
    "W4A4-fc2a8": (0.35, 0.26, 0.096, 0.34), "W16A4-fc2a8": (0.13, 0.23, 0.083, 0.45),
}
CHIN = {"A": 50.0, "B": 100.0, "E": 2.0, "alpha": 0.3, "beta": 0.3}
ABLATION = ("W4A4-qkva8", "W4A4-fc2w8", "W4A4-fc2a8")
CAPTION = "sizes s1,s2,s3 · tokens 1M,2M,4M · G 32,128,channel"
STEPS = 40


def synthetic_runs() -> pd.DataFrame:
    """A run table: BF16 from the Chinchilla law, QAT runs with δ from LAWS times lognormal noise; the largest
    size's W16A4 runs and one W4A4 cell have δ < 0."""
    rng = np.random.default_rng(0)
    rows = []
    for (size, (N, hidden)), D in itertools.product(SIZES.items(), TOKENS):
        bf16 = fit.predict_loss(CHIN, N, D)
        cell = {"size": size, "N": N, "D": D - 1000, "tokens_requested": D, "seed": 0, "diverged": False}
        rows.append(cell | {"precision": "BF16", "group": "none", "G": None, "loss": bf16})
        for precision, group in itertools.product(LAWS, GROUPS):
            G = hidden if group == "channel" else int(group)
            delta = fit.predict_delta(dict(zip(fit.DELTA_CONSTANTS, LAWS[precision], strict=True)), N, D, G)
            delta *= float(np.exp(0.05 * rng.standard_normal()))
            if (precision == "W16A4" and size == "s3") or (precision == "W4A4" and (size, D, group) ==
                                                           ("s1", 1_000_000, "128")):
                delta = -0.004
            rows.append(cell | {"precision": precision, "group": group, "G": G, "loss": bf16 + delta})
    base = next(r for r in rows if (r["size"], r["tokens_requested"], r["group"], r["precision"]) ==
                ("s1", 1_000_000, "32", "W4A4"))
    rows += [base | {"precision": p, "loss": base["loss"] - 0.01 * (i + 1)} for i, p in enumerate(ABLATION[:2])]
    runs = pd.DataFrame(rows)
    variant = np.where(runs["precision"] == "BF16", "BF16", runs["precision"] + "_g" + runs["group"])
    return runs.assign(
        run_id=runs["size"] + "/" + (runs["tokens_requested"] // 1_000_000).astype(str) + "M/seed0/" + variant,
        G=runs["G"].astype("Int64"), val_loss=runs["loss"] + 0.05,
    )


def fit_tables(runs: pd.DataFrame, deltas: pd.DataFrame, fitted: bool) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """params and predictions tables with the fit module's columns: the true constants with ±20% intervals
    (every law NaN unless ``fitted``); predictions in sample and for the largest N and D held out."""
    params, preds, draws = [], [], []
    rng = np.random.default_rng(0)

    def add(law: str, precision: str, values: dict, n_runs: int, n_dropped: int) -> None:
        for name, value in values.items():
            value = value if fitted else np.nan
            params.append({"law": law, "precision": precision, "constant": name, "value": value,
                           "ci_low": 0.8 * value, "ci_high": 1.2 * value, "n_runs": n_runs,
                           "n_dropped": n_dropped, "objective": 0.1})

    def predict(law: str, precision: str, table: pd.DataFrame, observed: str, predicted: np.ndarray) -> None:
        for held, scale in (("none", 1.0), ("largest_N", 1.15), ("largest_D", 0.9)):
            part = np.ones(len(table), bool) if held == "none" else \
                (table["N" if held == "largest_N" else "D"] == table["N" if held == "largest_N" else "D"].max())
            obs = table.loc[part, observed].to_numpy(float)
            pred = scale * predicted[np.asarray(part)]
            preds.append(pd.DataFrame({"run_id": table.loc[part, "run_id"], "law": law, "precision": precision,
                                       "N": table.loc[part, "N"], "D": table.loc[part, "D"],
                                       "G": table.loc[part, "G"], "observed": obs, "predicted": pred,
                                       "residual": pred - obs, "rel_error": np.abs(pred - obs) / obs,
                                       "held_out": held}))

    bf16 = runs[runs["precision"] == "BF16"]
    add("chinchilla", "BF16", CHIN, len(bf16), 0)
    if fitted:
        predict("chinchilla", "BF16", bf16, "loss", fit.predict_loss(CHIN, bf16["N"], bf16["D"]) + 0.01)
    for precision, consts in LAWS.items():
        sub = deltas[deltas["precision"] == precision]
        ok = sub[sub["delta"] > 0]
        law = dict(zip(fit.DELTA_CONSTANTS, consts, strict=True))
        usable = fitted and precision != "W16A4-fc2a8"
        add("unified", precision, law if usable else dict.fromkeys(law, np.nan), len(ok), len(sub) - len(ok))
        add("no_D", precision, law | {"gamma_D": 0.0}, len(ok), len(sub) - len(ok))
        add("epm", precision, {f"eff_G{g}": 0.8 for g in GROUPS}, len(ok), len(sub) - len(ok))
        if usable:
            for draw in range(20):  # bootstrap refits scattered around the law
                draws += [{"law": "unified", "precision": precision, "draw": draw, "constant": name,
                           "value": value * (1 + 0.05 * rng.standard_normal())} for name, value in law.items()]
            predict("unified", precision, ok, "delta",
                    np.asarray(fit.predict_delta(law, ok["N"], ok["D"], ok["G"].astype(float)), float))
    predictions = pd.concat(preds, ignore_index=True) if preds else pd.DataFrame(columns=fit.PREDICTIONS_COLUMNS)
    return (pd.DataFrame(params, columns=fit.PARAMS_COLUMNS), predictions.loc[:, list(fit.PREDICTIONS_COLUMNS)],
            pd.DataFrame(draws, columns=fit.BOOTSTRAP_COLUMNS).astype({"draw": int, "value": float}))


def outlier_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Outlier statistics of every run's two blocks: FC2 input kurtosis 120 in BF16, 90 under QAT, others ~5."""
    rows = []
    for run in runs.itertuples():
        for index, layer in itertools.product(range(2), LAYER_TYPES):
            kurt = (120.0 if run.precision == "BF16" else 90.0) if layer == "fc2" else 5.0 + index
            rows.append({"run_id": run.run_id, "size": run.size, "precision": run.precision,
                         "run_group": run.group, "layer_index": index, "layer_type": layer, "in_features": 64,
                         "n_tokens": 512, "kurtosis_token": kurt, "kurtosis_all": 2 * kurt,
                         "max_median_ratio": 30.0, "top1_share": 0.05})
    return pd.DataFrame(rows)


def write_results(root: Path, fitted: bool = True) -> dict[str, Path]:
    """Write the synthetic Parquet outputs under ``root`` in the workflow's layout; the input paths by key."""
    runs = synthetic_runs()
    deltas = runtable.delta_table(runs)
    decomp = decompose.decomposition(deltas)
    mix = mixed.mixed_precision(deltas)
    params, predictions, bootstrap = fit_tables(runs, deltas, fitted)
    tables = {"runs": runs, "decomposition": decomp, "decomposition_fit": decompose.decomposition_fit(decomp),
              "outliers": outlier_table(runs), "mixed_ranking": mixed.ranking(mix), "params": params,
              "predictions": predictions, "bootstrap": bootstrap}
    paths = {key: root / outputs.INPUTS[key] for key in tables}
    for key, table in tables.items():
        paths[key].parent.mkdir(parents=True, exist_ok=True)
        table.to_parquet(paths[key], index=False)
    for run in runs.itertuples():
        step = np.arange(1, STEPS + 1)
        loss = 7.5 - 1.5 * np.log1p(step) / np.log1p(STEPS) + (run.loss - runs["loss"].min()) * step / STEPS
        metrics = pd.DataFrame({"step": step, "tokens": step * 4096, "loss": loss, "loss_ema": loss, "lr": 1e-3,
                                "grad_norm": 0.5, "tokens_per_s": 1e4})
        out = root / "results" / "runs" / run.run_id / "metrics.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        metrics.to_parquet(out, index=False)
    return paths


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


def test_outputs_are_reproducible(results: dict[str, Path], tmp_path: Path):
    first, second = tmp_path / "a" / "f.png", tmp_path / "b" / "f.png"
    for png in (first, second):
        plots.make_figure("mixed_layer_ranking", results, png, CAPTION)
    assert first.read_bytes() == second.read_bytes()
    assert first.with_suffix(".svg").read_bytes() == second.with_suffix(".svg").read_bytes()
    assert "<dc:date>" not in first.with_suffix(".svg").read_text()


def test_bad_inputs_are_one_line_errors(results: dict[str, Path], tmp_path: Path):
    with pytest.raises(plots.PlotError, match=r"nowhere\.parquet: params table not found"):
        plots.make_figure("fig1_contour", results | {"params": tmp_path / "nowhere.parquet"}, tmp_path / "x.png",
                          CAPTION)
    broken = tmp_path / "decomposition.parquet"
    pd.read_parquet(results["decomposition"]).drop(columns=["ratio_R"]).to_parquet(broken)
    with pytest.raises(plots.PlotError, match=r"decomposition\.parquet: decomposition table lacks columns ratio_R; expected columns size, "):
        plots.make_figure("fig8_ratio", results | {"decomposition": broken}, tmp_path / "x.png", CAPTION)
    with pytest.raises(plots.PlotError, match="no input file given for outliers"):
        plots.make_figure("fig9_outliers", {"runs": results["runs"]}, tmp_path / "x.png", CAPTION)
    with pytest.raises(plots.PlotError, match="unknown figure"):
        plots.make_figure("fig99", results, tmp_path / "x.png", CAPTION)


def test_training_curves_need_the_metrics_of_every_run(results: dict[str, Path], tmp_path: Path):
    (tmp_path / "runs.parquet").write_bytes(results["runs"].read_bytes())
    with pytest.raises(plots.PlotError, match=r"s3/4M/seed0/BF16/metrics\.parquet: metrics table not found"):
        plots.training_curves(tmp_path / "runs.parquet", tmp_path / "x.png", CAPTION)


def test_grid_caption():
    grid = {"sizes": ["0.1M", "0.3M"], "tokens": ["100K", "200K"], "groups": [32, "channel"], "seeds": [0]}
    assert outputs.grid_caption(grid) == "sizes 0.1M,0.3M · tokens 100K,200K · G 32,channel · seeds 0"


def test_grid_caption_lists_the_sub_grids_values():
    grid = {"sizes": ["0.1M"], "tokens": ["1M"], "groups": [8], "seeds": [0],
            "extra": [{"sizes": ["0.3M"], "tokens": ["1M", "4M"], "groups": [8, 64], "seeds": [0, 1]}]}
    assert outputs.grid_caption(grid) == ("sizes 0.1M,0.3M · tokens 1M,4M · G 8,64 · seeds 0,1 · 1 sub-grids "
                                          "(not a full product)")
