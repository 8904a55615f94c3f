"""Reliability (issue 9): killed jobs, preemption, NaNs, typos and corrupt files must neither lose work nor
produce a silently wrong law.

Every test goes through a real entry point: Snakemake in a throw-away project directory (a user corpus of 40
generated text files, as in ``test_workflow.py``), or the ``qatlaw`` command in a subprocess. The widest tables
(every figure and table input) also call the same ``qatlaw.cli.main`` in-process, which keeps them fast; the
subprocess versions of those tables are marked slow.

| fault | behaviour | test |
|---|---|---|
| ``qatlaw train`` SIGKILLed mid-run after a checkpoint (one run per job, or batched) | Snakemake fails the job; rerunning the target resumes from the checkpoint (log says so) and ends at the uninterrupted run's loss (1e-6); a summary Parquet never exists partially, the killed run's never before it is complete | ``test_killed_training_job_resumes_from_its_checkpoint`` |
| SIGUSR1, then SIGTERM, to ``qatlaw train`` mid-run (SLURM's warning before a time limit, the limit itself, preemption) | each time it ends its step, writes its checkpoint and exits with status 75, no output; the third start ends with exactly the uninterrupted run's per-step metrics, loss and val_loss | ``test_signalled_training_checkpoints_and_resumes_exactly`` |
| SIGTERM to every process of a Snakemake training job (as SLURM sends it) | Snakemake waits while the run writes its checkpoint, then fails the job (exit status 75), nothing of it left running; rerunning resumes from that step and ends at the uninterrupted run's loss | ``test_terminated_training_job_checkpoints_and_resumes`` |
| Snakemake and its job SIGKILLed together (preemption) | the stale lock refuses a rerun and names ``--unlock``; after it, ``--rerun-incomplete`` resumes | ``test_preempted_workflow_is_refused_until_unlocked_then_resumes`` |
| a second ``snakemake`` (also with ``--rerun-incomplete``) on a directory in use | refused (the lock, or first the running job's incomplete files), non-zero exit, no file touched | ``test_killed_training_job_resumes_from_its_checkpoint`` |
| the same cell trained twice | identical per-step losses, bit for bit (CPU) | ``test_same_cell_twice_gives_identical_per_step_losses`` |
| unknown precision, G not dividing, bad size, zero/negative tokens, missing corpus file, misspelt key, malformed YAML | non-zero exit, one line naming the key (or file and line), no ``results/`` (``qatlaw validate`` and a real ``snakemake`` run) | ``test_bad_config_is_one_line_and_creates_nothing`` |
| a run whose loss becomes NaN | recorded ``diverged = true``, stops early, the workflow finishes, the fit drops it and says so; the law is exactly the one without it | ``test_diverging_runs_are_recorded_and_the_workflow_finishes``, ``test_fit_excludes_diverged_runs_and_says_so`` |
| a truncated or wrong-columns Parquet handed to any stage; a token shard with ids >= the vocabulary | non-zero exit, the last line names the file and the expected columns (the vocabulary), no output, no traceback | ``test_corrupt_input_is_one_line_naming_file_and_schema`` (``_in_a_subprocess``), ``test_wrongly_typed_run_table_column_is_named`` |
| an unreadable checkpoint | ignored with a warning naming it; the run starts over and completes | ``test_unreadable_checkpoint_is_ignored_with_a_warning`` |
| a writer killed mid-write or before its rename | the output's name never holds a partial file; only a hidden ``.tmp`` is left and a rerun writes the output | ``test_every_writer_writes_a_temp_file_and_renames``, ``test_killed_writer_leaves_no_output`` |

"""

from __future__ import annotations

import ast
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import settings as toy_settings
from conftest import ROOT, copy_project, write_store, write_user_project

from qatlaw import config, decompose, fit, grid, outputs, report_inputs, runtable
from qatlaw.fit import forms
from qatlaw.io import write_json, write_parquet

BIN = Path(sys.executable).parent
ENV = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
QATLAW = [shutil.which("qatlaw", path=ENV["PATH"]) or str(BIN / "qatlaw")]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile")]
LINUX_PROC = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds processes through /proc")


# ------------------------------------------------------------------------------------------------- helpers

def snakemake(workdir: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([*SNAKEMAKE, "--directory", str(workdir), *args], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def start_snakemake(workdir: Path, *args: str) -> subprocess.Popen:
    """Snakemake in the background, in its own process group (its jobs run in the same group)."""
    with open(workdir / "first-snakemake.out", "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([*SNAKEMAKE, "--directory", str(workdir), *args], stdout=out,
                                stderr=subprocess.STDOUT, env=ENV, start_new_session=True)


def output(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def wait_for(condition: Callable[[], object], timeout: float, what: str,
             proc: subprocess.Popen | None = None, log: Path | None = None) -> object:
    """Poll ``condition`` every 20 ms until it is truthy; fail if ``proc`` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            pytest.fail(f"process exited with {proc.returncode} before {what}\n{tail}")
        time.sleep(0.02)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def _proc_stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # fields after the command name: state, ppid, pgrp, ...


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def train_process(group: int) -> int | None:
    """The live `qatlaw train` process in process group ``group`` (not the shell that started it)."""
    for pid in _pids():
        stat = _proc_stat(pid)
        argv = _cmdline(pid)
        if stat and int(stat[2]) == group and stat[0] not in "ZX" and "train" in argv \
                and any(Path(a).name == "qatlaw" for a in argv):
            return pid
    return None


def group_alive(group: int) -> bool:
    return any((stat := _proc_stat(pid)) and int(stat[2]) == group and stat[0] not in "ZX" for pid in _pids())


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


# ---------------------------------------------------------------------------- 1, 2, 7: kill, resume, lock

# 156 steps of 4 x 64 tokens, a checkpoint every 5: the first checkpoint lands about 3% into the run.
KILL_GRID = {"tokens": ["40K"], "precisions": ["W4A4"]}
# bit-for-bit comparisons are a CPU promise
KILL_TRAINING = {"seq_len": 64, "batch_size": 4, "checkpoint_every": 5, "eval_tokens": 1024, "device": "cpu"}
CELL = "0.1M/40K/seed0"
RUN, BASELINE_RUN = f"{CELL}/W4A4_g32", f"{CELL}/BF16"
TARGET = f"results/runs/{RUN}/summary.parquet"
CHECKPOINT = f"results/checkpoints/{RUN}/ckpt.pt"
RESUMED = re.compile(rf"{re.escape(RUN)}: resuming from checkpoint \S+ at step (\d+)/(\d+)")
# One job per run, or the cell's two runs (BF16 first) in one job (`training.runs_per_job`).
PER_JOB = [pytest.param(1, id="one-run-per-job"), pytest.param(2, id="batched")]


@pytest.fixture(scope="module")
def kill_project(data_project, tmp_path_factory) -> Path:
    """The shared data project on the kill-test grid, its budgets checked; tests copy it (kill_copy)."""
    workdir = copy_project(data_project, tmp_path_factory.mktemp("kill") / "project", grid=KILL_GRID,
                           training=KILL_TRAINING)
    result = snakemake(workdir, "--cores", "2", "results/data/budget.json")
    assert result.returncode == 0, output(result)[-3000:]
    return workdir


def kill_copy(src: Path, dst: Path, runs_per_job: int = 1) -> Path:
    return copy_project(src, dst, training={"runs_per_job": runs_per_job})


@pytest.fixture(scope="module")
def reference(kill_project, tmp_path_factory) -> dict:
    """The kill-test run trained without interruption (one run per job): its summary row and per-step metrics."""
    workdir = kill_copy(kill_project, tmp_path_factory.mktemp("reference") / "project")
    result = snakemake(workdir, "--cores", "1", TARGET)
    assert result.returncode == 0, output(result)[-3000:]
    run_dir = workdir / "results" / "runs" / RUN
    return {"workdir": workdir, "summary": pd.read_parquet(run_dir / "summary.parquet").iloc[0],
            "metrics": pd.read_parquet(run_dir / "metrics.parquet")}


def train_logs(workdir: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((workdir / "results" / "logs" / "train").rglob("*.log")))


def assert_resumed_like_reference(workdir: Path, reference: dict, stopped_at: int | None = None) -> None:
    """The run resumed mid-run (killed: from a periodic checkpoint; stopped by a signal: from ``stopped_at``)
    and ended where the uninterrupted reference ends."""
    logs = train_logs(workdir)
    match = RESUMED.search(logs)
    assert match, logs[-3000:]
    step, total = int(match[1]), int(match[2])
    assert 0 < step < total
    assert step == stopped_at if stopped_at else step % KILL_TRAINING["checkpoint_every"] == 0
    run_dir = workdir / "results" / "runs" / RUN
    summary = pd.read_parquet(run_dir / "summary.parquet").iloc[0]
    assert bool(summary["resumed"]) and not bool(summary["diverged"])
    assert summary["steps"] == reference["summary"]["steps"] == total
    assert summary["loss"] == pytest.approx(reference["summary"]["loss"], abs=1e-6)
    assert summary["val_loss"] == pytest.approx(reference["summary"]["val_loss"], abs=1e-6)
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    assert np.allclose(metrics["loss"], reference["metrics"]["loss"], atol=1e-6, rtol=0)
    assert not (workdir / CHECKPOINT).exists()  # deleted once the run is complete


def finished_run_retrained(workdir: Path) -> bool:
    """Whether the rerun trained the baseline, complete before the kill, again (its log shows training steps)."""
    return bool(re.search(rf"{re.escape(BASELINE_RUN)}: step \d+/", train_logs(workdir)))


def run_files(workdir: Path) -> dict[str, int]:
    """Every file under results/runs with its size."""
    root = workdir / "results" / "runs"
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()} if root.exists() else {}


def check_summaries_whole(workdir: Path, seen: set) -> None:
    """Every summary.parquet that exists is a whole Parquet file (read once per version)."""
    import pyarrow.parquet as pq

    for path in (workdir / "results" / "runs").rglob("summary.parquet"):
        try:
            key = (path, path.stat().st_mtime_ns)
            if key not in seen:
                pq.read_metadata(path)
                seen.add(key)
        except FileNotFoundError:
            pass  # deleted between listing and reading


def kill_at_first_checkpoint(workdir: Path, first: subprocess.Popen) -> int:
    """Wait until the W4A4 run has written a checkpoint (checking that no summary is ever partial and the W4A4
    summary never exists meanwhile), then stop its `qatlaw train` process; return that process id."""
    seen: set = set()

    def checkpointed() -> bool:
        check_summaries_whole(workdir, seen)
        assert not (workdir / TARGET).exists(), "a summary exists before the run is complete"
        return (workdir / CHECKPOINT).is_file()

    wait_for(checkpointed, 600, "the first checkpoint", first, workdir / "first-snakemake.out")
    pid = wait_for(lambda: train_process(first.pid), 60, "the `qatlaw train` process", first)
    os.kill(pid, signal.SIGSTOP)
    return pid


@LINUX_PROC
@pytest.mark.slow
@pytest.mark.parametrize("runs_per_job", PER_JOB)
def test_killed_training_job_resumes_from_its_checkpoint(kill_project, reference, tmp_path, runs_per_job):
    """SIGKILL `qatlaw train` mid-run; while it is held, a second Snakemake on the directory is refused (the lock);
    rerunning the same target resumes from the checkpoint and ends where an uninterrupted run ends."""
    workdir = kill_copy(kill_project, tmp_path / "project", runs_per_job)
    first = start_snakemake(workdir, "--cores", "1", TARGET)
    try:
        pid = kill_at_first_checkpoint(workdir, first)
        try:
            before = run_files(workdir)
            second = snakemake(workdir, "--cores", "1", TARGET)
            assert second.returncode != 0  # refused: by the lock, or (batched) by the running job's finished files
            assert "Directory cannot be locked" in output(second) or "IncompleteFilesException" in output(second)
            forced = snakemake(workdir, "--cores", "1", "--rerun-incomplete", TARGET)
            assert forced.returncode != 0
            assert "Directory cannot be locked" in output(forced), output(forced)[-3000:]
            assert run_files(workdir) == before  # neither touched the running job's files
        finally:
            os.kill(pid, signal.SIGKILL)
        assert first.wait(timeout=300) != 0
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert (workdir / CHECKPOINT).is_file()
    assert run_files(workdir) == {}  # Snakemake removed the failed job's outputs; nothing partial was there

    rerun = snakemake(workdir, "--cores", "1", TARGET)
    assert rerun.returncode == 0, output(rerun)[-3000:]
    assert_resumed_like_reference(workdir, reference)
    # a job of several runs keeps its finished runs' final checkpoints until the whole job is done
    assert not finished_run_retrained(workdir)


@LINUX_PROC
@pytest.mark.slow
@pytest.mark.parametrize("runs_per_job", PER_JOB)
def test_preempted_workflow_is_refused_until_unlocked_then_resumes(kill_project, reference, tmp_path, runs_per_job):
    """SIGKILL Snakemake and its job together (a preempted node): the stale lock refuses a rerun and says how to
    unlock; after `--unlock`, a rerun with `--rerun-incomplete` resumes from the checkpoint."""
    workdir = kill_copy(kill_project, tmp_path / "project", runs_per_job)
    first = start_snakemake(workdir, "--cores", "1", TARGET)
    try:
        kill_at_first_checkpoint(workdir, first)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the node goes away: Snakemake and its job die together
        first.wait()
    wait_for(lambda: not group_alive(first.pid), 30, "the killed process group to disappear")
    left = run_files(workdir)
    assert not any(name.startswith(f"{RUN}/") or name.endswith(".tmp") for name in left), left  # batched: BF16 done

    refused = snakemake(workdir, "--cores", "1", "--rerun-incomplete", TARGET)
    assert refused.returncode != 0
    assert "Directory cannot be locked" in output(refused) and "--unlock" in output(refused), output(refused)[-3000:]
    assert (workdir / CHECKPOINT).is_file() and run_files(workdir) == left

    unlocked = snakemake(workdir, "--unlock")
    assert unlocked.returncode == 0, output(unlocked)[-3000:]
    rerun = snakemake(workdir, "--cores", "1", "--rerun-incomplete", TARGET)
    assert rerun.returncode == 0, output(rerun)[-3000:]
    assert_resumed_like_reference(workdir, reference)
    # a job of several runs keeps its finished runs' final checkpoints until the whole job is done
    assert not finished_run_retrained(workdir)


@pytest.mark.slow
def test_same_cell_twice_gives_identical_per_step_losses(reference):
    workdir = reference["workdir"]
    again = snakemake(workdir, "--cores", "1", "--force", TARGET)
    assert again.returncode == 0, output(again)[-3000:]
    assert "rule train:" in output(again)
    run_dir = workdir / "results" / "runs" / RUN
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    for column in ("loss", "loss_ema", "grad_norm", "lr"):
        assert metrics[column].tolist() == reference["metrics"][column].tolist(), column
    summary = pd.read_parquet(run_dir / "summary.parquet").iloc[0]
    assert summary["loss"] == reference["summary"]["loss"]
    assert summary["val_loss"] == reference["summary"]["val_loss"]


# ------------------------------------------------------------------- time limits and preemption: signals

STOP_LINE = re.compile(r"(\S+): (SIG\w+|a signal to another rank): stopping after step (\d+)/(\d+), checkpoint ")
# a rank that learns of the stop from the others (the per-step all_reduce) before its own copy of the signal lands
OTHER_RANK = "a signal to another rank"


def torch_load(path: Path) -> dict:
    import torch

    return torch.load(path, weights_only=False)


@LINUX_PROC
@pytest.mark.slow
def test_terminated_training_job_checkpoints_and_resumes(kill_project, reference, tmp_path):
    """SIGTERM to every process of a running training job, as SLURM sends it at a time limit, on preemption, or
    ahead of the limit (the profile's `--signal=TERM@...`): Snakemake waits while `qatlaw train` ends its step
    and writes its checkpoint (exit status 75), then fails the job; rerunning resumes from that step and ends
    where an uninterrupted run ends."""
    workdir = kill_copy(kill_project, tmp_path / "project")
    first = start_snakemake(workdir, "--cores", "1", TARGET)
    try:
        wait_for(lambda: f"{RUN}: step " in train_logs(workdir), 600, "the run's first logged step", first,
                 workdir / "first-snakemake.out")
        os.killpg(first.pid, signal.SIGTERM)
        assert first.wait(timeout=300) != 0
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert not group_alive(first.pid)  # Snakemake waited for its job: nothing of the job outlives it
    assert "non-zero exit status 75" in (workdir / "first-snakemake.out").read_text()
    stop = STOP_LINE.search(train_logs(workdir))
    assert stop and stop[1] == RUN and stop[2] == "SIGTERM", train_logs(workdir)[-3000:]
    assert torch_load(workdir / CHECKPOINT)["step"] == int(stop[3])
    assert run_files(workdir) == {}

    rerun = snakemake(workdir, "--cores", "1", TARGET)
    assert rerun.returncode == 0, output(rerun)[-3000:]
    assert_resumed_like_reference(workdir, reference, stopped_at=int(stop[3]))


# 200 steps of test_train's toy run, about 20 ms each: a signal lands mid-run.
TOY_STEPS = 200


@LINUX_PROC
@pytest.mark.parametrize("gpus", [pytest.param(0, id="one-process", marks=pytest.mark.slow),
                                  pytest.param(2, id="torchrun", marks=pytest.mark.slow)])
def test_signalled_training_checkpoints_and_resumes_exactly(tmp_path, tokens, gpus):  # noqa: F811 (fixture)
    """SIGUSR1 (SLURM's warning before a time limit), then SIGTERM (a time limit, preemption) to a real
    `qatlaw train`: each time it ends its step, writes its checkpoint and exits with status 75, leaving no output;
    the third start finishes with exactly the per-step metrics, loss and val_loss of an uninterrupted run. Under
    torchrun (`--gpus 2`, two gloo processes) the launcher passes the signal on and both ranks stop after the
    same step."""
    from qatlaw.stopping import STOPPED_STATUS

    write_store(tmp_path, tokens)
    s = toy_settings(tokens=4 * 16 * TOY_STEPS)

    def argv(out: Path) -> list[str]:
        return [*QATLAW, "train", "--settings", s.to_json(), "--train-tokens", str(tmp_path / "train.npy"),
                "--val-tokens", str(tmp_path / "val.npy"), "--manifest", str(tmp_path / "manifest.json"),
                "--summary", str(out / "summary.parquet"), "--metrics", str(out / "metrics.parquet"),
                "--model", str(out / "model.pt"), "--checkpoint", str(out / "ckpt.pt"), "--device", "cpu",
                "--gpus", str(gpus)]

    out = tmp_path / "run"
    stopped_at = 0
    for signum, after in ((signal.SIGUSR1, 20), (signal.SIGTERM, 100)):
        log = tmp_path / f"{signum.name}.log"
        with open(log, "w") as err:
            proc = subprocess.Popen(argv(out), stdout=subprocess.DEVNULL, stderr=err, env=ENV)
        try:
            wait_for(lambda: f" step {after}/{TOY_STEPS} loss" in log.read_text(), 300, f"step {after}", proc, log)
            proc.send_signal(signum)
            assert proc.wait(timeout=120) == STOPPED_STATUS, log.read_text()[-3000:]
        finally:
            proc.kill()
            proc.wait()
        text = log.read_text()
        step = torch_load(out / "ckpt.pt")["step"]
        assert stopped_at < after <= step < TOY_STEPS  # the checkpoint of the step it stopped after
        stops = STOP_LINE.findall(text)
        # every rank stops after the same step; at least one names the signal, the others may have heard of it
        # from that one first (under load torchrun's forwarded copy can land after the step's all_reduce)
        assert len(stops) == max(1, gpus) and signum.name in {why for _, why, _, _ in stops}, text[-3000:]
        assert {(run, step_, total) for run, _, step_, total in stops} == {(s.run_id, str(step), str(TOY_STEPS))}
        assert {why for _, why, _, _ in stops} <= {signum.name, OTHER_RANK}
        resumed = f"resuming from checkpoint {out / 'ckpt.pt'} at step {stopped_at}/{TOY_STEPS}"
        assert (resumed in text) == bool(stopped_at)
        stopped = f"torchrun stopped on {signum.name} (see the log above)" if gpus else \
            f"{s.run_id}: stopped on {signum.name} after step {step}/{TOY_STEPS}"
        assert last_line(text) == f"qatlaw train: {stopped}; rerun to resume"
        # no output, no temporary file: the checkpoint, the one before it, and the stop marker
        assert {p.name for p in out.iterdir()} == {"ckpt.pt", "ckpt.pt.stopped"} | ({"ckpt.prev.pt"} if stopped_at else set())
        stopped_at = step

    finished = {name: subprocess.run(argv(tmp_path / name), capture_output=True, text=True, env=ENV, timeout=600)
                for name in ("run", "reference")}
    assert all(result.returncode == 0 for result in finished.values()), finished
    assert f"resuming from checkpoint {out / 'ckpt.pt'} at step {stopped_at}/{TOY_STEPS}" in finished["run"].stderr
    summary, reference = (pd.read_parquet(tmp_path / name / "summary.parquet").iloc[0] for name in ("run", "reference"))
    assert summary["resumed"] and summary["steps"] == reference["steps"] == TOY_STEPS
    assert (summary["loss"], summary["val_loss"]) == (reference["loss"], reference["val_loss"])
    metrics = {name: pd.read_parquet(tmp_path / name / "metrics.parquet").drop(columns="tokens_per_s")
               for name in ("run", "reference")}
    pd.testing.assert_frame_equal(metrics["run"], metrics["reference"], check_exact=True)
    assert not (out / "ckpt.pt").exists()


# ---------------------------------------------------------------------------------------- 3: bad config

def _edit(section: str, **values) -> Callable[[dict], None]:
    def apply(cfg: dict) -> None:
        cfg[section].update(values)
    return apply


BAD_CONFIGS = [  # id, edit of a valid config (None: break the YAML itself), the line naming the key
    ("unknown-precision", _edit("grid", precisions=["W4A4", "W3A9"]), "grid.precisions[1]: "),
    ("group-not-dividing", _edit("grid", groups=[32, 48]),
     "grid.groups[1]: group size 48 does not divide the qkv input dimension 64 of size '0.1M'"),
    ("unknown-size", _edit("grid", sizes=["0.1m"]), "grid.sizes[0]: size '0.1m' is not in the models table"),
    ("zero-tokens", _edit("grid", tokens=[0]), "grid.tokens[0]: "),
    ("negative-tokens", _edit("grid", tokens=["4K", -4000]), "grid.tokens[1]: "),
    ("missing-corpus-file", _edit("data", sources=["texts/doc00.txt", "texts/doc99.txt"]),
     "data.sources[1]: 'texts/doc99.txt' is not a built-in source"),
    ("misspelt-key", _edit("training", checkpoint_evry=5), "training: unknown key 'checkpoint_evry'"),
    ("malformed-yaml", None, "config.yaml: malformed YAML at line "),
]


def _bad_project(workdir: Path, edit: Callable[[dict], None] | None) -> Path:
    write_user_project(workdir)
    path = workdir / "config.yaml"
    if edit is None:
        path.write_text(path.read_text() + "grid: {sizes: [0.1M\n")
    else:
        cfg = yaml.safe_load(path.read_text())
        edit(cfg)
        path.write_text(yaml.safe_dump(cfg))
    return workdir




@pytest.mark.parametrize("entry", ["qatlaw validate", pytest.param("snakemake", marks=pytest.mark.slow)])
@pytest.mark.parametrize(("edit", "expected"), [
    pytest.param(edit, expected, id=name) for name, edit, expected in BAD_CONFIGS])
def test_bad_config_is_one_line_and_creates_nothing(tmp_path, entry, edit, expected):
    workdir = _bad_project(tmp_path, edit)
    if entry == "snakemake":  # a real run, not a dry run (test_workflow.py has the dry runs)
        result = snakemake(workdir, "--cores", "1")
    else:
        result = subprocess.run([*QATLAW, "validate", "config.yaml"], cwd=workdir, capture_output=True, text=True,
                                env=ENV, timeout=120)
    text = output(result)
    assert result.returncode != 0
    assert "Traceback" not in text, text
    assert len([line for line in text.splitlines() if expected in line]) == 1, text
    if entry == "qatlaw validate":
        assert last_line(result.stderr).startswith(f"qatlaw validate: error: {expected}")
    assert not (workdir / "results").exists()


# --------------------------------------------------------------------------------------------- 4: divergence

@pytest.mark.slow
def test_diverging_runs_are_recorded_and_the_workflow_finishes(data_project, tmp_path):
    """A size with an absurd learning rate: every run of it diverges; the rest of the workflow goes on."""
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    hot = dict(cfg["models"]["0.1M"], lr=1e12)
    workdir = copy_project(data_project, tmp_path / "project", models={"hot0.1M": hot}, training={"device": "cpu"},
                           grid={"sizes": ["0.1M", "hot0.1M"], "tokens": ["8K"], "precisions": ["W4A4", "W4A4-fc2a8"]})
    result = snakemake(workdir, "--cores", "2")
    assert result.returncode == 0, output(result)[-4000:]

    results = workdir / "results"
    runs = pd.read_parquet(results / "runs.parquet")
    hot_runs, ok_runs = runs[runs["size"] == "hot0.1M"], runs[runs["size"] == "0.1M"]
    assert len(hot_runs) == len(ok_runs) == 3
    assert hot_runs["diverged"].all() and hot_runs["loss"].isna().all()
    assert (hot_runs["steps"] < ok_runs["steps"].max()).all()  # stopped early
    assert not ok_runs["diverged"].any() and ok_runs["loss"].notna().all()
    logs = train_logs(workdir)
    for run_id in hot_runs["run_id"]:
        assert re.search(rf"{re.escape(run_id)}: loss is \S+ at step \d+; stopping \(diverged\)", logs), run_id
        assert re.search(rf"{re.escape(run_id)}: done: loss nan .* DIVERGED", logs), run_id
    assert "(3 diverged)" in (results / "logs" / "runs.log").read_text()

    fit_log = (results / "logs" / "fit.log").read_text()
    assert re.search(r"chinchilla.*: left out 1 of 2 runs \(diverged", fit_log), fit_log
    params = pd.read_parquet(results / "fit" / "params.parquet")
    assert (params.loc[params["law"] == "chinchilla", "n_dropped"] == 1).all()
    assert (params.loc[params["law"] == "unified", "n_dropped"] >= 1).all()  # the diverged runs, left out
    assert "they or their baseline diverged" in (results / "logs" / "decompose.log").read_text()
    for figure in outputs.FIGURES:
        assert (results / "figures" / f"{figure}.png").is_file(), figure


# ------------------------------------------------------------------ shared inputs of every Parquet-reading stage

VOCAB = 600
PRECISIONS = {"W4A4": 0.15, "W4A16": 0.1, "W16A4": 0.08, "W4A4-fc2a8": 0.12}


def synthetic_runs(summary_columns: Sequence[str]) -> pd.DataFrame:
    """A run table that follows the paper's laws exactly (three sizes, three budgets, two groups)."""
    rows = []
    for size, n in (("s1", 100_000), ("s2", 300_000), ("s3", 1_000_000)):
        for d in (200_000, 400_000, 800_000):
            bf16 = 2.0 + 400 / n**0.3 + 900 / d**0.3
            for precision, k in [("BF16", 0.0), *PRECISIONS.items()]:
                for group in ([None] if precision == "BF16" else [32, 128]):
                    delta = 0.0 if group is None else k * d**0.07 * math.log2(group) ** 0.8 / n**0.2
                    variant = "BF16" if group is None else f"{precision}_g{group}"
                    row = {"run_id": f"{size}/{grid.format_tokens(d)}/seed0/{variant}", "size": size, "N": n,
                           "D": d, "tokens_requested": d, "group": "none" if group is None else str(group),
                           "G": group, "precision": precision, "seed": 0, "loss": bf16 + delta,
                           "val_loss": bf16 + delta + 0.05, "final_step_loss": bf16 + delta, "steps": d // 2048,
                           "tokens_per_step": 2048, "epochs": 0.5, "lr": 3e-3, "wall_s": 10.0,
                           "tokens_per_s": d / 10, "diverged": False, "resumed": False, "vocab_size": VOCAB,
                           "seq_len": 128, "clip": "paper", "format": "int", "lac": "paper", "device": "cpu",
                           "qat_fraction": 1.0}
                    rows.append({c: row.get(c) for c in summary_columns})
    return pd.DataFrame(rows).astype({"G": "Int64"})


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A valid file for every input role of every Parquet-reading `qatlaw` subcommand."""
    from qatlaw import mixed
    from qatlaw.tokens import write_tokens

    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    paths = {"train_tokens": root / "train.npy", "val_tokens": root / "val.npy",
             "manifest": root / "manifest.json", "runs": root / "runs.parquet"}
    splits = {split: write_tokens(rng.integers(0, VOCAB, n), paths[f"{split}_tokens"], VOCAB)
              for split, n in (("train", 6000), ("val", 3000))}
    write_json({"vocab_size": VOCAB, "corpus_sha256": "0" * 64, "tokenizer_sha256": "0" * 64,
                "token_dtype": "uint16", "splits": splits}, paths["manifest"])

    # one real (one-step) run through the CLI: its summary, metrics and model.pt
    from qatlaw.cli import main

    run_dir = root / "run"
    assert main(_train_argv(paths, run_dir)) == 0
    paths |= {"summary": run_dir / "summary.parquet", "metrics": run_dir / "metrics.parquet",
              "model": run_dir / "model.pt"}

    runs = synthetic_runs(runtable.SUMMARY_COLUMNS)
    write_parquet(runs, paths["runs"])
    paths["runs_bf16_w4a4"] = root / "runs_bf16_w4a4.parquet"  # a quicker fit
    write_parquet(runs[runs["precision"].isin(["BF16", "W4A4"])], paths["runs_bf16_w4a4"])
    for run_id in runs["run_id"]:  # training_curves reads runs/<run_id>/metrics.parquet beside runs.parquet
        (root / "runs" / run_id).mkdir(parents=True)
        shutil.copy(paths["metrics"], root / "runs" / run_id / "metrics.parquet")
    analysis = {key: root / f"{key}.parquet" for key in outputs.INPUTS if key != "runs"}
    decompose.run_decompose(paths["runs"], analysis["decomposition"], analysis["decomposition_fit"])
    mixed.run_mixed(paths["runs"], root / "mixed_precision.parquet", analysis["mixed_ranking"])
    with pytest.MonkeyPatch.context() as patch:  # fewer Chinchilla starts: only the files' schema matters here
        patch.setattr(forms, "CHINCHILLA_INITS", 8)
        fitted = fit.run_fits(runtable.delta_table(runs), runs, n_boot=0)
    fit.write_fits(fitted, root)
    from qatlaw import outliers
    outliers.run_outliers([paths["model"]], paths["val_tokens"], analysis["outliers"], n_tokens=512)
    return paths | analysis


# -------------------------------------------------------------------------------------- 5: corrupt inputs

STORE = ("a 1-D .npy array of uint16/uint32 token ids",)


@dataclass(frozen=True)
class Stage:
    """One input (a Parquet file, or a token store) of one `qatlaw` subcommand."""

    name: str  # test id
    argv: Callable[[dict[str, Path], Path], list[str]]  # (inputs, output dir) -> arguments
    role: str  # the input key that gets corrupted
    columns: tuple[str, ...]  # the expected columns (or, for a token store, its format) the error must name
    outputs: tuple[str, ...] = ()  # files under the output dir that must not appear
    store: bool = False  # a token store (.npy), not Parquet
    ids_checked: bool = False  # the ids it reads are checked against a model's vocabulary (analyses; training
    # relies on the check when the store was written, and on the manifest's count)


def _train_argv(p: dict[str, Path], out: Path) -> list[str]:
    cfg = config.load(ROOT / "config.yaml", {"training": {"eval_tokens": 1024, "batch_size": 16}})
    settings = grid.run_settings(cfg, "0.1M", 2048, "W4A4", 32, 0).to_json()
    return ["train", "--settings", settings, "--train-tokens", str(p["train_tokens"]), "--val-tokens",
            str(p["val_tokens"]), "--manifest", str(p["manifest"]), "--summary", str(out / "summary.parquet"),
            "--metrics", str(out / "metrics.parquet"), "--model", str(out / "model.pt"),
            "--checkpoint", str(out / "ckpt.pt")]


TRAIN_OUTPUTS = ("summary.parquet", "metrics.parquet", "model.pt", "ckpt.pt")


def _stages() -> list[Stage]:
    stages = [
        Stage("train-train_tokens", _train_argv, "train_tokens", STORE, TRAIN_OUTPUTS, store=True),
        Stage("train-val_tokens", _train_argv, "val_tokens", STORE, TRAIN_OUTPUTS, store=True),
        Stage("runs-summary", lambda p, o: ["runs", str(p["summary"]), "--out", str(o / "runs.parquet")],
              "summary", runtable.SUMMARY_REQUIRED, ("runs.parquet",)),
        *(Stage(f"{cmd}-runs", lambda p, o, cmd=cmd, args=args: [cmd, "--runs", str(p["runs"]), *args(o)], "runs",
                runtable.RUN_TABLE_COLUMNS, outs)
          for cmd, args, outs in (
              ("decompose", lambda o: ["--out", str(o / "d.parquet"), "--fit", str(o / "f.parquet")],
               ("d.parquet", "f.parquet")),
              ("mixed", lambda o: ["--out", str(o / "m.parquet"), "--ranking", str(o / "r.parquet")],
               ("m.parquet", "r.parquet")),
              ("fit", lambda o: ["--out-dir", str(o), "--bootstrap", "0"],
               ("params.parquet", "predictions.parquet", "comparison.parquet")))),
        *(Stage(f"{cmd}-val_tokens", lambda p, o, cmd=cmd: [cmd, str(p["model"]), "--val", str(p["val_tokens"]),
                                                             "--out", str(o / "out.parquet"), "--tokens", "512"],
                "val_tokens", STORE, ("out.parquet",), store=True, ids_checked=True)
          for cmd in ("layer-error", "outliers")),
        Stage("predict-params", lambda p, o: ["predict", "--law", str(p["params"]), "--N", "1e9", "--D", "1e11",
                                              "--G", "128"], "params", fit.PARAMS_COLUMNS),
    ]
    for name, keys in outputs.FIGURES.items():
        for key in keys:
            stages.append(Stage(
                f"figure-{name}-{key}",
                lambda p, o, name=name, keys=keys: ["figure", name, "--input", *(f"{k}={p[k]}" for k in keys),
                                                    "--out", str(o / "fig.png")],
                key, report_inputs.COLUMNS[key], ("fig.png", "fig.svg")))
    for name, keys in outputs.TABLES.items():
        for key in keys:
            stages.append(Stage(
                f"table-{name}-{key}",
                lambda p, o, name=name, keys=keys: ["table", name, "--input", *(f"{k}={p[k]}" for k in keys),
                                                    "--out-stem", str(o / "table")],
                key, report_inputs.COLUMNS[key], ("table.csv", "table.md")))
    return stages


def _corrupt(src: Path, dst: Path, mode: str) -> None:
    """A truncated copy of ``src``, a Parquet file with other columns, or a token store whose first window holds an
    id >= the vocabulary."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if mode == "truncated":
        blob = src.read_bytes()
        dst.write_bytes(blob[: len(blob) // 2])
    elif mode == "wrong-columns":
        pd.DataFrame({"step": [1, 2], "note": ["a", "b"]}).to_parquet(dst)
    else:
        from qatlaw.tokens import open_tokens, write_tokens

        tokens = open_tokens(src)[:]
        tokens[5] = VOCAB + 7
        write_tokens(tokens, dst, VOCAB + 8)


def _cases(marks: Sequence = ()) -> list:
    cases = []
    for stage in _stages():
        modes = ["truncated", "wrong-columns"] + (["ids>=vocab"] if stage.ids_checked else [])
        for mode in modes:
            cases.append(pytest.param(stage, mode, id=f"{stage.name}-{mode}", marks=list(marks)))
    return cases


def _prepare(stage: Stage, mode: str, inputs: dict[str, Path], tmp_path: Path) -> tuple[list[str], Path, Path]:
    """Arguments with one input corrupted, the corrupted file, and the (empty) output dir."""
    bad = tmp_path / "bad" / f"{stage.role}.{'npy' if stage.store else 'parquet'}"
    _corrupt(inputs[stage.role], bad, mode)
    out = tmp_path / "out"
    out.mkdir()
    return stage.argv(inputs | {stage.role: bad}, out), bad, out


def _check(argv: list[str], stage: Stage, mode: str, returncode: int, stderr: str, bad: Path, out: Path) -> None:
    assert returncode != 0
    assert "Traceback" not in stderr, stderr[-3000:]
    line = last_line(stderr)
    assert line.startswith(f"qatlaw {argv[0]}: error: {bad}: "), line
    if mode == "ids>=vocab":
        assert f"token id {VOCAB + 7} is out of range" in line, line
    elif stage.store:
        assert line.endswith(f"expected {stage.columns[0]}"), line
    else:
        tail = line.split("expected columns ", 1)[-1]
        assert "expected columns " in line and all(c in tail for c in stage.columns), line
    left = [p.name for p in out.iterdir()]
    assert left == [], f"outputs written despite the error: {left}"


@pytest.mark.parametrize(("stage", "mode"), _cases())
def test_corrupt_input_is_one_line_naming_file_and_schema(stage, mode, inputs, tmp_path, capsys):
    """Every Parquet input of every subcommand, through ``qatlaw.cli.main`` in-process."""
    from qatlaw.cli import main

    argv, bad, out = _prepare(stage, mode, inputs, tmp_path)
    capsys.readouterr()
    returncode = main(argv)
    _check(argv, stage, mode, returncode, capsys.readouterr().err, bad, out)


def _one_per_command() -> list:
    seen, cases = set(), []
    for case in _cases([pytest.mark.slow]):
        stage, mode = case.values
        command = stage.name.split("-")[0]
        if (command, mode) not in seen:
            seen.add((command, mode))
            cases.append(case)
    return cases


@pytest.mark.parametrize(("stage", "mode"), _one_per_command())
def test_corrupt_input_is_one_line_naming_file_and_schema_in_a_subprocess(stage, mode, inputs, tmp_path):
    """The same through the installed `qatlaw` command, one input per subcommand: the last line of stderr."""
    argv, bad, out = _prepare(stage, mode, inputs, tmp_path)
    result = subprocess.run([*QATLAW, *argv], capture_output=True, text=True, env=ENV, timeout=600)
    _check(argv, stage, mode, result.returncode, result.stderr, bad, out)


def test_unreadable_checkpoint_is_ignored_with_a_warning(inputs, tmp_path, caplog):
    """A damaged checkpoint (atomic writes make a truncated one unlikely, but disks fail) costs the run its
    progress, not the workflow: the run starts over and says why."""
    from qatlaw.cli import main

    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"PK\x03\x04 not a whole checkpoint")
    with caplog.at_level(logging.WARNING, logger="qatlaw"):
        returncode = main(_train_argv(inputs, out))
    assert returncode == 0 and (out / "summary.parquet").is_file()
    assert re.search(r"ignoring unreadable checkpoint \S*ckpt\.pt", caplog.text), caplog.text


def test_wrongly_typed_run_table_column_is_named(inputs, tmp_path):
    runs = pd.read_parquet(inputs["runs"]).astype({"loss": str})
    bad = tmp_path / "runs.parquet"
    runs.to_parquet(bad)
    result = subprocess.run([*QATLAW, "fit", "--runs", str(bad), "--out-dir", str(tmp_path / "out")],
                            capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert last_line(result.stderr).startswith(f"qatlaw fit: error: {bad}: run table column loss is ")
    assert "not numeric" in last_line(result.stderr)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_fit_excludes_diverged_runs_and_says_so(inputs, tmp_path, monkeypatch, caplog):
    """Diverged runs (NaN loss, or a finite loss recorded before the blow-up) are dropped, counted and logged, and
    leave every fitted constant exactly as without them (`qatlaw fit` in-process, with fewer Chinchilla starts)."""
    from qatlaw.cli import main

    monkeypatch.setattr(forms, "CHINCHILLA_INITS", 8)
    clean = pd.read_parquet(inputs["runs_bf16_w4a4"])
    hot = clean[(clean["size"] == "s2") & (clean["tokens_requested"] == 400_000)].copy()
    hot = hot.assign(run_id=hot["run_id"].str.replace("s2/", "s2hot/"), size="s2hot", diverged=True,
                     loss=np.where(hot["group"] == "32", 0.5, np.nan))  # 0.5: a bogus finite loss
    params = {}
    for name, table in (("clean", clean), ("dirty", pd.concat([clean, hot], ignore_index=True))):
        write_parquet(table, tmp_path / f"{name}.parquet")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="qatlaw"):
            assert main(["fit", "--runs", str(tmp_path / f"{name}.parquet"), "--out-dir", str(tmp_path / name),
                         "--bootstrap", "0"]) == 0
        params[name] = pd.read_parquet(tmp_path / name / "params.parquet").set_index(["law", "precision", "constant"])
    log = caplog.text
    assert re.search(r"chinchilla.*: left out 1 of 10 runs \(diverged", log), log
    assert re.search(r"\(W4A4\): left out 2 of 20 runs \(diverged", log), log
    dropped = (params["dirty"]["n_dropped"] - params["clean"]["n_dropped"]).groupby("law").max()
    assert dropped.to_dict() == {"chinchilla": 1, "epm": 2, "no_D": 2, "unified": 2}
    assert (params["dirty"]["n_runs"] == params["clean"]["n_runs"]).all()
    values = params["dirty"]["value"].reindex(params["clean"].index)
    assert values.notna().all() and np.allclose(values, params["clean"]["value"], rtol=1e-9, atol=0)


# --------------------------------------------------------------------------------------- 6: atomic outputs

WRITERS = {  # call -> index of its path argument (None: the object it is called on is the path)
    "to_parquet": 0, "to_csv": 0, "to_json": 0, "savefig": 0, "write_table": 1, "ParquetWriter": 0,
    "write_text": None, "write_bytes": None, "open": 0, "save": 0, "copy": 1, "copyfile": 1, "copy2": 1, "move": 1,
}


def _writes(tree: ast.AST) -> list[tuple[ast.Call, ast.expr | None]]:
    """Every call in ``tree`` that writes a file, with the expression of the path it writes."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None
        if name not in WRITERS:
            continue
        if name in ("copy", "copyfile", "copy2", "move") and owner != "shutil":
            continue  # DataFrame.copy() and friends
        if name == "write_table" and owner != "pq":
            continue  # ParquetWriter.write_table writes into a writer opened (and checked) where it was made
        index = 1 if name == "save" and owner == "torch" else WRITERS[name]
        if name == "open":
            if isinstance(func, ast.Attribute):  # Path.open(mode)
                mode, index = (node.args[0] if node.args else None), None
            else:
                mode = node.args[1] if len(node.args) > 1 else None
            mode = mode or next((k.value for k in node.keywords if k.arg == "mode"), None)
            if not (isinstance(mode, ast.Constant) and set(str(mode.value)) & set("wax+")):
                continue
        if index is None:
            target = func.value if isinstance(func, ast.Attribute) else None
        else:
            target = node.args[index] if len(node.args) > index else next(
                (k.value for k in node.keywords if k.arg in ("path", "path_or_buf", "fname", "where", "f", "file")),
                None)
            if target is None:
                continue  # no path: the call returns the text (DataFrame.to_json(), to_csv())
        if isinstance(target, ast.Call) and isinstance(target.func, ast.Name) and target.func.id in ("str", "Path"):
            target = target.args[0] if target.args else None  # str(tmp)
        found.append((node, target))
    return found


def test_every_writer_writes_a_temp_file_and_renames():
    """Each file write in the package (not its benchmarks) targets a name bound by ``with atomic_path(...) as
    name`` in its function."""
    offenders = []
    package = ROOT / "src" / "qatlaw"
    for source in sorted(p for p in package.rglob("*.py") if p.parent.name != "bench"):
        tree = ast.parse(source.read_text())
        for func in ast.walk(tree):
            if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            temps = {item.optional_vars.id for node in ast.walk(func) if isinstance(node, ast.With | ast.AsyncWith)
                     for item in node.items
                     if isinstance(item.context_expr, ast.Call) and isinstance(item.optional_vars, ast.Name)
                     and getattr(item.context_expr.func, "id", getattr(item.context_expr.func, "attr", "")) == "atomic_path"}
            nested = {id(n) for f in ast.walk(func) if f is not func and isinstance(f, ast.FunctionDef)
                      for n in ast.walk(f)}
            for call, target in _writes(func):
                if id(call) in nested:
                    continue  # checked with its own function
                if not (isinstance(target, ast.Name) and target.id in temps):
                    offenders.append(f"{source.relative_to(package)}:{call.lineno}: {ast.unparse(call)[:80]}")
    assert offenders == [], "writes outside `with atomic_path(...) as tmp`:\n" + "\n".join(offenders)


HOOK = textwrap.dedent('''
    """Test hook: hold a writer before the rename of one output, or in the middle of writing it, so the test can
    SIGKILL it there. QATLAW_TEST_HOLD = "rename:<file name>" or "write:<file name>"."""
    import os
    import time

    _mode, _, _name = os.environ.get("QATLAW_TEST_HOLD", "").partition(":")


    def _hold(tmp):
        with open(os.environ["QATLAW_TEST_HOLD_SIGNAL"], "a") as fh:
            fh.write(os.fspath(tmp) + "\\n")
        time.sleep(600)


    if _mode == "rename":
        _replace = os.replace

        def _held_replace(src, dst, *args, **kwargs):
            if os.path.basename(os.fspath(dst)) == _name:
                _hold(src)
            return _replace(src, dst, *args, **kwargs)

        os.replace = _held_replace
    elif _mode == "write":
        import pyarrow.parquet as pq

        _write_table = pq.ParquetWriter.write_table

        def _open_temp():
            """The temporary file of the held output if this process has it open (Linux: /proc/self/fd)."""
            for fd in os.listdir("/proc/self/fd"):
                try:
                    path = os.readlink(f"/proc/self/fd/{fd}")
                except OSError:
                    continue
                base = os.path.basename(path)
                if base.startswith("." + _name + ".") and base.endswith(".tmp"):
                    return path
            return None

        def _held_write_table(self, table, *args, **kwargs):
            _write_table(self, table, *args, **kwargs)  # a row group goes out; the footer is written on close
            tmp = _open_temp()
            if tmp:
                _hold(tmp)

        pq.ParquetWriter.write_table = _held_write_table
''')


@dataclass(frozen=True)
class Writer:
    name: str
    argv: Callable[[dict[str, Path], Path], list[str]]
    hold: str  # QATLAW_TEST_HOLD
    absent: tuple[str, ...]  # outputs (under the output dir) that must not exist after the kill
    present: tuple[str, ...] = ()  # outputs written completely before the held one
    marks: tuple = field(default=())
    rerun_writes: str = ""  # what a rerun must write (default: the held output)


def _tokenize_argv(p: dict[str, Path], out: Path) -> list[str]:
    from qatlaw import data

    texts = out.parent / "texts"
    if not texts.exists():
        texts.mkdir()
        for i in range(300):
            (texts / f"doc{i:03d}.txt").write_text(f"Document {i}. " + "Words of text. " * 40)
        data.train_tokenizer(["Document. Words of text. " * 100], 300).save(str(out.parent / "tokenizer.json"))
    # `qatlaw tokenize` streams batches of documents into one ParquetWriter: the hook holds it after the first one
    return ["tokenize", "--shards", *(f"user1={f}" for f in sorted(texts.glob("*.txt"))), "--tokenizer",
            str(out.parent / "tokenizer.json"), "--seed", "0", "--min-chars", "10", "--tokens", str(out / "tokens.npy"),
            "--docs", str(out / "docs.parquet")]


def _train_writer_argv(p: dict[str, Path], out: Path) -> list[str]:
    argv = _train_argv(p, out)
    argv[argv.index("--settings") + 1] = argv[argv.index("--settings") + 1].replace('"tokens": 2048', '"tokens": 6144')
    return [*argv, "--checkpoint-every", "1"]


KILLED_WRITERS = [
    Writer("tokenize-mid-write", _tokenize_argv, "write:docs.parquet", ("docs.parquet", "tokens.npy")),
    Writer("decompose-mid-write", lambda p, o: ["decompose", "--runs", str(p["runs"]), "--out",
                                                str(o / "decomposition.parquet"), "--fit", str(o / "fit.parquet")],
           "write:decomposition.parquet", ("decomposition.parquet", "fit.parquet")),
    Writer("decompose-before-second-rename",
           lambda p, o: ["decompose", "--runs", str(p["runs"]), "--out", str(o / "decomposition.parquet"),
                         "--fit", str(o / "fit.parquet")],
           "rename:fit.parquet", ("fit.parquet",), ("decomposition.parquet",)),
    Writer("fit-params", lambda p, o: ["fit", "--runs", str(p["runs_bf16_w4a4"]), "--out-dir", str(o),
                                       "--bootstrap", "0"],
           "rename:params.parquet", ("params.parquet", "predictions.parquet", "comparison.parquet"),
           marks=(pytest.mark.slow,)),
    Writer("train-checkpoint", _train_writer_argv, "rename:ckpt.pt", TRAIN_OUTPUTS, marks=(pytest.mark.slow,),
           rerun_writes="summary.parquet"),  # the checkpoint itself is deleted when the run completes
    Writer("train-summary", _train_writer_argv, "rename:summary.parquet", ("summary.parquet",),
           ("model.pt", "metrics.parquet", "ckpt.pt"), marks=(pytest.mark.slow,)),
    Writer("table", lambda p, o: ["table", "table1_constants", "--input", f"params={p['params']}",
                                  "--out-stem", str(o / "table")],
           "rename:table.csv", ("table.csv", "table.md"), marks=(pytest.mark.slow,)),
    Writer("figure", lambda p, o: ["figure", "fig8_ratio", "--input", f"decomposition={p['decomposition']}",
                                   "--out", str(o / "fig.png")],
           "rename:fig.png", ("fig.png", "fig.svg"), marks=(pytest.mark.slow,)),
]


@LINUX_PROC
@pytest.mark.parametrize("writer", [pytest.param(w, id=w.name, marks=w.marks) for w in KILLED_WRITERS])
def test_killed_writer_leaves_no_output(writer, inputs, tmp_path):
    """SIGKILL a real `qatlaw` command while it holds an output's temporary file (mid-write or just before the
    rename): the output's name is absent, the leftover is a hidden ``.tmp`` file, and a rerun writes the output."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    out = tmp_path / "out"
    out.mkdir()
    held = tmp_path / "held.txt"
    argv = writer.argv(inputs, out)
    env = ENV | {"PYTHONPATH": os.pathsep.join([str(hook), ENV.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                 "QATLAW_TEST_HOLD": writer.hold, "QATLAW_TEST_HOLD_SIGNAL": str(held)}
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([*QATLAW, *argv], env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        def holding() -> str | None:
            text = held.read_text() if held.is_file() else ""
            return text.splitlines()[0] if text.endswith("\n") else None

        tmp = Path(str(wait_for(holding, 600, f"{writer.name} to hold {writer.hold}", proc, tmp_path / "stderr.txt")))
    finally:
        proc.kill()
        proc.wait()
    assert tmp.is_file() and tmp.parent == out
    target = writer.hold.split(":", 1)[1]
    assert tmp.name.startswith(f".{target}.") and tmp.name.endswith(".tmp"), tmp.name
    for name in writer.absent:
        assert not (out / name).exists(), f"{name} exists after its writer was killed"
    for name in writer.present:
        assert (out / name).is_file()
    if writer.hold.startswith("write:"):  # a really partial file: not something a reader could take for output
        import pyarrow.parquet as pq

        with pytest.raises(Exception):
            pq.read_table(tmp)

    rerun = subprocess.run([*QATLAW, *argv], capture_output=True, text=True, env=ENV, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (out / (writer.rerun_writes or target)).is_file()
    if target == "ckpt.pt":  # a run deletes what a killed checkpoint write left (16.6 GB at 973M) when it starts
        assert not tmp.exists()
    else:
        assert tmp.is_file()  # the killed writer's leftover, hidden, and never read
    visible = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    assert all(not name.endswith(".tmp") for name in visible), visible
