"""Findings: verdict rules, the decomposition slope and FC2 changes on known inputs, FINDINGS.md from a
synthetic results folder, and the reference packager."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from test_plots import write_results

from qatlaw import config, findings, reference


def test_sign_verdicts():
    assert findings._sign_verdict(0.1, 0.3)[0] == "reproduced"
    assert findings._sign_verdict(-0.3, -0.1)[0] == "opposite"
    assert findings._sign_verdict(-0.1, 0.2)[0] == "not reproduced"
    assert findings._sign_verdict(-0.3, -0.1, positive=False)[0] == "reproduced"
    assert findings._sign_verdict(math.nan, math.nan)[0] == "not reproduced"


def decomposition(k: float, fc2_change: dict[int, float], noise: float = 0.0) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    rows = []
    for cell in range(12):
        for G, change in fc2_change.items():
            w, a = 0.01 * (1 + cell), 0.012 * (1 + cell)
            d = k * (w + a) * (1 + noise * rng.standard_normal())
            rows.append({"size": f"s{cell % 3}", "tokens_requested": 10**6 * (1 + cell // 3), "seed": 0, "G": G,
                         "delta_W4A4": d, "delta_W4A16": w, "delta_W16A4": a, "sum_components": w + a,
                         "delta_W4A4_fc2a8": d * (1 + change)})
    return pd.DataFrame(rows)


def test_decomposition_slope_and_ratio_are_recovered():
    decomp = decomposition(0.9, {8: -0.1})
    row = findings.decomposition_finding(decomp)
    assert row["measured"] == pytest.approx(0.9) and row["verdict"] == "reproduced"
    assert findings.decomposition_finding(decomposition(0.5, {8: -0.1}))["verdict"] == "not reproduced"
    ratio = findings.ratio_finding(decomp)
    assert ratio["measured"] == pytest.approx(1.2) and ratio["verdict"] == "reproduced"


def test_fc2_changes_per_group_and_coarse_vs_fine():
    rows = findings.fc2_findings(decomposition(0.9, {8: -0.1, 64: -0.3}, noise=0.05))
    per_g = {r["finding"]: r for r in rows}
    assert per_g["FC2-8-bit lowers delta_W4A4 at G=8"]["measured"] == pytest.approx(-0.1)
    assert per_g["FC2-8-bit lowers delta_W4A4 at G=64"]["verdict"] == "reproduced"
    coarse = per_g["FC2-8-bit lowers delta more at G=64 than at G=8"]
    assert coarse["measured"] == pytest.approx(-0.2) and coarse["verdict"] == "reproduced"
    rows = findings.fc2_findings(decomposition(0.9, {8: 0.2, 64: 0.2}))
    assert rows[0]["verdict"] == "opposite"


def test_seed_noise_needs_three_seeds():
    decomp = pd.concat([decomposition(0.9, {64: -0.1}).assign(seed=s) for s in range(3)], ignore_index=True)
    decomp.loc[decomp["seed"] == 2, "delta_W4A4"] *= 1.3
    noise = findings.seed_noise(decomp)
    w = noise[noise["delta"] == "delta_W4A4"]
    assert len(w) == 12 and (w["seeds"] == 3).all()
    first = decomp[(decomp["size"] == "s0") & (decomp["tokens_requested"] == 10**6)]["delta_W4A4"].to_numpy()
    assert w["cv"].iloc[0] == pytest.approx(first.std(ddof=1) / first.mean())
    assert findings.seed_noise(decomp[decomp["seed"] < 2]).empty


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
    assert set(table["verdict"]) <= {"reproduced", "not reproduced", "opposite"}
    held = table.set_index("finding").loc["held-out largest N: W4A4 mean relative error <= 10%"]
    assert held["measured"] == 0.06 and held["verdict"] == "reproduced"
    names = set(table["finding"])
    assert {"W4A4 gamma_N > 0", "W4A4 gamma_D > 0", "W4A4 gamma_G > 0", "gamma_D W4A16 > gamma_D W16A4"} <= names
    # the synthetic laws have W4A4 γN 0.2 > 0 with draws around it: the interval comes from the stored draws
    gn = table.set_index("finding").loc["W4A4 gamma_N > 0"]
    assert gn["ci_low"] < gn["measured"] < gn["ci_high"]
    kurt = table[table["finding"].str.startswith("FC2 input kurtosis highest (BF16")].iloc[0]
    assert kurt["verdict"] == "reproduced" and kurt["measured"] == pytest.approx(120 - 5.5)  # other layers: 5 and 6 in the two blocks
    text = (tmp_path / "FINDINGS.md").read_text()
    assert text.startswith("# T") and "| W4A4 gamma_N > 0 |" in text
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "findings.parquet"), table)


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
