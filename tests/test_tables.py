"""Tables: the paper's Tables 1, 2 and 4 from hand-made fit outputs, next to the paper's numbers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qatlaw import fit, report_inputs, tables

FITTED = {"W4A4": (0.2, 0.25, 0.08, 0.7), "W4A16": (0.3, 0.35, 0.15, 0.4), "W16A4": (0.1, 0.2, 0.03, 0.9),
          "W4A4-fc2a8": (0.35, 0.26, 0.1, 0.34), "W16A4-fc2a8": (np.nan,) * 4, "W4A8": (0.05, 0.3, 0.1, 0.5),
          "W4A4-qkva8": (np.nan,) * 4}
CHIN = {"A": 300.0, "B": 500.0, "E": 2.0, "alpha": 0.31, "beta": 0.31}
REL_ERROR = {"unified": 0.05, "no_D": 0.09, "epm": 0.12, "chinchilla": 0.01}


def params() -> pd.DataFrame:
    """A params table: unified, no_D (γD = 0) and EPM laws per precision of FITTED, intervals ±10%, and the
    Chinchilla law; the EPM of W4A16 has one of its two granularities unfitted."""
    rows = []

    def add(law: str, precision: str, values: dict) -> None:
        rows.extend({"law": law, "precision": precision, "constant": name, "value": value,
                     "ci_low": 0.9 * value, "ci_high": 1.1 * value, "n_runs": 8, "n_dropped": 2, "objective": 0.1}
                    for name, value in values.items())

    add("chinchilla", "BF16", CHIN)
    for precision, values in FITTED.items():
        law = dict(zip(fit.DELTA_CONSTANTS, values, strict=True))
        add("unified", precision, law)
        add("no_D", precision, law | {"gamma_D": 0.0})
        add("epm", precision, {"eff_G32": 0.8, "eff_Gchannel": np.nan if precision == "W4A16" else 0.6})
    return pd.DataFrame(rows, columns=fit.PARAMS_COLUMNS)


def comparison() -> pd.DataFrame:
    """A comparison table with the relative errors of REL_ERROR (NaN for unfitted laws); held-out D errors
    twice the in-sample ones, no held-out N."""
    rows = [{"law": "chinchilla", "precision": "BF16", "rel_error": 0.01, "n_runs": 4}]
    for precision, values in FITTED.items():
        for law in ("unified", "no_D", "epm"):
            error = np.nan if np.isnan(values[0]) and law != "epm" else REL_ERROR[law]
            rows.append({"law": law, "precision": precision, "rel_error": error, "n_runs": 8})
    table = pd.DataFrame(rows)
    return table.assign(heldout_largest_N_rel_error=np.nan, heldout_largest_D_rel_error=2 * table["rel_error"])


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    paths = {"params": tmp_path / "params.parquet", "comparison": tmp_path / "comparison.parquet"}
    params().to_parquet(paths["params"], index=False)
    comparison().to_parquet(paths["comparison"], index=False)
    return paths


def test_table1_lists_constants_with_intervals_next_to_the_paper(inputs: dict[str, Path], tmp_path: Path):
    out = tmp_path / "tables" / "table1_constants"
    table = tables.make_table("table1_constants", inputs, out)
    assert list(table.columns) == list(tables.TABLE1_COLUMNS)
    assert list(dict.fromkeys(table["precision"])) == ["W4A4", "W4A16", "W16A4", "W4A4-fc2a8", "W16A4-fc2a8",
                                                       "W4A8", "BF16"]  # the unfitted ablation is left out
    row = table.set_index(["precision", "constant"]).loc[("W4A4", "gamma_D")]
    assert (row["value"], row["ci_low"], row["ci_high"], row["paper"]) == pytest.approx((0.08, 0.072, 0.088, 0.0745))
    assert table.set_index(["precision", "constant"]).loc[("BF16", "alpha"), "paper"] == 0.3022
    assert np.isnan(table.set_index(["precision", "constant"]).loc[("W4A8", "k"), "paper"])
    assert len(table) == 6 * 4 + 5
    csv = pd.read_csv(out.with_suffix(".csv"))
    assert len(csv) == len(table) and csv.loc[0, "value"] == pytest.approx(0.2)
    md = out.with_suffix(".md").read_text()
    assert "| δ_W4A4 | γD | 0.08 | [0.072, 0.088] | 0.0745 | 8 (2 left out) |" in md
    assert "| δ_W16A4, FC2 input 8 bit | k | not fitted | – | 0.1273 |" in md
    assert "| Chinchilla (BF16 loss) | α | 0.31 | [0.279, 0.341] | 0.3022 |" in md


def test_table2_compares_epm_and_unified_laws(inputs: dict[str, Path], tmp_path: Path):
    out = tmp_path / "table2_laws"
    table = tables.make_table("table2_laws", inputs, out).set_index(["precision", "law"])
    assert table.loc[("W4A4", "epm"), "rel_error_pct"] == pytest.approx(12.0)
    assert table.loc[("W4A4", "unified"), "rel_error_pct"] == pytest.approx(5.0)
    assert table.loc[("W4A4", "unified"), "heldout_largest_D_pct"] == pytest.approx(10.0)
    assert table.loc[("W4A4", "epm"), "paper_rel_error_pct"] == 8.5
    assert table.loc[("W4A16", "unified"), "paper_rel_error_pct"] == 5.2
    assert table.loc[("W4A16", "epm"), "n_laws"] == 1 and table.loc[("W4A4", "epm"), "n_laws"] == 2
    assert table.loc[("W16A4-fc2a8", "unified"), "n_laws"] == 0
    assert "W4A4-qkva8" not in table.index.get_level_values("precision")
    md = out.with_suffix(".md").read_text()
    assert "| W4A4 | EPM, one law per G (Eq. 3) | 2 | 8 | 12.0% | n/a | 24.0% | 8.5% |" in md
    assert "| W16A4-fc2a8 | unified law (Eq. 5) | 0 | 8 | n/a | n/a | n/a | – |" in md


def test_table4_shows_the_gain_of_the_D_term(inputs: dict[str, Path], tmp_path: Path):
    out = tmp_path / "table4_no_D"
    table = tables.make_table("table4_no_D", inputs, out).set_index("precision")
    assert list(table.columns) == list(tables.TABLE4_COLUMNS[1:])
    assert tuple(table.loc["W4A4", ["without_D_pct", "with_D_pct"]]) == pytest.approx((9.0, 5.0))
    assert tuple(table.loc["W4A16", ["paper_without_D_pct", "paper_with_D_pct"]]) == (13.8, 5.2)
    assert np.isnan(table.loc["W16A4-fc2a8", "with_D_pct"])
    md = out.with_suffix(".md").read_text()
    assert "| W4A4 | 8 | 9.0% | 5.0% | 18.0% | 10.0% | 8.6% | 4.7% |" in md


def test_bad_inputs_are_one_line_errors(inputs: dict[str, Path], tmp_path: Path):
    with pytest.raises(report_inputs.PlotError, match=r"missing\.parquet: comparison table not found"):
        tables.make_table("table4_no_D", inputs | {"comparison": tmp_path / "missing.parquet"}, tmp_path / "t")
    broken = tmp_path / "broken.parquet"
    comparison().drop(columns=["rel_error"]).to_parquet(broken)
    with pytest.raises(report_inputs.PlotError, match=r"broken\.parquet: comparison table lacks columns rel_error; expected columns law, "):
        tables.make_table("table2_laws", inputs | {"comparison": broken}, tmp_path / "t")
    with pytest.raises(report_inputs.PlotError, match="unknown table"):
        tables.make_table("table3", inputs, tmp_path / "t")


def test_tables_load_no_plotting_library():
    code = "import sys, qatlaw.tables; print(sorted({'matplotlib', 'seaborn'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def _curve(path: Path, loss_ema: list[float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    steps = np.arange(1, len(loss_ema) + 1)
    pd.DataFrame({"step": steps, "tokens": 100 * steps, "loss_ema": loss_ema}).to_parquet(path)


def test_gap_opening_reads_when_each_qat_run_leaves_its_baseline(tmp_path: Path):
    runs = pd.DataFrame({"run_id": ["s/1K/seed0/BF16", "s/1K/seed0/W4A4_g8", "s/1K/seed0/W4A16_g8"],
                         "size": "s", "N": 1000, "D": 1000, "tokens_requested": 1000, "group": ["none", "8", "8"],
                         "G": [np.nan, 8.0, 8.0], "precision": ["BF16", "W4A4", "W4A16"], "seed": 0,
                         "loss": 3.0, "diverged": False})
    runs.to_parquet(tmp_path / "runs.parquet")
    base = [4.0, 3.5, 3.2, 3.0, 2.9, 2.8, 2.7, 2.6]
    _curve(tmp_path / "runs/s/1K/seed0/BF16/metrics.parquet", base)
    # the gap: large at the first step, small until the middle, then open at 0.1 from step 6 on
    _curve(tmp_path / "runs/s/1K/seed0/W4A4_g8/metrics.parquet",
           [b + g for b, g in zip(base, [0.3, 0.01, 0.02, 0.02, 0.03, 0.08, 0.1, 0.1], strict=True)])
    _curve(tmp_path / "runs/s/1K/seed0/W4A16_g8/metrics.parquet", [b - 0.01 for b in base])
    table = tables.make_table("gap_opening", {"runs": tmp_path / "runs.parquet"}, tmp_path / "gap").set_index("run_id")
    w4a4 = table.loc["s/1K/seed0/W4A4_g8"]
    assert (w4a4["gap_25"], w4a4["gap_50"], w4a4["gap_75"], w4a4["gap_100"]) == pytest.approx((0.01, 0.02, 0.08, 0.1))
    assert w4a4["opened_at"] == pytest.approx(5 / 8)  # steps 1-5 are below 0.05 but the first
    assert np.isnan(table.loc["s/1K/seed0/W4A16_g8", "opened_at"])  # a negative final gap never opened
    md = (tmp_path / "gap.md").read_text()
    assert "| s/1K/seed0/W4A4_g8 | 0.0100 | 0.0200 | 0.0800 | 0.1000 | 62% |" in md
    assert "| s/1K/seed0/W4A16_g8 | -0.0100 | -0.0100 | -0.0100 | -0.0100 | never |" in md
