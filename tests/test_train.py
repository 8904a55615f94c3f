"""Training runs: paired design, deterministic batches, schedule, resume after a crash, divergence, outputs."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import MANIFEST, VOCAB, settings, write_store

from qatlaw import precision as prec
from qatlaw import runstate, runtable, train
from qatlaw.cli import main as cli_main
from qatlaw.grid import RunSettings
from qatlaw.quant import QATLinear
from qatlaw.tokens import open_tokens


def run(tmp_path, s: RunSettings, tokens, name: str = "run", **execution) -> dict:
    out = tmp_path / name
    return train.train_run(
        s, train_tokens=tokens[0], val_tokens=tokens[1], manifest=MANIFEST, summary_path=out / "summary.parquet",
        metrics_path=out / "metrics.parquet", model_path=out / "model.pt", checkpoint_path=out / "ckpt" / "ckpt.pt",
        execution=train.Execution(**{"checkpoint_every": 4, "device": "cpu", **execution}),
    )


def test_runs_of_a_cell_start_from_the_same_weights():
    base = train.build_model(settings(precision="BF16", group=None), VOCAB).state_dict()
    for precision, group in [("W4A4", 16), ("W16A4", "channel"), ("W4A4-fc2a8", 32)]:
        qat = train.build_model(settings(precision=precision, group=group), VOCAB).state_dict()
        for name, tensor in base.items():
            assert torch.equal(tensor, qat[name]), name


def test_batches_are_a_pure_function_of_seed_and_step(tokens):
    a = train.TokenBatches(tokens[0], 16, 4, seed=3)
    b = train.TokenBatches(tokens[0], 16, 4, seed=3)
    for step in (5, 0, 77, 5):
        assert torch.equal(a.batch(step)[0], b.batch(step)[0])
    x, y = a.batch(2)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert not torch.equal(a.batch(1)[0], train.TokenBatches(tokens[0], 16, 4, seed=4).batch(1)[0])


def test_one_epoch_visits_every_window_once(tokens):
    b = train.TokenBatches(tokens[0], 16, 4, seed=1)
    epoch = np.concatenate([b.windows(s) for s in range(b.n_windows // 4)])
    assert len(set(epoch.tolist())) == len(epoch) == (b.n_windows // 4) * 4
    assert b.windows(b.n_windows).tolist() != epoch[:4].tolist()  # a later epoch has another order


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    peak, total, warmup = 1e-3, 100, 10
    lrs = [train.lr_at(s, total, peak, warmup, 0.1) for s in range(total)]
    assert lrs[0] == pytest.approx(peak / warmup)
    assert lrs[warmup - 1] == pytest.approx(peak)
    assert lrs[-1] == pytest.approx(0.1 * peak)
    assert all(a >= b for a, b in zip(lrs[warmup - 1 :], lrs[warmup:]))


def test_weight_decay_only_on_linear_matrices():
    model = train.build_model(settings(group="channel"), VOCAB)
    decay, no_decay = train.make_optimizer(model, settings()).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed = {id(p) for p in decay["params"]}
    assert id(model.tok_emb.weight) not in decayed
    assert id(model.blocks[0].attn.qkv.weight) in decayed and id(model.lm_head.weight) in decayed
    assert all(p.dim() == 2 for p in decay["params"])


def test_training_lowers_the_loss_and_writes_outputs(tmp_path, tokens):
    s = settings(lr=1e-2, tokens=4 * 16 * 30)
    summary = run(tmp_path, s, tokens)
    metrics = pd.read_parquet(tmp_path / "run" / "metrics.parquet")
    assert list(metrics.columns) == list(runtable.STEP_COLUMNS)
    assert len(metrics) == s.steps == summary["steps"]
    assert metrics["loss"].iloc[-3:].mean() < metrics["loss"].iloc[:3].mean() - 0.3
    row = pd.read_parquet(tmp_path / "run" / "summary.parquet")
    assert list(row.columns) == list(runtable.SUMMARY_COLUMNS)
    assert row["N"].item() == train.build_model(s, VOCAB).num_params()
    assert row["D"].item() == s.steps * s.tokens_per_step
    assert row["G"].item() == 16 and row["group"].item() == "16"
    assert row["loss"].item() == pytest.approx(metrics["loss_ema"].iloc[-1])
    assert math.isfinite(row["val_loss"].item()) and not row["diverged"].item()
    assert not (tmp_path / "run" / "ckpt" / "ckpt.pt").exists()
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=False)
    assert saved["settings"]["precision"] == "W4A4"


@pytest.mark.parametrize("precision, group, fmt", [("W4A4-mxfp4", 32, "mxfp4"), ("W4A4-nvfp4-had16", 16, "nvfp4")])
def test_block_formats_train_and_record_their_format(tmp_path, tokens, precision, group, fmt):
    s = settings(precision=precision, group=group, lr=1e-2, tokens=4 * 16 * 30)
    summary = run(tmp_path, s, tokens)
    metrics = pd.read_parquet(tmp_path / "run" / "metrics.parquet")
    assert metrics["loss"].iloc[-3:].mean() < metrics["loss"].iloc[:3].mean() - 0.3
    assert summary["format"] == fmt and summary["precision"] == precision and summary["G"] == group
    layers = [m for m in train.build_model(s, VOCAB).modules() if isinstance(m, QATLinear)]
    assert layers and all(m.opts.fmt == fmt and m.lac is None for m in layers)
    assert {m.opts.rotation for m in layers} == {prec.parse(precision).rotation}


def test_channel_group_is_recorded_as_the_hidden_size(tmp_path, tokens):
    row = run(tmp_path, settings(group="channel", tokens=4 * 16 * 2), tokens)
    assert row["group"] == "channel" and row["G"] == 32


def test_same_run_twice_gives_identical_losses(tmp_path, tokens):
    run(tmp_path, settings(), tokens, "a")
    run(tmp_path, settings(), tokens, "b")
    a = pd.read_parquet(tmp_path / "a" / "metrics.parquet")["loss"]
    b = pd.read_parquet(tmp_path / "b" / "metrics.parquet")["loss"]
    assert a.tolist() == b.tolist()


def crash_at_step_6(tmp_path, s: RunSettings, tokens, monkeypatch, **execution) -> None:
    """Run ``s`` as "crashed" and kill it (KeyboardInterrupt) when it asks for batch 6, after its step-4 checkpoint
    (with ``run``'s checkpoint interval)."""
    real_batch = train.TokenBatches.batch

    def batch(self, step):
        if step == 6:
            raise KeyboardInterrupt("simulated kill")
        return real_batch(self, step)

    with monkeypatch.context() as patch:
        patch.setattr(train.TokenBatches, "batch", batch)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path, s, tokens, "crashed", **execution)


@pytest.mark.parametrize("store", ["in memory", "token store"])
def test_crash_then_rerun_resumes_and_matches_an_uninterrupted_run(tmp_path, tokens, monkeypatch, caplog, store):
    if store == "token store":
        write_store(tmp_path, tokens)
        tokens = (open_tokens(tmp_path / "train.npy"), open_tokens(tmp_path / "val.npy"))
    s = settings()
    reference = run(tmp_path, s, tokens, "reference")

    crash_at_step_6(tmp_path, s, tokens, monkeypatch)
    assert (tmp_path / "crashed" / "ckpt" / "ckpt.pt").exists()
    assert not (tmp_path / "crashed" / "summary.parquet").exists()

    with caplog.at_level(logging.INFO, logger="qatlaw.train"):
        resumed = run(tmp_path, s, tokens, "crashed")
    assert "resuming from checkpoint" in caplog.text and "at step 4/" in caplog.text
    assert resumed["resumed"]
    assert resumed["loss"] == pytest.approx(reference["loss"], abs=1e-6)
    assert resumed["val_loss"] == pytest.approx(reference["val_loss"], abs=1e-6)
    a = pd.read_parquet(tmp_path / "reference" / "metrics.parquet")["loss"]
    b = pd.read_parquet(tmp_path / "crashed" / "metrics.parquet")["loss"]
    assert np.allclose(a, b, atol=1e-6, rtol=0)


def test_checkpoints_every_checkpoint_minutes_of_wall_time(tmp_path, tokens, monkeypatch, caplog):
    """Besides every ``checkpoint_every`` steps, a checkpoint is written once ``checkpoint_minutes`` have passed
    since the last; with the default 30 minutes a short run writes only the step-based ones."""
    checkpoint = tmp_path / "crashed" / "ckpt" / "ckpt.pt"
    assert train.Execution().checkpoint_minutes == 30
    with caplog.at_level(logging.INFO, logger="qatlaw.train"):
        crash_at_step_6(tmp_path, settings(), tokens, monkeypatch)
    assert torch.load(checkpoint, weights_only=False)["step"] == 4 and "checkpoint at step" not in caplog.text

    checkpoint.unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qatlaw.train"):
        crash_at_step_6(tmp_path, settings(), tokens, monkeypatch, checkpoint_every=1000, checkpoint_minutes=1e-9)
    assert torch.load(checkpoint, weights_only=False)["step"] == 6  # written after every step, by time
    timed = re.findall(r"checkpoint at step (\d+)/12, [\d.]+ min after the last", caplog.text)
    assert timed == [str(k) for k in range(1, 7)]


def test_checkpoint_of_other_settings_is_not_resumed(tmp_path, tokens, monkeypatch, caplog):
    real_batch = train.TokenBatches.batch

    def crash(self, step):
        if step == 5:
            raise KeyboardInterrupt
        return real_batch(self, step)

    monkeypatch.setattr(train.TokenBatches, "batch", crash)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, settings(lr=1e-3), tokens)
    monkeypatch.setattr(train.TokenBatches, "batch", real_batch)
    with caplog.at_level(logging.INFO, logger="qatlaw.train"):
        summary = run(tmp_path, settings(), tokens)
    assert "ignoring checkpoint" in caplog.text and not summary["resumed"]


def test_divergence_is_recorded_not_raised(tmp_path, tokens):
    summary = run(tmp_path, settings(lr=1e12, grad_clip=1e30, warmup_fraction=0.0), tokens)
    assert summary["diverged"]
    assert math.isnan(summary["loss"]) and summary["steps"] < settings().steps
    assert pd.read_parquet(tmp_path / "run" / "summary.parquet")["diverged"].item()


def test_collect_runs_checks_each_summary(tmp_path, tokens):
    run(tmp_path, settings(tokens=4 * 16 * 2), tokens, "a")
    run(tmp_path, settings(tokens=4 * 16 * 2, precision="BF16", group=None), tokens, "b")
    table = runtable.collect_runs([tmp_path / "a" / "summary.parquet", tmp_path / "b" / "summary.parquet"], tmp_path / "runs.parquet")
    assert len(table) == 2 and set(table["precision"]) == {"W4A4", "BF16"}
    assert table.loc[table["precision"] == "BF16", "G"].isna().all()
    bad = tmp_path / "bad.parquet"
    pd.DataFrame({"loss": [1.0]}).to_parquet(bad)
    with pytest.raises(runtable.RunTableError, match="bad.parquet: run summary lacks columns run_id, .*; expected columns"):
        runtable.collect_runs([bad], tmp_path / "runs2.parquet")
    two_rows = tmp_path / "two.parquet"
    pd.concat([pd.read_parquet(tmp_path / "a" / "summary.parquet")] * 2).to_parquet(two_rows)
    with pytest.raises(runtable.RunTableError, match="two.parquet: expected one run summary row"):
        runtable.collect_runs([two_rows], tmp_path / "runs3.parquet")
    assert not (tmp_path / "runs2.parquet").exists() and not (tmp_path / "runs3.parquet").exists()


def test_micro_batches_give_the_same_training(tmp_path, tokens):
    whole = run(tmp_path, settings(), tokens, "whole")
    micro = run(tmp_path, settings(), tokens, "micro", micro_batch_size=1)
    a = pd.read_parquet(tmp_path / "whole" / "metrics.parquet")["loss"]
    b = pd.read_parquet(tmp_path / "micro" / "metrics.parquet")["loss"]
    assert np.allclose(a, b, rtol=0, atol=1e-4)
    assert micro["loss"] == pytest.approx(whole["loss"], abs=1e-4)


def test_loss_in_chunks_gives_the_same_training(tmp_path, tokens):
    whole = run(tmp_path, settings(), tokens, "whole")
    chunked = run(tmp_path, settings(), tokens, "chunked", loss_chunk_tokens=24)  # batches of 64 tokens
    a = pd.read_parquet(tmp_path / "whole" / "metrics.parquet")["loss"]
    b = pd.read_parquet(tmp_path / "chunked" / "metrics.parquet")["loss"]
    assert np.allclose(a, b, rtol=0, atol=1e-5)
    assert chunked["loss"] == pytest.approx(whole["loss"], abs=1e-5)


@pytest.mark.parametrize("precision, group, numerics", [("W4A4", "channel", "bf16"), ("BF16", None, "fp32")])
def test_activation_checkpointing_gives_the_same_training_bit_for_bit(tmp_path, tokens, precision, group, numerics,
                                                                     caplog):
    s = settings(precision=precision, group=group, numerics=numerics, tokens=4 * 16 * 4)  # 4 steps
    with caplog.at_level(logging.INFO, logger="qatlaw.train"):
        run(tmp_path, s, tokens, "plain", activation_checkpointing=False)
        assert "activation checkpointing" not in caplog.text
        run(tmp_path, s, tokens, "checkpointed", activation_checkpointing=True)
        assert ", activation checkpointing" in caplog.text
    plain, checkpointed = (pd.read_parquet(tmp_path / name / "metrics.parquet") for name in ("plain", "checkpointed"))
    assert len(plain) == 4 and plain[["loss", "grad_norm"]].equals(checkpointed[["loss", "grad_norm"]])
    weights = [torch.load(tmp_path / name / "model.pt")["model"] for name in ("plain", "checkpointed")]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_activation_checkpointing_auto_is_off_on_cpu():
    cpu = torch.device("cpu")
    assert train.Execution().activation_checkpointing == "auto"
    assert not train.Execution().checkpointing(settings(), VOCAB, cpu)
    assert train.Execution(activation_checkpointing=True).checkpointing(settings(), VOCAB, cpu)
    with pytest.raises(train.TrainError, match="activation_checkpointing must be one of"):
        train.Execution(activation_checkpointing="yes").checkpointing(settings(), VOCAB, cpu)


def test_execution_is_not_part_of_the_run_identity():
    assert "threads" not in settings().to_json() and "checkpoint_every" not in settings().to_json()
    assert runstate.settings_hash(settings(), MANIFEST) == runstate.settings_hash(settings(), MANIFEST)


def test_numerics_are_part_of_the_run_identity_and_fp32_keeps_the_old_one():
    fp32, bf16 = settings(), settings(numerics="bf16")
    assert "numerics" not in fp32.to_json() and '"numerics": "bf16"' in bf16.to_json()
    assert fp32.run_id == bf16.run_id
    assert runstate.settings_hash(fp32, MANIFEST) != runstate.settings_hash(bf16, MANIFEST)
    assert RunSettings.from_json(fp32.to_json()) == fp32 and RunSettings.from_json(bf16.to_json()) == bf16


def test_bf16_autocast_on_cpu_is_the_runs_numerics_whatever_the_device(tmp_path, tokens):
    """bf16 numerics train under CPU autocast (the GPU's numerics path), are recorded, and differ from fp32;
    the device setting (cpu here) does not change them."""
    fp32 = run(tmp_path, settings(), tokens, "fp32")
    bf16 = run(tmp_path, settings(numerics="bf16"), tokens, "bf16")
    assert (fp32["numerics"], bf16["numerics"]) == ("fp32", "bf16")
    assert np.isfinite(bf16["loss"]) and bf16["loss"] != fp32["loss"]
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=0.05)
    with pytest.raises(train.TrainError, match="numerics must be one of fp32, bf16, got 'fp16'"):
        train.autocast(torch.device("cpu"), "fp16")


def test_unknown_device_is_refused():
    with pytest.raises(train.TrainError, match="device"):
        train.Execution(device="tpu").torch_device()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(train.TrainError, match="no CUDA GPU"):
        train.Execution(device="cuda").torch_device()


def train_command(tmp_path: Path, out: Path, *flags: str) -> list[str]:
    """`qatlaw train` of settings() on the store in ``tmp_path``, writing to ``out``, on CPU."""
    return [sys.executable, "-m", "qatlaw", "train", "--settings", settings().to_json(),
            "--train-tokens", str(tmp_path / "train.npy"), "--val-tokens", str(tmp_path / "val.npy"),
            "--manifest", str(tmp_path / "manifest.json"), "--summary", str(out / "summary.parquet"),
            "--metrics", str(out / "metrics.parquet"), "--model", str(out / "model.pt"),
            "--checkpoint", str(out / "ckpt.pt"), "--device", "cpu", "--checkpoint-every", "4", *flags]


@pytest.mark.slow
def test_data_parallel_run_under_torchrun_matches_one_process(tmp_path, tokens):
    """`qatlaw train --gpus 2` relaunches itself under torchrun; two gloo processes on CPU, each with half of
    every batch (its loss in chunks: 32 tokens in chunks of 24 and 8, its blocks checkpointed), train the same
    model as one process."""
    write_store(tmp_path, tokens)
    out = tmp_path / "ddp"
    result = subprocess.run(train_command(tmp_path, out, "--gpus", "2", "--loss-chunk-tokens", "24",
                                          "--activation-checkpointing", "1", "--threads", "2"), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2x cpu, activation checkpointing" in result.stderr
    # the node's 2 CPUs shared by its 2 workers, and torchrun's default 30 s replaced by the stop lead time
    assert "1 CPU thread(s) each" in result.stderr and "--shutdown-timeout=120" in result.stderr
    assert len(re.findall(r"step 12/12 loss", result.stderr)) == 1  # only rank 0 logs its steps
    single = run(tmp_path, settings(), tokens, "single")
    ddp = pd.read_parquet(out / "summary.parquet").iloc[0]
    assert ddp["device"] == "2x cpu" and single["device"] == "cpu"
    a = pd.read_parquet(tmp_path / "single" / "metrics.parquet")["loss"]
    b = pd.read_parquet(out / "metrics.parquet")["loss"]
    assert np.allclose(a, b, rtol=0, atol=1e-4)
    assert ddp["loss"] == pytest.approx(single["loss"], abs=1e-4)
    assert ddp["val_loss"] == pytest.approx(single["val_loss"], abs=1e-4)


# A stand-in for SLURM's srun inside an allocation: runs its command once per task (--ntasks=N), all at once on
# this host, each with SLURM_PROCID and SLURM_NODEID set, and exits with the first failure's status.
FAKE_SRUN = """#!/usr/bin/env bash
echo "srun $*" >> "$(dirname "$0")/calls"
while [[ $1 == --* ]]; do [[ $1 == --ntasks=* ]] && n=${1#--ntasks=}; shift; done
pids=()
for ((i = 0; i < n; i++)); do SLURM_PROCID=$i SLURM_NODEID=$i "$@" & pids+=($!); done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""


def install_srun(bin_dir: Path, script: str) -> dict[str, str]:
    """Put a stand-in ``srun`` running ``script`` in ``bin_dir``; the environment that finds it first."""
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(script)
    (bin_dir / "srun").chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


@pytest.mark.slow
def test_two_node_run_under_srun_matches_one_process(tmp_path, tokens):
    """`qatlaw train --gpus 2 --nodes 2`, as the train_nodes rule starts it in a SLURM job: srun (a stand-in that
    starts its tasks on this host) runs one torchrun per "node" (`--nnodes 2`, one process each), and both join one
    c10d rendezvous on this host; the two gloo ranks train the same model as one process."""
    write_store(tmp_path, tokens)
    bin_dir = tmp_path / "bin"
    env = install_srun(bin_dir, FAKE_SRUN)
    out = tmp_path / "nodes"
    result = subprocess.run(train_command(tmp_path, out, "--gpus", "2", "--nodes", "2", "--threads", "2",
                                          "--stop-seconds", "300"),
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    call = (bin_dir / "calls").read_text()
    # each node's task gets the job's CPUs per node (a step started from the batch step does not inherit them), and
    # torchrun gives its workers the stop lead time to write their checkpoint
    assert call.startswith("srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --cpus-per-task=2 --kill-on-bad-exit=1 ")
    assert "--nproc-per-node=1" in call and "--nnodes=2 --rdzv-backend=c10d" in call and call.count("\n") == 1
    assert "--shutdown-timeout=300" in call and "2 CPU thread(s) each" in result.stderr
    assert len(re.findall(r"step 12/12 loss", result.stderr)) == 1  # only rank 0 logs its steps
    single = run(tmp_path, settings(), tokens, "single")
    nodes = pd.read_parquet(out / "summary.parquet").iloc[0]
    assert nodes["device"] == "2x cpu"
    a = pd.read_parquet(tmp_path / "single" / "metrics.parquet")["loss"]
    b = pd.read_parquet(out / "metrics.parquet")["loss"]
    assert np.allclose(a, b, rtol=0, atol=1e-4)
    assert nodes["val_loss"] == pytest.approx(single["val_loss"], abs=1e-4)


# srun that, once the run's first checkpoint exists, sends SIGTERM to its tasks, as SLURM signals a job's steps (not
# its batch step, where `qatlaw train` waits) ahead of a time limit
STOPPING_SRUN = """#!/usr/bin/env bash
while [[ $1 == --* ]]; do [[ $1 == --ntasks=* ]] && n=${1#--ntasks=}; shift; done
pids=()
for ((i = 0; i < n; i++)); do SLURM_PROCID=$i SLURM_NODEID=$i "$@" & pids+=($!); done
until [[ -f $STOP_WHEN ]]; do sleep 0.05; done
kill -TERM "${pids[@]}"
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""


@pytest.mark.slow
def test_two_node_run_stopped_by_slurm_exits_75_and_resumes(tmp_path, tokens):
    """Over several nodes SLURM's stop signal reaches the srun step (each node's torchrun), not the batch step where
    `qatlaw train` waits: the workers write their checkpoint and a stop marker, and the launcher exits with status 75
    (stopped: the train rule retries and resumes), not 2 (failed)."""
    from qatlaw.stopping import STOPPED_STATUS

    write_store(tmp_path, tokens)
    bin_dir = tmp_path / "bin"
    out = tmp_path / "nodes"
    env = install_srun(bin_dir, STOPPING_SRUN) | {"STOP_WHEN": str(out / "ckpt.pt")}
    s = settings(tokens=4 * 16 * 200)
    command = [*train_command(tmp_path, out, "--gpus", "2", "--nodes", "2")]
    command[command.index("--settings") + 1] = s.to_json()
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == STOPPED_STATUS, result.stderr[-3000:]
    assert "torchrun stopped on a stop signal to its workers (SIGTERM)" in result.stderr.strip().splitlines()[-1]
    step = torch.load(out / "ckpt.pt", weights_only=False)["step"]
    assert 4 <= step < 200 and not (out / "summary.parquet").exists()
    install_srun(bin_dir, FAKE_SRUN)  # the retry runs to the end
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at step {step}/200" in result.stderr and not runstate.stop_marker(out / "ckpt.pt").exists()


def test_evaluation_in_micro_batches_and_chunks_equals_one_batch(tokens):
    model, val = train.build_model(settings(), VOCAB), tokens[1]
    whole = train.evaluate(model, val, 16, 256, 16)  # 16 windows of 16 tokens in one forward
    assert train.evaluate(model, val, 16, 256, 16, chunk_tokens=256) == whole
    for per_forward, chunk in ((4, None), (5, None), (1, None), (16, 20), (3, 7)):
        assert train.evaluate(model, val, 16, 256, per_forward, chunk_tokens=chunk) == pytest.approx(whole, rel=1e-6)


EVALUATE_ON_RANKS = """
import json, sys
import numpy as np, torch
from qatlaw import precision as prec
from qatlaw import runstate, runtable, train
from conftest import VOCAB, settings

torch.set_num_threads(1)
par = train.Parallel.from_env()
if par.world > 1:
    torch.distributed.init_process_group("gloo")
val = np.load(sys.argv[1])
model = train.build_model(settings(), VOCAB)
losses = [train.evaluate(model, val, 16, 256, n, chunk_tokens=chunk, par=par) for n, chunk in ((1, None), (3, 20))]
with open(f"{sys.argv[2]}.{par.rank}.json", "w") as f:
    json.dump(losses, f)
"""


@pytest.mark.slow
def test_evaluation_split_over_torchrun_ranks_equals_one_process(tmp_path, tokens):
    """Two gloo ranks each score every other window; both get the mean of one process scoring all of them."""
    script, val = tmp_path / "evaluate.py", tmp_path / "val.npy"
    script.write_text(EVALUATE_ON_RANKS)
    np.save(val, tokens[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    one = [sys.executable, str(script), str(val), str(tmp_path / "one")]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(script), str(val), str(tmp_path / "two")]
    for command in (one, two):
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    (single, grouped), = [json.loads((tmp_path / "one.0.json").read_text())]
    for rank in (0, 1):
        split_single, split_grouped = json.loads((tmp_path / f"two.{rank}.json").read_text())
        assert split_single == pytest.approx(single, rel=1e-12)  # one window per forward: the same window losses
        assert split_grouped == pytest.approx(grouped, rel=1e-6)


def test_only_rank_0_writes_the_run_log(tmp_path, monkeypatch):
    """Under torchrun every rank logs to stderr (the job's log); only rank 0 also writes the run's own log."""
    from qatlaw.cli.train import _run_log

    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        with _run_log(str(tmp_path / f"rank{rank}.log")):
            logging.getLogger("qatlaw.train").warning("step 1")
    assert not (tmp_path / "rank1.log").exists() and "step 1" in (tmp_path / "rank0.log").read_text()


def test_fixed_warmup_steps_override_the_fraction():
    assert settings().warmup == round(0.1 * settings().steps)
    assert settings(warmup_steps=3).warmup == 3
    assert settings(warmup_steps=10**6).warmup == settings().steps


def test_several_runs_in_one_process_equal_separate_processes(tmp_path, tokens):
    """`qatlaw train` with a list of runs (a cell's training job) trains each exactly as it would alone."""
    write_store(tmp_path, tokens)
    runs = [settings(precision="BF16", group=None), settings(precision="W4A16", group=16)]

    def cli(runs, out):
        files = {name: [str(tmp_path / out / r.run_id / name) for r in runs]
                 for name in ("summary.parquet", "metrics.parquet", "model.pt", "ckpt.pt")}
        argv = ["train", "--settings", "[" + ", ".join(r.to_json() for r in runs) + "]",
                "--train-tokens", str(tmp_path / "train.npy"), "--val-tokens", str(tmp_path / "val.npy"),
                "--manifest", str(tmp_path / "manifest.json"), "--summary", *files["summary.parquet"],
                "--metrics", *files["metrics.parquet"], "--model", *files["model.pt"], "--checkpoint", *files["ckpt.pt"],
                "--device", "cpu"]
        assert cli_main(argv) == 0
        return [pd.read_parquet(path) for path in files["metrics.parquet"]]

    together = cli(runs, "together")
    alone = [cli([r], f"alone{i}")[0] for i, r in enumerate(runs)]
    for a, b in zip(together, alone):
        pd.testing.assert_frame_equal(a.drop(columns="tokens_per_s"), b.drop(columns="tokens_per_s"))
    assert not together[0]["loss"].equals(together[1]["loss"])


def test_batch_with_mismatched_output_paths_is_refused(tmp_path, capsys):
    argv = ["train", "--settings", "[" + settings().to_json() + ", " + settings(seed=1).to_json() + "]",
            "--train-tokens", "t", "--val-tokens", "v", "--manifest", "m", "--summary", "s1", "--metrics", "m1", "m2",
            "--model", "a", "b", "--checkpoint", "c", "d"]
    assert cli_main(argv) == 2
    assert "--summary: 1 paths for 2 runs" in capsys.readouterr().err


def test_run_log_of_a_resumed_segment_is_appended(tmp_path, monkeypatch):
    """A job that resumes after a time limit or preemption adds to its run's log; the first segment's lines stay."""
    from qatlaw.cli.train import _run_log

    monkeypatch.setenv("RANK", "0")
    for segment in ("first", "second"):
        with _run_log(str(tmp_path / "run.log")):
            logging.getLogger("qatlaw.train").warning("%s segment", segment)
    text = (tmp_path / "run.log").read_text()
    assert "first segment" in text and "second segment" in text


def test_each_rank_reads_only_its_share_of_a_batch(tmp_path, tokens, monkeypatch):
    """With 4 ranks, rank r reads windows r, r+4, ... of the batch from the store (a quarter of them), and they are
    the rows the whole batch holds there."""
    write_store(tmp_path, tokens)
    store = open_tokens(tmp_path / "train.npy")
    read = []
    real = type(store).windows
    monkeypatch.setattr(type(store), "windows", lambda self, starts, length: read.append(len(starts)) or
                        real(self, starts, length))
    s = settings(batch_size=8)
    whole = train.TokenBatches(store, 16, 8, s.seed).batch(3)
    for rank in range(4):
        x, y = train.TokenBatches(store, 16, 8, s.seed, rank, 4).batch(3)
        assert torch.equal(x, whole[0][rank::4]) and torch.equal(y, whole[1][rank::4])
    assert read == [8, 2, 2, 2, 2]


def test_prefetch_reads_the_next_batch_while_the_step_runs(tokens):
    """After get(s) returns, the read of batch s + 1 is under way in another thread; the batches are those of the
    plain reader, and a read's error surfaces at get of its step."""
    import threading

    started: dict[int, str] = {}
    requested = threading.Event()

    class Recorded(train.TokenBatches):
        def batch(self, step):
            started[step] = threading.current_thread().name
            if step == 1:
                requested.set()
            if step == 3:
                raise KeyboardInterrupt("killed while reading batch 3")
            return super().batch(step)

    plain = train.TokenBatches(tokens[0], 16, 4, 0)
    with train.Prefetch(Recorded(tokens[0], 16, 4, 0), last_step=6) as loader:
        assert torch.equal(loader.get(0)[0], plain.batch(0)[0])
        assert requested.wait(10) and started[1].startswith("qatlaw-prefetch")  # before get(1) asked for it
        for step in (1, 2):
            assert torch.equal(loader.get(step)[1], plain.batch(step)[1])
        with pytest.raises(KeyboardInterrupt):
            loader.get(3)
    assert started[0] == threading.current_thread().name  # the first read has nothing to overlap


def test_ddp_keeps_the_gradients_in_its_buckets(tokens):
    """Under DDP the gradients are views into its communication buckets (gradient_as_bucket_view), not a second
    copy beside them: what the memory model counts (one fp32 gradient per parameter)."""
    store = torch.distributed.HashStore()
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = train.build_model(settings(), VOCAB)
        ddp = train.data_parallel(model, torch.device("cpu"))
        x = torch.from_numpy(tokens[0][:34].astype(np.int64)).view(2, -1)
        ddp(x[:, :-1], x[:, 1:]).backward()
        bucket_views = [p for p in model.parameters() if p.grad is not None and p.grad._base is not None]
        assert ddp.gradient_as_bucket_view and len(bucket_views) == sum(p.grad is not None for p in model.parameters())
    finally:
        torch.distributed.destroy_process_group()


def test_process_group_outlasts_a_checkpoint_write():
    """While rank 0 writes a 973M checkpoint (16.6 GB at the paper's vocabulary) the others wait in a collective:
    its timeout is torch's 10 minutes plus that write at 20 MB/s."""
    from qatlaw import memory

    s = settings(size="973M", layers=16, hidden=2048, ffn=8192, heads=32, kv_heads=8)
    assert memory.checkpoint_bytes(s, 100278) / 1e9 == pytest.approx(16.6, abs=0.05)
    timeout = train.process_group_timeout(s, 100278).total_seconds()
    assert timeout == pytest.approx(600 + 16.6e9 / 20e6, rel=0.01)
    assert train.process_group_timeout(settings(), VOCAB).total_seconds() == pytest.approx(600, abs=1)


def test_checkpoint_keeps_the_previous_one_and_resumes_from_it_when_the_last_is_damaged(tmp_path, tokens, monkeypatch,
                                                                                       caplog):
    """A checkpoint replaces the last one only once its bytes are on disk, and the one it replaces stays as the
    previous checkpoint; a damaged last checkpoint costs one interval (resume from the previous), not the run."""
    s = settings()
    reference = run(tmp_path, s, tokens, "reference")
    crash_at_step_6(tmp_path, s, tokens, monkeypatch, checkpoint_every=2)
    ckpt = tmp_path / "crashed" / "ckpt" / "ckpt.pt"
    previous = runstate.previous_checkpoint(ckpt)
    assert previous.name == "ckpt.prev.pt"
    assert torch.load(ckpt, weights_only=False)["step"] == 6 and torch.load(previous, weights_only=False)["step"] == 4
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # cut short, as by a node that died mid-write before fsync existed
    with caplog.at_level(logging.INFO, logger="qatlaw.train"):
        resumed = run(tmp_path, s, tokens, "crashed", checkpoint_every=2)
    assert "resuming from the previous one" in caplog.text and "at step 4/" in caplog.text
    assert resumed["val_loss"] == pytest.approx(reference["val_loss"], abs=1e-6)
    assert not ckpt.exists() and not previous.exists()  # a finished run removes both


def test_stale_temporary_checkpoints_are_removed_at_start(tmp_path, tokens, caplog):
    """What a write killed mid-way left beside the checkpoint (16.6 GB at 973M) is deleted when the run starts."""
    folder = tmp_path / "run" / "ckpt"
    folder.mkdir(parents=True)
    stale = folder / ".ckpt.pt.x1y2z3.tmp"
    stale.write_bytes(b"half a checkpoint")
    other = folder / ".other.pt.x1y2z3.tmp"  # not this run's
    other.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="qatlaw.train"):
        run(tmp_path, settings(), tokens)
    assert not stale.exists() and other.exists() and "a checkpoint write cut short" in caplog.text


def test_unreadable_checkpoint_is_ignored_with_a_warning(tmp_path, tokens, caplog):
    (tmp_path / "run" / "ckpt").mkdir(parents=True)
    (tmp_path / "run" / "ckpt" / "ckpt.pt").write_bytes(b"not a checkpoint")
    with caplog.at_level(logging.WARNING, logger="qatlaw.train"):
        summary = run(tmp_path, settings(), tokens)
    assert not summary["resumed"] and summary["steps"] == settings().steps
    assert "ignoring unreadable checkpoint" in caplog.text


def test_weight_average_is_scored_and_resumes_exactly(tmp_path, tokens, monkeypatch):
    plain = run(tmp_path, settings(), tokens, "plain")
    s = settings(weight_ema=0.25)
    averaged = run(tmp_path, s, tokens, "averaged")
    # the same training (the average is only read at the end); the final weights score as without it
    assert averaged["loss"] == plain["loss"] and averaged["val_loss_last"] == plain["val_loss"]
    assert averaged["val_loss"] != averaged["val_loss_last"]
    # the saved model is the average: scoring it again gives val_loss
    saved = torch.load(tmp_path / "averaged" / "model.pt", weights_only=False)
    model = train.build_model(s, VOCAB)
    model.load_state_dict(saved["model"])
    assert train.evaluate(model, tokens[1], s.seq_len, s.eval_tokens, s.batch_size) == pytest.approx(
        averaged["val_loss"], abs=1e-6)
    # its hand-computed decay: time constant 25% of the 12 steps
    assert s.weight_ema_decay == pytest.approx(1 - 1 / 3)

    crash_at_step_6(tmp_path, s, tokens, monkeypatch)
    resumed = run(tmp_path, s, tokens, "crashed")
    assert resumed["resumed"] and resumed["val_loss"] == pytest.approx(averaged["val_loss"], abs=1e-6)


def test_without_a_weight_average_both_validation_losses_agree(tmp_path, tokens):
    summary = run(tmp_path, settings(precision="BF16", group=None), tokens)
    assert summary["val_loss_last"] == summary["val_loss"]


def test_a_nodes_cpus_are_shared_by_its_torchrun_workers(monkeypatch):
    """Outside SLURM a job has its `threads`; inside, the CPUs of its allocation on the node (more with
    --cpus-per-gpu). Each of a node's workers gets its share for torch, OpenMP and inductor's compile pool."""
    from qatlaw import launch

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert launch.node_cpus(8) == 8
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert launch.node_cpus(8) == 64
    env = launch.worker_env(64, 8)
    assert env["OMP_NUM_THREADS"] == env["TORCHINDUCTOR_COMPILE_THREADS"] == "8"
    assert launch.worker_threads(8, 8) == launch.worker_threads(4, 8) == 1
