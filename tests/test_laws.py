"""Laws without training: the shipped constants, predictions on grids, the plan's ranking and memory, warnings."""

from __future__ import annotations


import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qatlaw import cli, fit, laws

ROOT = Path(__file__).resolve().parents[1]
QATLAW = [sys.executable, "-m", "qatlaw"]


def table1(precision: str, N: float, D: float, G: float) -> float:
    """δ by hand from the paper's Table 1."""
    k, gn, gd, gg = {"W4A4": (0.1582, 0.2186, 0.0745, 0.7779), "W4A16": (0.2522, 0.3589, 0.1610, 0.3533),
                     "W16A4": (0.1004, 0.1816, 0.0331, 0.9812),
                     "W4A4-fc2a8": (0.3519, 0.2637, 0.0964, 0.3407)}[precision]
    return k * D**gd * math.log2(G) ** gg / N**gn


@pytest.mark.parametrize("precision,N,D,G", [("W4A4", 7e9, 2e12, 128), ("W4A4", 74e6, 10e9, 32),
                                             ("W4A16", 595e6, 100e9, 256), ("W16A4", 1e9, 1e11, 64),
                                             ("W4A4-fc2a8", 297e6, 50e9, 128)])
def test_paper_law_gives_table_1(precision, N, D, G):
    row = laws.predict(laws.load("paper"), [N], [D], [G], [precision]).iloc[0]
    assert row["delta"] == pytest.approx(table1(precision, N, D, G), rel=1e-12)
    bf16 = 1.9279 + 237.7042 / N**0.3022 + 596.2490 / D**0.3022
    assert row["bf16_loss"] == pytest.approx(bf16) and row["qat_loss"] == pytest.approx(bf16 + row["delta"])
    assert math.isnan(row["delta_low"])  # the paper gives no draws


def test_the_issue_example_is_0_0418():
    assert laws.predict(laws.load(), [7e9], [2e12], [128], ["W4A4"]).iloc[0]["delta"] == pytest.approx(0.0418, abs=5e-5)


def test_predict_covers_the_whole_grid_and_has_intervals_with_draws():
    law = laws.load("laptop")
    table = laws.predict(law, [1e5, 3e5], [1e7, 2e7], [16, 64], ["W4A4", "W16A4"])
    assert len(table) == 16 and list(table.columns) == list(laws.PREDICTION_COLUMNS)
    assert (table["delta_low"] <= table["delta"]).all() and (table["delta"] <= table["delta_high"]).all()
    shipped = pd.read_parquet(ROOT / "reference" / "laptop" / "fit" / "params.parquet")
    pd.testing.assert_frame_equal(law.params, shipped)  # the packaged law is the reference fit


def test_memory_accounting():
    # W4A4 at G = 128: 4 bits plus a 16-bit scale per 128 weights, in every layer
    assert laws.weight_memory_gb("W4A4", 1e9, 128) == pytest.approx(1e9 * (4 + 16 / 128) / 8 / 1e9)
    assert laws.weight_memory_gb("W16A4", 1e9, 128) == pytest.approx(2.0)  # weights unquantized: 16 bits, no scales
    # 8-bit FC2 weights: FC2 is 8/3 of the block's 10.5 h² of linear weights
    share = (8 / 3) / 10.5
    expected = share * (8 + 16 / 32) + (1 - share) * (4 + 16 / 32)
    assert laws.weight_memory_gb("W4A4-fc2w8", 1e9, 32) == pytest.approx(expected / 8)
    # the formats' block scales are 8 bits: MXFP4 4 + 8/32, NVFP4 4 + 8/16; an 8-bit override stays INT8
    assert laws.weight_memory_gb("W4A4-mxfp4", 1e9, 32) == pytest.approx((4 + 8 / 32) / 8)
    assert laws.weight_memory_gb("W4A4-nvfp4", 1e9, 16) == pytest.approx((4 + 8 / 16) / 8)
    expected = share * (8 + 16 / 32) + (1 - share) * (4 + 8 / 32)
    assert laws.weight_memory_gb("W4A4-mxfp4-fc2w8", 1e9, 32) == pytest.approx(expected / 8)


def test_plan_ranks_by_qat_loss_and_names_the_best_that_fits():
    law = laws.load("paper")
    N, D = 7e9, 2e12
    table = laws.plan(law, N, D, memory_gb=3.7)
    assert len(table) == 5 * 4 and set(table["G"]) == {32, 64, 128, 256}
    by_hand = sorted(((table1(p, N, D, G) if p in ("W4A4", "W4A16", "W16A4", "W4A4-fc2a8") else None, p, G)
                      for p, G in zip(table["precision"], table["G"])), key=lambda t: (t[0] is None, t[0] or 0))
    w4a16 = [(p, G) for d, p, G in by_hand if p == "W4A16"]
    assert [tuple(r) for r in table[table["precision"] == "W4A16"][["precision", "G"]].to_numpy()] == w4a16
    assert table["qat_loss"].is_monotonic_increasing
    best = table[table["best"]].iloc[0]
    assert best["weight_gb"] <= 3.7 and (table.loc[: best.name - 1, "fits"] == False).all()  # noqa: E712
    # W4A16 at G = 32 is the lowest δ of all but needs 3.94 GB: over the budget
    assert table.iloc[0]["precision"] == "W4A16" and table.iloc[0]["G"] == 32 and not table.iloc[0]["fits"]
    assert (best["precision"], best["G"]) == ("W4A16", 128)


def test_extrapolation_warning_names_what_is_outside():
    law = laws.load("paper")
    assert laws.extrapolation_warnings(law, [3e8], [5e10]) == []
    lines = laws.extrapolation_warnings(law, [7e9], [5e10])
    assert len(lines) == 1 and lines[0].startswith("warning: N = 7e+09 lies more than 10x outside")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*QATLAW, *args], capture_output=True, text=True, cwd=ROOT)


def test_cli_predict_json_out_and_warning(tmp_path):
    result = run("predict", "--N", "1e9,7e9", "--D", "1e11,2e12", "--G", "32,128", "--precision", "W4A4,W16A4",
                 "--json", "--out", str(tmp_path / "p.parquet"))
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)
    assert len(records) == 16 and len(pd.read_parquet(tmp_path / "p.parquet")) == 16
    assert "warning: N = 7e+09" in result.stderr and "warning: D = 2e+12" in result.stderr


@pytest.mark.slow
def test_cli_plan_and_laws(tmp_path):
    result = run("plan", "--N", "1e9", "--D", "1e11", "--memory-gb", "1", "--plot", str(tmp_path / "plan.png"))
    assert result.returncode == 0, result.stderr
    assert "best: " in result.stdout and (tmp_path / "plan.png").stat().st_size > 10_000
    listing = run("laws")
    assert "| paper |" in listing.stdout and "| laptop |" in listing.stdout


@pytest.mark.parametrize("args,message", [
    (["--precision", "W9Z"], "qatlaw predict: error: --precision W9Z: invalid precision"),
    (["--law", "laptop", "--precision", "W4A4-fc2a8"],
     "qatlaw predict: error: law laptop has no fitted unified law for precision W4A4-fc2a8"),
    (["--law", "no/such/params.parquet"], "qatlaw predict: error: --law no/such/params.parquet: neither"),
])
def test_cli_bad_input_is_one_line(args, message):
    result = run("predict", "--N", "1e9", "--D", "1e11", "--G", "32", *args)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr


@pytest.mark.parametrize("command", ["predict", "plan"])
def test_a_fit_without_any_unified_law_is_refused_in_one_line(command):
    """reference/laptop-split fits no δ law (one G, one precision): predict and plan say so, not a traceback."""
    folder = ROOT / "reference" / "laptop-split" / "fit"
    extra = ["--G", "32"] if command == "predict" else []
    result = run(command, "--law", str(folder), "--N", "1e5", "--D", "4e6", *extra)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "no precision has a fitted unified law" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_law_file_without_the_precision(tmp_path):
    params = pd.read_parquet(ROOT / "reference" / "laptop" / "fit" / "params.parquet")
    params[params["precision"] != "W16A4"].to_parquet(tmp_path / "params.parquet", index=False)
    result = run("predict", "--law", str(tmp_path / "params.parquet"), "--N", "1e5", "--D", "1e7", "--G", "16",
                 "--precision", "W16A4")
    assert result.returncode != 0
    assert "has no fitted unified law for precision W16A4" in result.stderr
    assert fit.read_params(tmp_path / "params.parquet") is not None


@pytest.mark.parametrize("args", [["--N", "-1", "--D", "1e11"], ["--N", "1e9,2e9", "--D", "1e11"],
                                  ["--N", "1e9", "--D", "1e11", "--memory-gb", "0"]])
def test_cli_plan_refuses_a_bad_number_in_one_line(args):
    result = run("plan", *args)
    assert result.returncode == 2
    assert [line for line in result.stderr.splitlines() if "error" in line] == [result.stderr.strip().splitlines()[-1]]
    assert "positive number" in result.stderr


def test_a_law_fitted_at_one_g_predicts_there_only(tmp_path):
    """γG NaN (one G among its runs): the law is listed, predicts at that G, and refuses another in one line."""
    import numpy as np

    from qatlaw import fit as qfit

    rows = [{"N": n, "D": d, "G": 32, "delta": 0.5 * d**0.07 / n**0.22, "precision": "MXFP4-fwd",
             "run_id": f"r{i}", "held_out": "none"}
            for i, (n, d) in enumerate((n, d) for n in (3e7, 1e8, 3e8) for d in (1e9, 1e10, 1e11))]
    runs = pd.DataFrame(rows)
    law = qfit.DeltaLaw().fit(runs)
    params = pd.DataFrame([{"law": "unified", "precision": "MXFP4-fwd", "constant": c, "value": v, "ci_low": np.nan,
                            "ci_high": np.nan, "n_runs": 9, "n_dropped": 0, "objective": 0.0}
                           for c, v in law.constants.items()])
    params.to_parquet(tmp_path / "params.parquet", index=False)
    runs.assign(law="unified", observed=runs["delta"], predicted=runs["delta"], residual=0.0, rel_error=0.0) \
        .loc[:, list(qfit.PREDICTIONS_COLUMNS)].to_parquet(tmp_path / "predictions.parquet", index=False)
    loaded = laws.load(str(tmp_path))
    assert loaded.precisions == ["MXFP4-fwd"] and loaded.one_g("MXFP4-fwd") == 32
    point = laws.predict(loaded, [1e8], [1e10], [32], ["MXFP4-fwd"]).iloc[0]
    assert point["delta"] == pytest.approx(0.5 * 1e10**0.07 / 1e8**0.22, rel=1e-6)
    with pytest.raises(laws.LawError, match="fitted at one G for MXFP4-fwd \\(32\\): gamma_G is not identified"):
        laws.predict(loaded, [1e8], [1e10], [64], ["MXFP4-fwd"])


def test_the_shipped_quartet_law_predicts_at_g_32_and_plan_ranks_it_beside_int4(capsys, tmp_path):
    law = laws.load("quartet")
    assert law.precisions == ["MXFP4-fwd", "MXFP4-full"] and law.one_g("MXFP4-fwd") == 32
    assert cli.main(["predict", "--law", "quartet", "--N", "1e8", "--D", "1e10", "--G", "32",
                     "--precision", "MXFP4-fwd"]) == 0
    assert cli.main(["predict", "--law", "quartet", "--N", "1e8", "--D", "1e10", "--G", "64",
                     "--precision", "MXFP4-fwd"]) != 0
    assert "predicts at G = 32 only" in capsys.readouterr().err
    # its labels stand for MXFP4 with a Hadamard rotation of 32: plan counts 4 + 8/32 bits a weight
    table = laws.plan([laws.load("paper"), law], 1e9, 2e10)
    mx = table[table["law"] == "quartet"]
    assert set(mx["weights"]) == {"W4A4-mxfp4-had32"} and set(mx["G"]) == {32}
    assert mx["weight_gb"].tolist() == pytest.approx([1e9 * (4 + 8 / 32) / 8 / 1e9] * 2)
    own = laws.predict(law, [1e9], [2e10], [32], ["MXFP4-fwd"]).iloc[0]["delta"]
    assert mx.set_index("precision").loc["MXFP4-fwd", "delta"] == pytest.approx(own)
    paper_bf16 = laws.predict(laws.load("paper"), [1e9], [2e10], [32], ["W4A4"]).iloc[0]["bf16_loss"]
    np.testing.assert_allclose(table["qat_loss"], paper_bf16 + table["delta"])  # one base: the first law's
    assert table["qat_loss"].is_monotonic_increasing and set(table["law"]) == {"paper", "quartet"}
    assert cli.main(["plan", "--law", "paper,quartet", "--N", "1e9", "--D", "2e10"]) == 0
    assert "MXFP4-fwd" in capsys.readouterr().out
    # the same labels in a fit folder of the user's own mean nothing to plan
    folder = tmp_path / "mine"
    shutil.copytree(laws.SHIPPED["quartet"], folder)
    assert cli.main(["plan", "--law", str(folder), "--N", "1e9", "--D", "2e10"]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a precision string" in err
    shipped = pd.read_parquet(ROOT / "reference" / "quartet" / "fit" / "params.parquet")
    pd.testing.assert_frame_equal(law.params.reset_index(drop=True), shipped)
