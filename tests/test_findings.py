"""Findings: the four verdicts of every kind of finding (each can come out opposite and within noise), band
verdicts spanning an edge, ratios of means, intervals at the level of the design, FINDINGS.md from a synthetic
results folder, and the reference packager."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from conftest import write_results

from qatlaw import config, findings, reference, resample


def test_sign_and_band_verdicts():
    assert findings.sign_verdict(0.1, 0.3)[0] == "reproduced"
    assert findings.sign_verdict(-0.3, -0.1)[0] == "opposite"
    assert findings.sign_verdict(-0.1, 0.2)[0] == "within noise"
    assert findings.sign_verdict(-0.3, -0.1, positive=False)[0] == "reproduced"
    assert findings.sign_verdict(math.nan, math.nan)[0] == "not measurable"
    assert findings.band_verdict(0.85, 0.95, (0.8, 1.0))[0] == "reproduced"
    assert findings.band_verdict(0.5, 0.7, (0.8, 1.0))[0] == "opposite"
    assert findings.band_verdict(1.1, 1.4, (0.8, 1.0))[0] == "opposite"
    spans = findings.band_verdict(0.877, 1.43, (0.8, 1.0))  # the default run's k: it holds 0.906, spans 1
    assert spans == ("within noise", "interval spans an edge of [0.8, 1]")


def decomposition(k: float, fc2_change: dict[int, float], noise: float = 0.0, seeds: int = 1,
                  weight: float = 0.01, act: float = 0.012) -> pd.DataFrame:
    """12 cells (4 sizes × 3 budgets) × seeds × G of δ_W4A4 = k·(δ_W4A16 + δ_W16A4)·(1 + noise·z), the FC2-8-bit
    δ changed by ``fc2_change[G]``."""
    rng = np.random.default_rng(1)
    rows = []
    for cell in range(12):
        for seed in range(seeds):
            for G, change in fc2_change.items():
                w, a = weight * (1 + cell), act * (1 + cell)
                d = k * (w + a) * (1 + noise * rng.standard_normal())
                rows.append({"size": f"s{cell % 4}", "tokens_requested": 10**6 * (1 + cell // 4), "seed": seed,
                             "G": G, "delta_W4A4": d, "delta_W4A16": w, "delta_W16A4": a, "sum_components": w + a,
                             "delta_W4A4_fc2a8": d * (1 + change) * (1 + noise * rng.standard_normal())})
    return pd.DataFrame(rows)


def test_decomposition_k_reproduced_opposite_and_spanning_the_band():
    row = findings.decomposition_finding(decomposition(0.9, {8: -0.1}))
    assert row["measured"] == pytest.approx(0.9) and row["verdict"] == "reproduced"
    assert findings.decomposition_finding(decomposition(0.5, {8: -0.1}))["verdict"] == "opposite"
    noisy = findings.decomposition_finding(decomposition(1.0, {8: -0.1}, noise=0.3))
    assert noisy["verdict"] == "within noise" and noisy["ci_low"] < 1.0 < noisy["ci_high"]
    none = findings.decomposition_finding(decomposition(0.9, {8: 0.0}).iloc[:0])
    assert none["verdict"] == "not measurable" and "no cell with W4A4, W4A16 and W16A4" in none["reason"]


def test_activation_over_weight_error_is_a_paired_difference_with_r_as_a_ratio_of_means():
    row = findings.ratio_finding(decomposition(0.9, {8: -0.1}))
    assert row["measured"] == pytest.approx(0.002 * 6.5) and row["verdict"] == "reproduced"
    assert "R = 1.20" in row["reason"]
    assert findings.ratio_finding(decomposition(0.9, {8: -0.1}, act=0.008))["verdict"] == "opposite"
    even = decomposition(0.9, {8: -0.1})
    even["delta_W16A4"] = even["delta_W4A16"] * (1 + 0.5 * np.random.default_rng(3).standard_normal(len(even)))
    assert findings.ratio_finding(even)["verdict"] == "within noise"


@pytest.mark.slow
def test_fc2_changes_are_ratios_of_means_per_group_and_coarse_vs_fine():
    rows = findings.fc2_findings(decomposition(0.9, {8: -0.1, 64: -0.3}, noise=0.02))
    per_g = {r["finding"]: r for r in rows}
    assert per_g["FC2-8-bit lowers delta_W4A4 at G=8"]["measured"] == pytest.approx(-0.1, abs=0.01)
    assert per_g["FC2-8-bit lowers delta_W4A4 at G=64"]["verdict"] == "reproduced"
    coarse = per_g["FC2-8-bit lowers delta more at G=64 than at G=8"]
    assert coarse["measured"] == pytest.approx(-0.2, abs=0.02) and coarse["verdict"] == "reproduced"
    assert findings.fc2_findings(decomposition(0.9, {8: 0.2, 64: 0.2}))[0]["verdict"] == "opposite"
    noisy = findings.fc2_findings(decomposition(0.9, {8: 0.0, 64: 0.0}, noise=0.5))
    assert {r["verdict"] for r in noisy} == {"within noise"}


def test_a_near_zero_cell_cannot_swing_a_ratio_of_means():
    """laptop's G 64 row: one cell of δ_W4A4 = 0.0052 and δ_fc2a8 = −0.0050 is −197% as a ratio; as a ratio of
    means it weighs as little as its δ."""
    decomp = decomposition(0.9, {64: -0.25})
    decomp.loc[0, ["delta_W4A4", "delta_W4A4_fc2a8"]] = [0.0052, -0.0050]
    row = findings.fc2_findings(decomp)[0]
    mean_of_ratios = float((decomp["delta_W4A4_fc2a8"] / decomp["delta_W4A4"] - 1).mean())
    assert mean_of_ratios < -0.3 and row["measured"] == pytest.approx(-0.25, abs=0.02)


def kurtosis_tables(fc2: float, spread: float = 0.0) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(2)
    runs = pd.DataFrame([{"run_id": f"r{i}", "size": f"s{i % 3}", "tokens_requested": 10**6 * (1 + i // 3),
                          "seed": 0, "precision": "BF16"} for i in range(9)])
    rows = [{"run_id": r.run_id, "precision": "BF16", "layer_type": layer,
             "kurtosis_token": (fc2 if layer == "fc2" else 5.0) + spread * rng.standard_normal()}
            for r in runs.itertuples() for layer in ("qkv", "o", "fc1", "fc2")]
    return pd.DataFrame(rows), runs


def test_kurtosis_gap_reproduced_opposite_within_noise():
    assert findings.kurtosis_finding(*kurtosis_tables(40.0), "BF16")["verdict"] == "reproduced"
    assert findings.kurtosis_finding(*kurtosis_tables(2.0), "BF16")["verdict"] == "opposite"
    assert findings.kurtosis_finding(*kurtosis_tables(9.0, spread=3.0), "BF16")["verdict"] == "within noise"


def predictions(errors: np.ndarray, held_out: str = "largest_N") -> pd.DataFrame:
    observed = np.full(len(errors), 0.05)
    return pd.DataFrame({"run_id": [f"r{i}" for i in range(len(errors))], "law": "unified", "precision": "W4A4",
                         "observed": observed, "predicted": observed * (1 + errors), "rel_error": np.abs(errors),
                         "held_out": held_out})


def test_errors_in_sample_and_held_out_each_against_its_like_and_counted():
    runs = pd.DataFrame({"run_id": [f"r{i}" for i in range(12)], "size": [f"s{i % 4}" for i in range(12)],
                         "tokens_requested": [i // 4 for i in range(12)], "seed": 0})
    rng = np.random.default_rng(0)
    table = pd.concat([predictions(0.03 + 0.01 * rng.standard_normal(12), "none"),
                       predictions(0.5 + 0.1 * rng.standard_normal(12))], ignore_index=True)
    table.loc[11, "observed"] = -0.01  # a δ ≤ 0 has no relative error: counted, not scored
    in_sample, held = findings.error_findings(table, runs)
    assert in_sample["verdict"] == "reproduced" and in_sample["paper"].startswith("4.7% (in sample")
    assert (in_sample["n"], in_sample["left_out"]) == (11, 1) and "1 run with δ ≤ 0 not scored" in in_sample["reason"]
    assert held["verdict"] == "opposite" and held["n"] == 12
    spanning = findings.error_findings(predictions(0.1 + 0.08 * rng.standard_normal(12)), runs)[1]
    assert spanning["verdict"] == "within noise"


def test_seed_cv_interval_from_the_chi_square_of_the_variance():
    noise = pd.DataFrame([{"size": "0.3M", "tokens_requested": 4e6, "G": 32, "delta": "delta_W4A4", "seeds": 3,
                           "mean": 0.0575, "sd": 0.0082, "cv": 0.142, "values": ""},
                          {"size": "0.1M", "tokens_requested": 4e6, "G": 32, "delta": "delta_W4A4", "seeds": 3,
                           "mean": 0.05, "sd": 0.03, "cv": 0.6, "values": ""}])
    spans, above = findings.seed_finding(noise)
    assert spans["verdict"] == "within noise" and spans["ci_low"] < 0.10 < spans["ci_high"]
    assert spans["ci_low"] == pytest.approx(0.142 * math.sqrt(2 / 5.991), rel=1e-3)
    assert above["verdict"] == "opposite"


def test_seed_noise_needs_three_seeds():
    decomp = pd.concat([decomposition(0.9, {64: -0.1}).assign(seed=s) for s in range(3)], ignore_index=True)
    decomp.loc[decomp["seed"] == 2, "delta_W4A4"] *= 1.3
    noise = findings.seed_noise(decomp)
    w = noise[noise["delta"] == "delta_W4A4"]
    assert len(w) == 12 and (w["seeds"] == 3).all()
    first = decomp[(decomp["size"] == "s0") & (decomp["tokens_requested"] == 10**6)]["delta_W4A4"].to_numpy()
    assert w["cv"].iloc[0] == pytest.approx(first.std(ddof=1) / first.mean())
    assert findings.seed_noise(decomp[decomp["seed"] < 2]).empty
    assert findings.noise_floor(decomp) > 0 and math.isnan(findings.noise_floor(decomp[decomp["seed"] == 0]))


def law_params(values: dict[str, tuple[float, float, float]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """params rows of unified laws (precision -> γN, γD, γG) with draws N(value, sd)."""
    rng = np.random.default_rng(0)
    params, draws = [], []
    for precision, (value, sd, gd) in values.items():
        for constant, v in (("k", 0.1), ("gamma_N", value), ("gamma_D", gd), ("gamma_G", value)):
            d = v + sd * rng.standard_normal(200)
            params.append({"law": "unified", "precision": precision, "constant": constant, "value": v,
                           "ci_low": np.quantile(d, 0.05), "ci_high": np.quantile(d, 0.95), "n_runs": 20,
                           "n_dropped": 1, "objective": 0.0})
            draws += [{"law": "unified", "precision": precision, "draw": i, "constant": constant, "value": x}
                      for i, x in enumerate(d)]
    return pd.DataFrame(params), pd.DataFrame(draws)


def test_law_rows_opposite_within_noise_and_not_measurable_with_the_real_reason():
    params, draws = law_params({"W4A4": (-0.3, 0.05, 0.1), "W4A16": (0.1, 0.3, 0.1), "W16A4": (0.1, 0.3, 0.5)})
    deltas = pd.DataFrame({"precision": ["W4A4"] * 3, "N": [1, 2, 3], "D": [1, 1, 1], "G": [8, 8, 8]})
    rows = {r["finding"]: r for r in findings.law_findings(params, draws, deltas)}
    assert rows["W4A4 gamma_N > 0"]["verdict"] == "opposite" and rows["W4A4 gamma_N > 0"]["left_out"] == 1
    assert rows["W4A16 gamma_N > 0"]["verdict"] == "within noise"
    assert rows["gamma_D W4A16 > gamma_D W16A4"]["measured"] == pytest.approx(-0.4)
    missing = {r["finding"]: r for r in findings.law_findings(params[params["precision"] == "W4A4"].assign(
        value=np.nan), draws.iloc[:0], deltas)}
    assert missing["W4A4 gamma_N > 0"]["reason"] == "law not fitted: 3 W4A4 runs for 4 constants"
    assert missing["W4A16 gamma_N > 0"]["reason"] == "law not fitted: no W4A16 runs on this grid"
    assert {r["verdict"] for r in missing.values()} == {"not measurable"}


def test_design_resamples_keep_a_cells_seed_together_and_resample_seeds_inside_cells():
    plan = resample.Design(["a", "a", "a", "a", "b", "b"], [0, 0, 1, 1, 0, 0])
    assert plan.n_cells == 2 and plan.max_seeds == 2
    for idx in plan.draws(50, 0):
        units = {tuple(sorted(idx[idx // 2 == u])) for u in range(3)}
        for unit in units:  # rows 0-1 (a, seed 0), 2-3 (a, seed 1), 4-5 (b): never split
            assert len(set(unit)) <= 2 and all(unit.count(i) == unit.count(unit[0]) for i in unit)
    once = resample.runs(5)
    assert [len(i) for i in once.draws(3, 0)] == [5, 5, 5]
    np.testing.assert_array_equal(next(plan.draws(1, 7)), next(plan.draws(1, 7)))


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("findings")
    paths = write_results(root)
    for name in ("figures", "tables"):  # the packager ships figures and tables: one stand-in of each
        (root / "results" / name).mkdir(parents=True, exist_ok=True)
    (root / "results" / "figures" / "fig4_trends.png").write_bytes(b"png")
    (root / "results" / "tables" / "table1_constants.md").write_text("| table |\n")
    pd.DataFrame([{"law": "unified", "precision": "W4A4", "rel_error": 0.04, "n_runs": 27,
                   "heldout_largest_N_rel_error": 0.06, "heldout_largest_D_rel_error": 0.08}]).to_parquet(
        root / "results" / "fit" / "comparison.parquet", index=False)
    return root / "results", paths


def test_findings_of_a_results_folder(results, tmp_path):
    folder, _ = results
    table = findings.run_findings(folder, tmp_path / "FINDINGS.md", tmp_path / "findings.parquet", "loss", "T")
    assert list(table.columns) == list(findings.COLUMNS)
    assert set(table["verdict"]) <= set(findings.VERDICTS)
    rows = table.set_index("finding")
    in_sample = rows.loc["W4A4 law in sample: mean relative error <= 10%"]
    assert in_sample["n"] > 0 and math.isfinite(in_sample["ci_low"])
    assert "Chinchilla alpha > 0" not in rows.index  # bounded at 0: a row that could not fail
    names = set(table["finding"])
    assert {"W4A4 gamma_N > 0", "W4A4 gamma_D > 0", "W4A4 gamma_G > 0", "gamma_D W4A16 > gamma_D W16A4"} <= names
    # the synthetic laws have W4A4 γN 0.2 > 0 with draws around it: the interval comes from the stored draws
    gn = table.set_index("finding").loc["W4A4 gamma_N > 0"]
    assert gn["ci_low"] < gn["measured"] < gn["ci_high"]
    kurt = table[table["finding"].str.startswith("FC2 input kurtosis highest (BF16")].iloc[0]
    assert kurt["verdict"] == "reproduced" and kurt["measured"] == pytest.approx(120 - 5.5)  # other layers: 5 and 6 in the two blocks
    text = (tmp_path / "FINDINGS.md").read_text()
    assert text.startswith("# T") and "| W4A4 gamma_N > 0 |" in text and "## The fitted laws" in text
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "findings.parquet"), table)


@pytest.mark.slow
def test_reference_package_holds_every_shipped_file(results, tmp_path):
    folder, _ = results
    cfg = config.load("config.yaml")
    out = reference.package(folder, tmp_path / "ref", cfg, wall_s=12.5, command="make reference", title="test")
    for name in ("runs.parquet", "fit/params.parquet", "fit/bootstrap.parquet", "analysis/decomposition.parquet",
                 "figures/fig4_trends.png", "tables/table1_constants.md", "config.yaml", "run.json",
                 "FINDINGS.md", "findings.parquet"):
        assert (out / name).is_file(), name
    info = json.loads((out / "run.json").read_text())
    assert info["wall_s"] == 12.5 and info["machine"]["cores"] >= 1
    assert config.read_yaml(out / "config.yaml") == cfg
    assert not list(tmp_path.glob(".ref.tmp"))


def test_reference_package_refuses_an_unfinished_folder(results, tmp_path):
    folder, _ = results
    with pytest.raises(reference.ReferenceError, match="bootstrap.parquet: missing"):
        partial = tmp_path / "partial"
        (partial / "fit").mkdir(parents=True)
        for name in ("runs.parquet", "fit/params.parquet", "fit/predictions.parquet", "fit/comparison.parquet"):
            (partial / name).write_bytes((folder / name).read_bytes())
        reference.package(partial, tmp_path / "ref", {}, wall_s=None, command="", title="")
    assert not (tmp_path / "ref").exists()
