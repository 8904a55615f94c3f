"""Cluster execution: the profiles in profiles/, and the workflow through `--profile profiles/slurm` on a real
single-node SLURM that tests/cluster/start_local_slurm.sh brings up on this machine."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import ROOT, copy_project, dry_run_resources, edit_config, run_snakemake, write_user_project

from qatlaw import data

PROFILES = ROOT / "profiles"
START = ROOT / "tests" / "cluster" / "start_local_slurm.sh"
STOP = ROOT / "tests" / "cluster" / "stop_local_slurm.sh"
TARGET = "results/fit/params.parquet"
IN_CI = os.environ.get("CI", "").lower() == "true"


# The user-corpus project of conftest, cut to two cells (0.1M x 4K/8K tokens), BF16 and W4A4 G32: four training
# runs, each its own job (rule train) as on a cluster.
CLUSTER_PROJECT = {"grid": {"sizes": ["0.1M"], "tokens": ["4K", "8K"], "groups": [32], "precisions": ["W4A4"]},
                   "training": {"runs_per_job": 1}, "fit": {"bootstrap": 10}}


def write_cluster_project(workdir: Path) -> Path:
    write_user_project(workdir)
    return edit_config(workdir, **CLUSTER_PROJECT)


def load_profile(name: str) -> dict:
    return yaml.safe_load((PROFILES / name / "config.yaml").read_text())


def test_local_profile_keys():
    profile = load_profile("local")
    assert profile["cores"] == 2
    assert profile["resources"] == ["gpu=0"]
    for flag in ("keep-going", "rerun-incomplete", "show-failed-logs", "printshellcmds"):
        assert profile[flag] is True, flag
    assert profile["latency-wait"] > 0


def test_slurm_profile_keys():
    profile = load_profile("slurm")
    assert profile["executor"] == "slurm"
    assert profile["jobs"] > 0 and profile["retries"] >= 1 and profile["latency-wait"] >= 30
    assert profile["rerun-incomplete"] is True and profile["keep-going"] is True
    # Status from squeue: works without an accounting database (sacct), as on the local test cluster.
    assert profile["slurm-status-command"] == "squeue"
    assert profile["slurm-requeue"] is True
    defaults = dict(item.split("=", 1) for item in profile["default-resources"])
    assert int(defaults["mem_mb"]) > 0 and int(defaults["runtime"]) > 0
    # train's memory, runtime and stop signal come from the rule, never from the profile: it sets no resources
    assert "set-resources" not in profile


@pytest.mark.parametrize("profile", ["local", "slurm"])
def test_profiles_drive_a_dry_run(tmp_path, profile):
    """Snakemake accepts every key of the profile; a dry run needs no SLURM, even with the slurm executor."""
    write_cluster_project(tmp_path)
    result = run_snakemake(tmp_path, "--profile", str(PROFILES / profile), "--dry-run", TARGET)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    jobs = dry_run_resources(result.stdout + result.stderr)
    train = {key: res for key, res in jobs.items() if key.startswith("rule_train_wildcards_")}
    assert len(train) == 4, sorted(jobs)
    if profile == "slurm":
        # Rules without their own resources get the profile's defaults; training runs keep their estimates.
        defaults = dict(item.split("=", 1) for item in load_profile("slurm")["default-resources"])
        assert jobs["rule_fit"]["mem_mb"] == defaults["mem_mb"]
        assert jobs["rule_fit"]["runtime"] == defaults["runtime"]
        assert all(res["mem_mb"] != defaults["mem_mb"] for res in train.values()), train
        # SIGTERM training.stop_seconds ahead of the time limit, to every process of the job (not B: its batch
        # shell), which `qatlaw train` answers with a checkpoint
        assert {res["slurm_extra"] for res in train.values()} == {"--signal=TERM@120"}, train


def slurm_unavailable(reason: str):
    if IN_CI:
        pytest.fail(f"CI=true but the local SLURM cluster could not be used: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def local_slurm():
    """A running single-node SLURM; stops, by PID, only the daemons this fixture started."""
    try:
        result = subprocess.run(["bash", str(START)], check=False, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{START} did not finish within 15 minutes")
    output = result.stdout + result.stderr
    if result.returncode == 2:
        slurm_unavailable(f"no local SLURM, and starting one needs root: run `sudo {START}` first ({output.strip()})")
    if result.returncode == 3:
        slurm_unavailable(f"SLURM is not installed and apt-get is unavailable: {output.strip()}")
    if result.returncode != 0:
        pytest.fail(f"{START} failed with exit status {result.returncode}:\n{output}")
    started = re.findall(r"started \w+ \(pid (\d+)\)", result.stdout)
    yield
    if started:
        stop = subprocess.run(["bash", str(STOP), *started], check=False, capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0, stop.stdout + stop.stderr


def scontrol_job(job_id: str) -> dict[str, str]:
    """`scontrol show job` as KEY -> value (the local cluster keeps finished jobs for MinJobAge = 1 h)."""
    out = subprocess.run(["scontrol", "--oneliner", "show", "job", job_id], capture_output=True, text=True,
                         check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def minutes(limit: str) -> int:
    """SLURM time limit [D-]HH:MM:SS in minutes."""
    days, _, hms = limit.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return (int(days or 0) * 24 + h) * 60 + m + (s > 0)


def mem_mb(value: str) -> int:
    """SLURM memory (541M, 4000M, 2G) in MB."""
    number, unit = re.fullmatch(r"(\d+)([MGT]?)", value).groups()
    return int(number) * {"": 1, "M": 1, "G": 1024, "T": 1024**2}[unit]


@pytest.mark.cluster
@pytest.mark.slow
def test_workflow_through_slurm_matches_a_local_run(data_project, tmp_path, local_slurm):
    cluster = write_cluster_project(tmp_path / "cluster")
    # the local run starts from the shared project's data stage, built from the same corpus and config
    local = copy_project(data_project, tmp_path / "local", **CLUSTER_PROJECT)
    dry = run_snakemake(cluster, "--profile", str(PROFILES / "slurm"), "--dry-run", TARGET)
    assert dry.returncode == 0, dry.stderr[-3000:]
    expected = dry_run_resources(dry.stdout + dry.stderr)

    start = time.monotonic()
    # First status check after 2 s instead of 40 s, and keep the SLURM logs of successful jobs to check them.
    result = run_snakemake(cluster, "--profile", str(PROFILES / "slurm"), "--slurm-init-seconds-before-status-checks",
                           "2", "--slurm-keep-successful-logs", TARGET)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    print(f"SLURM run: {time.monotonic() - start:.0f} s")

    # Every job went through sbatch: one SLURM job per Snakemake job, COMPLETED with exit code 0, in the project.
    submitted = re.findall(r"submitted with SLURM jobid (\d+) \(log: (\S+)\)", output)
    assert len(submitted) == len(expected), (sorted(expected), submitted)
    jobs = {}
    for job_id, log in submitted:
        info = scontrol_job(job_id)
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
        assert Path(info["WorkDir"]).resolve() == cluster.resolve() and info["Requeue"] == "1", info
        assert Path(log).is_file(), log
        assert Path(log).resolve().is_relative_to((cluster / ".snakemake" / "slurm_logs").resolve()), log
        jobs[info["Comment"]] = info
    assert set(jobs) == set(expected)
    train = [key for key in jobs if key.startswith("rule_train_wildcards_")]
    assert len(train) == 4 and "rule_fit" in jobs, sorted(jobs)
    # sbatch asked for what Snakemake computed: train's estimates (qatlaw.workflow_plan), the profile's defaults; and
    # for gather, from the documents its tokenize jobs found (counted once their tables exist, after the dry run)
    expected["rule_gather"]["mem_mb"] = data.gather_memory_mb(sorted((cluster / "results/data/shards").glob("*.parquet")))
    assert expected["rule_gather"]["mem_mb"] > data.GATHER_BASE_MB
    for key, info in jobs.items():
        assert mem_mb(info["MinMemoryNode"]) == int(expected[key]["mem_mb"]), (key, info["MinMemoryNode"])
        assert minutes(info["TimeLimit"]) == int(expected[key]["runtime"]), (key, info["TimeLimit"])
    print("SLURM job ids:", ", ".join(f"{info['JobId']} {key}" for key, info in sorted(jobs.items())))

    # The same target on this machine: training on CPU is deterministic, so the losses are equal.
    local_result = run_snakemake(local, "--profile", str(PROFILES / "local"), TARGET)
    assert local_result.returncode == 0, local_result.stderr[-3000:]
    assert "SLURM" not in local_result.stdout + local_result.stderr
    runs = {name: pd.read_parquet(workdir / "results" / "runs.parquet").set_index("run_id").sort_index()
            for name, workdir in (("slurm", cluster), ("local", local))}
    assert len(runs["slurm"]) == 4 and list(runs["slurm"].index) == list(runs["local"].index)
    assert not runs["slurm"]["diverged"].any()
    for column in ("loss", "val_loss", "final_step_loss", "steps", "D"):
        pd.testing.assert_series_equal(runs["slurm"][column], runs["local"][column], check_exact=True)
    params = pd.read_parquet(cluster / TARGET)
    assert set(params.loc[params["law"] == "chinchilla", "constant"]) == {"A", "B", "E", "alpha", "beta"}
