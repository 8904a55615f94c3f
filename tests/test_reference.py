"""The shipped reference results stay honest: refitting the shipped runs gives the shipped constants, and the
shipped findings follow from the shipped files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from qatlaw import config, findings

REFERENCE = Path(__file__).resolve().parent.parent / "reference" / "laptop"


@pytest.mark.slow
def test_refit_of_the_shipped_runs_gives_the_shipped_constants(tmp_path):
    cfg = config.read_yaml(REFERENCE / "config.yaml")["fit"]
    subprocess.run([sys.executable, "-m", "qatlaw", "fit", "--runs", str(REFERENCE / "runs.parquet"),
                    "--out-dir", str(tmp_path), "--bootstrap", str(cfg["bootstrap"]), "--seed", str(cfg["seed"]),
                    "--metric", cfg["metric"]], check=True, capture_output=True)
    for name in ("params", "comparison"):
        shipped = pd.read_parquet(REFERENCE / "fit" / f"{name}.parquet")
        refit = pd.read_parquet(tmp_path / f"{name}.parquet")
        pd.testing.assert_frame_equal(refit, shipped, check_exact=False, rtol=1e-6, atol=1e-12)


def test_shipped_findings_follow_from_the_shipped_files():
    metric = config.read_yaml(REFERENCE / "config.yaml")["fit"]["metric"]
    table, _ = findings.findings(REFERENCE, metric)
    pd.testing.assert_frame_equal(table, pd.read_parquet(REFERENCE / "findings.parquet"), check_exact=False,
                                  rtol=1e-9)


def test_every_run_of_the_shipped_grid_is_in_its_run_table():
    from qatlaw.grid import grid_runs

    cfg = config.validate(config.read_yaml(REFERENCE / "config.yaml"))
    runs = pd.read_parquet(REFERENCE / "runs.parquet")
    assert sorted(runs["run_id"]) == sorted(r.run_id for r in grid_runs(cfg))
