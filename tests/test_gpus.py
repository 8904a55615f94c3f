"""GPU leases for concurrent jobs on one machine without a batch system (simulated: lock files only, no GPU)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from qatlaw import config, gpus, grid
from qatlaw.cli import main as cli_main


def test_concurrent_jobs_get_distinct_gpus_and_too_many_are_refused(tmp_path):
    first = gpus.lease(2, 4, tmp_path)
    second = gpus.lease(1, 4, tmp_path)
    assert first.ids == [0, 1] and second.ids == [2]
    with pytest.raises(gpus.GpuError, match=r"needs 2 GPU\(s\) but only 1 of the machine's 4 are free.*gpu=4"):
        gpus.lease(2, 4, tmp_path)
    first.release()
    assert gpus.lease(2, 4, tmp_path).ids == [0, 1]


def test_a_lease_ends_with_its_process(tmp_path):
    """However the job ends (here: the process exits without releasing), its GPUs are free again."""
    code = ("from pathlib import Path; from qatlaw import gpus; "
            f"held = gpus.lease(3, 3, Path({str(tmp_path)!r})); print(held.ids)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[0, 1, 2]"
    assert gpus.lease(3, 3, tmp_path).ids == [0, 1, 2]


def test_assign_sets_the_visible_devices_unless_they_are_chosen_already(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert gpus.assign(1, 0, tmp_path) is None  # no GPU in the machine
    held = gpus.assign(2, 4, tmp_path)
    assert held.ids == [0, 1] and os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
    other = gpus.assign(1, 4, tmp_path / "elsewhere")
    assert other is None  # CUDA_VISIBLE_DEVICES is set now: chosen by someone else
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("SLURM_JOB_ID", "17")
    assert gpus.assign(1, 4, tmp_path) is None  # SLURM assigns the job's GPUs


def test_several_runs_per_job_on_several_gpus_are_refused_in_one_line(capsys):
    with pytest.raises(config.ConfigError, match="training.runs_per_job: 2 runs per job cannot share 2 GPUs"):
        config.load("config.yaml", {"training": {"runs_per_job": 2, "gpus_per_run": 2}})
    two = "[" + ",".join(run.to_json() for run in grid.grid_runs(config.load("config.yaml"))[:2]) + "]"
    paths = [arg for name in ("summary", "metrics", "model", "checkpoint") for arg in (f"--{name}", "a", "b")]
    status = cli_main(["train", "--settings", two, "--train-tokens", "t", "--val-tokens", "v", "--manifest", "m",
                       *paths, "--gpus", "2"])
    assert status == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "qatlaw train: error: 2 runs in one job on 2 GPUs: give each run its own job (training.runs_per_job: 1)")
