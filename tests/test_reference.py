"""The shipped reference results stay honest: refitting the shipped runs gives the shipped constants, and the
shipped findings follow from the shipped files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from qatlaw import config, findings

# every study shipped under reference/ (a folder written by `qatlaw reference`: it has a run.json)
STUDIES = sorted(p.parent for p in (Path(__file__).resolve().parent.parent / "reference").glob("*/run.json"))
study = pytest.mark.parametrize("study", STUDIES, ids=[p.name for p in STUDIES])


def test_the_shipped_studies_are_found():
    assert {"laptop", "laptop-v2", "laptop-split", "quartet", "formats"} <= {p.name for p in STUDIES}


@pytest.mark.slow
@study
def test_refit_of_the_shipped_runs_gives_the_shipped_constants(study: Path, tmp_path: Path):
    cfg = config.read_yaml(study / "config.yaml")["fit"]
    subprocess.run([sys.executable, "-m", "qatlaw", "fit", "--runs", str(study / "runs.parquet"),
                    "--out-dir", str(tmp_path), "--bootstrap", str(cfg["bootstrap"]), "--seed", str(cfg["seed"]),
                    "--metric", cfg["metric"]], check=True, capture_output=True)
    for name in ("params", "comparison"):
        shipped = pd.read_parquet(study / "fit" / f"{name}.parquet")
        refit = pd.read_parquet(tmp_path / f"{name}.parquet")
        pd.testing.assert_frame_equal(refit, shipped, check_exact=False, rtol=1e-6, atol=1e-12)


@study
def test_shipped_findings_follow_from_the_shipped_files(study: Path):
    metric = config.read_yaml(study / "config.yaml")["fit"]["metric"]
    table, _ = findings.findings(study, metric)
    pd.testing.assert_frame_equal(table, pd.read_parquet(study / "findings.parquet"), check_exact=False,
                                  rtol=1e-9)


@study
def test_every_run_of_the_shipped_grid_is_in_its_run_table(study: Path):
    from qatlaw.grid import grid_runs

    cfg = config.validate(config.read_yaml(study / "config.yaml"))
    runs = pd.read_parquet(study / "runs.parquet")
    if (cfg.get("external") or {}).get("table"):  # a run table from outside: its rows are the table's
        from qatlaw import external

        table = external.read_table(Path(__file__).resolve().parent.parent / cfg["external"]["table"])
        assert sorted(runs["run_id"]) == sorted(external.import_runs(table, cfg["external"]["precisions"])["run_id"])
        return
    assert sorted(runs["run_id"]) == sorted(r.run_id for r in grid_runs(cfg))
