"""Weight/activation decomposition: table layout, exact ratios, the through-origin fit, file outputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from qatlaw import decompose, runtable

N, BASE_LOSS = 1000, 3.0


def runs_table(cells: dict[tuple[str, int | str], dict[str, float]], val_offset: float = 0.0) -> pd.DataFrame:
    """A run table with a BF16 baseline per (size, tokens) and the given δ per (size, tokens, group) and precision.

    ``cells`` maps (size, group) to {precision: δ} at 100K tokens; validation δ are δ + ``val_offset``.
    """
    rows = []
    sizes = {size for size, _ in cells}
    for size in sizes:
        rows.append((f"{size}/100K/seed0/BF16", "BF16", "none", None, size, BASE_LOSS, BASE_LOSS))
    for (size, group), deltas in cells.items():
        for precision, delta in deltas.items():
            rows.append((f"{size}/100K/seed0/{precision}_g{group}", precision, str(group),
                         64 if group == "channel" else group, size, BASE_LOSS + delta, BASE_LOSS + delta + val_offset))
    table = pd.DataFrame(rows, columns=["run_id", "precision", "group", "G", "size", "loss", "val_loss"])
    table = table.assign(N=N, D=100_000, tokens_requested=100_000, seed=0, diverged=False)
    return table.astype({"G": "Int64"})


def test_ratio_and_sum_are_exact_on_hand_values():
    runs = runs_table({("s", 32): {"W4A4": 0.09, "W4A16": 0.04, "W16A4": 0.06, "W16A4-fc2a8": 0.03,
                                   "W4A4-fc2a8": 0.07}}, val_offset=0.01)
    out = decompose.decomposition(runtable.delta_table(runs))
    assert list(out.columns) == list(decompose.DECOMPOSITION_COLUMNS)
    loss = out[out["metric"] == "loss"].iloc[0]
    assert loss["delta_W4A4"] == pytest.approx(0.09)
    assert loss["sum_components"] == pytest.approx(0.10)
    assert loss["ratio_R"] == pytest.approx(0.06 / 0.04)
    assert loss["ratio_R_fc2a8"] == pytest.approx(0.03 / 0.04)
    assert loss["delta_W4A4_fc2a8"] == pytest.approx(0.07)
    assert loss["D_over_N"] == pytest.approx(100.0)
    val = out[out["metric"] == "val_loss"].iloc[0]
    assert val["ratio_R"] == pytest.approx(0.07 / 0.05)
    assert val["sum_components"] == pytest.approx(0.12)


def test_missing_runs_give_nan():
    runs = runs_table({("s", 32): {"W4A4": 0.09, "W4A16": 0.04}, ("s", 64): {"W16A4": 0.05}})
    out = decompose.decomposition(runtable.delta_table(runs))
    loss = out[out["metric"] == "loss"].set_index("group")
    assert set(loss.index) == {"32", "64"}
    assert np.isnan(loss.loc["32", "delta_W16A4"]) and np.isnan(loss.loc["32", "ratio_R"])
    assert np.isnan(loss.loc["32", "delta_W16A4_fc2a8"]) and np.isnan(loss.loc["32", "ratio_R_fc2a8"])
    assert np.isnan(loss.loc["64", "delta_W4A4"]) and loss.loc["64", "delta_W16A4"] == pytest.approx(0.05)


def test_fit_recovers_the_slope_through_the_origin():
    rng = np.random.default_rng(0)
    cells = {}
    for i in range(40):
        w, a = rng.uniform(0.01, 0.05), rng.uniform(0.02, 0.08)
        cells[f"s{i}", 32] = {"W4A16": w, "W16A4": a, "W4A4": 0.9 * (w + a) * (1 + rng.normal(0, 0.02))}
    cells["bad", 32] = {"W4A16": 0.02, "W4A4": 0.05}  # no W16A4 run: dropped from the fit
    fit = decompose.decomposition_fit(decompose.decomposition(runtable.delta_table(runs_table(cells))))
    assert list(fit.columns) == list(decompose.FIT_COLUMNS)
    loss = fit.set_index("metric").loc["loss"]
    assert loss["k"] == pytest.approx(0.9, abs=0.01)
    assert 0.99 < loss["r2"] < 1
    assert (loss["n"], loss["n_dropped"]) == (40, 1)


def test_fit_is_exact_without_noise():
    cells = {("a", 32): {"W4A16": 0.02, "W16A4": 0.03, "W4A4": 0.045},
             ("b", 32): {"W4A16": 0.01, "W16A4": 0.05, "W4A4": 0.054}}
    fit = decompose.decomposition_fit(decompose.decomposition(runtable.delta_table(runs_table(cells))))
    for row in fit.itertuples():
        assert row.k == pytest.approx(0.9) and row.r2 == pytest.approx(1.0) and row.n == 2


def test_uncentred_r2_on_hand_values():
    # x = (1, 2), y = (1, 3): k = (1 + 6) / 5 = 1.4; residuals -0.4, 0.2; R² = 1 - 0.2 / 10 = 0.98
    decomp = pd.DataFrame({"metric": ["loss", "loss"], "sum_components": [1.0, 2.0], "delta_W4A4": [1.0, 3.0]})
    row = decompose.decomposition_fit(decomp).iloc[0]
    assert row["k"] == pytest.approx(1.4) and row["r2"] == pytest.approx(0.98)


def test_run_decompose_writes_both_tables(tmp_path):
    runs = runs_table({("s", 32): {"W4A4": 0.09, "W4A16": 0.04, "W16A4": 0.06}})
    runs.to_parquet(tmp_path / "runs.parquet")
    fit = decompose.run_decompose(tmp_path / "runs.parquet", tmp_path / "out" / "decomposition.parquet",
                                  tmp_path / "out" / "fit.parquet")
    assert fit.set_index("metric").loc["loss", "k"] == pytest.approx(0.9)
    written = pd.read_parquet(tmp_path / "out" / "decomposition.parquet")
    assert len(written) == 2 and written["ratio_R"].tolist() == pytest.approx([1.5, 1.5])
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "out" / "fit.parquet"), fit)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["decomposition.parquet", "fit.parquet"]


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(runtable.RunTableError, match="runs.parquet: run table not found"):
        decompose.run_decompose(tmp_path / "runs.parquet", tmp_path / "d.parquet", tmp_path / "f.parquet")
    runs = runs_table({("s", 32): {"W4A4-qkva8": 0.05}})
    with pytest.raises(decompose.DecomposeError, match="no runs of precision W4A4"):
        decompose.decomposition(runtable.delta_table(runs))
