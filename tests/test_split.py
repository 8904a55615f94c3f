"""The FP→QAT split (grid.qat_fractions): run identities, the branch from its baseline's trunk, post-training
quantization, config checks and the workflow's jobs."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import (
    MANIFEST,
    ROOT,
    VOCAB,
    run_snakemake,
    settings,
    write_store,
    write_user_project,
)

from qatlaw import config, grid, runtable, split, train
from qatlaw.cli import main as cli_main

# Every run id and identity (RunSettings.to_json) of config.yaml and config/laptop.yaml, and their training jobs,
# hashed as computed before the QAT fraction existed.
IDENTITIES = {
    (): ("ebc2111ab76747621a3e02fd1e0de5152fabafdfcd3dab14a32a063b60ce6809",
         "d6272b2e8fdd422c0fc64a13973d6e660437aa8f9c663a9f9bc5f25e1739c0c4"),
    ("config/laptop.yaml",): ("c49ba7d5da263bea48496e4e96a6da9f7ffc85663ce7afff43b3312d6d6a4106",
                              "c9228cf5ccba8b723f844d6c6282828f9c596950ff991a94c3ba13ecf7bbfabe"),
}
QAT = settings(lac="always")  # 12 steps; LAC: a quantizer parameter the baseline lacks
BRANCH = dataclasses.replace(QAT, qat_fraction=0.5)  # K = 6
PTQ = dataclasses.replace(QAT, qat_fraction=0.0)


def run(tmp_path, s, stream, name, trunk=None, keep_trunks=None, **execution) -> dict:
    """test_train's toy run (checkpoint every 4 steps), with a trunk to start from or trunks to keep."""
    out = tmp_path / name
    return train.train_run(
        s, train_tokens=stream[0], val_tokens=stream[1], manifest=MANIFEST, summary_path=out / "summary.parquet",
        metrics_path=out / "metrics.parquet", model_path=out / "model.pt", checkpoint_path=out / "ckpt" / "ckpt.pt",
        execution=train.Execution(**{"checkpoint_every": 4, "device": "cpu", **execution}), trunk=trunk,
        keep_trunks=keep_trunks)


def load_config(*overlays: dict, files: tuple[str, ...] = ()) -> dict:
    return config.load(ROOT / "config.yaml", *(ROOT / f for f in files), *overlays, check_files=False)


@pytest.mark.parametrize("files", list(IDENTITIES))
def test_existing_grids_keep_every_run_id_and_identity(files):
    cfg = load_config(files=files)
    runs = grid.grid_runs(cfg)
    text = "\n".join(run.run_id + " " + run.to_json() for run in runs)
    jobs = repr([[run.run_id for run in job] for job in grid.batch_runs(runs, cfg["training"]["runs_per_job"])])
    assert (hashlib.sha256(text.encode()).hexdigest(), hashlib.sha256(jobs.encode()).hexdigest()) == IDENTITIES[files]
    assert all(run.qat_fraction == 1 and "qat_fraction" not in run.to_json() for run in runs)
    assert grid.grid_runs(load_config({"grid": {"qat_fractions": [1]}}, files=files)) == runs
    if files:
        shipped = pd.read_parquet(ROOT / "reference" / "laptop" / "runs.parquet")
        assert sorted(shipped["run_id"]) == sorted(run.run_id for run in runs)


def test_laptop_split_grid_plans_the_issues_design():
    """config/laptop-split.yaml: at least 3 (N, D) cells with S spanning 10x or more, the fractions 0 to 1, W4A4
    at one G, 2 seeds per cell, every branch from its own cell's baseline."""
    runs = grid.grid_runs(load_config(files=("config/laptop-v2.yaml", "config/laptop-split.yaml")))
    quantized = [run for run in runs if run.precision != "BF16"]
    assert {(run.precision, run.group) for run in quantized} == {("W4A4", 32)}
    cells = {(run.size, run.tokens): run for run in quantized}
    S = [split.tokens_per_parameter_byte(grid.non_embedding_count(run.layers, run.hidden, run.ffn, run.heads,
                                                                  run.kv_heads), run.tokens, split.bits(run.precision))
         for run in cells.values()]
    assert len(cells) >= 3 and max(S) / min(S) >= 10
    for size, budget in cells:
        in_cell = [run for run in quantized if (run.size, run.tokens) == (size, budget)]
        assert {run.seed for run in in_cell} == {0, 1}
        assert {0, 0.1, 0.2, 0.35, 0.5, 0.7, 1} <= {run.qat_fraction for run in in_cell}
    assert grid.trunk_steps(runs)  # the baselines keep the branch points


def test_old_run_tables_read_as_qat_from_scratch(tmp_path):
    table = runtable.read_runs(ROOT / "reference" / "laptop" / "runs.parquet", all_fractions=True)
    assert (table["qat_fraction"] == 1.0).all() and len(table) == 70
    branched = pd.concat([table.head(2), table.head(2).assign(run_id=lambda t: t["run_id"] + "_f0.5", qat_fraction=0.5)])
    branched.to_parquet(tmp_path / "runs.parquet")
    assert list(runtable.read_runs(tmp_path / "runs.parquet")["run_id"]) == list(table["run_id"].head(2))
    assert len(runtable.read_runs(tmp_path / "runs.parquet", all_fractions=True)) == 4


def test_grid_of_fractions_branch_steps_jobs_and_cost():
    cfg = load_config({"grid": {"qat_fractions": [0, 0.35, 1], "ablation": None, "extra": None}})
    runs = grid.grid_runs(cfg)
    cell = grid.cells(runs)["0.1M/1M/seed0"]
    assert [run.run_id.split("/")[-1] for run in cell[:4]] == ["BF16", "W4A4_g8_f0", "W4A4_g8_f0.35", "W4A4_g8"]
    branch = cell[2]
    # 1M tokens at 32 x 128 per step: 244 steps; (1 - 0.35) x 244 = 158.6 -> 159
    assert (branch.steps, branch.branch_step, cell[1].branch_step, cell[3].branch_step) == (244, 159, 244, 0)
    assert grid.branch_step(0.5, 25) == 13 and grid.branch_step(0.35, 20) == 13  # halves up, f's decimal form
    assert branch.baseline == cell[0] and grid.RunSettings.from_json(branch.to_json()) == branch
    assert grid.trunk_steps(runs)["0.1M/1M/seed0/BF16"] == [159]
    assert grid.training_flops(branch, 512) == grid.training_flops(cell[3], 512) * 85 * 128 * 32 // cell[3].tokens
    jobs = grid.batch_runs([run for run in runs if not run.is_ptq], 6)
    assert all(len({run.is_branch for run in job}) == 1 and len({run.cell for run in job}) == 1 for job in jobs)
    with pytest.raises(grid.GridError, match="post-training quantization"):
        grid.batch_runs(runs, 6)
    extra = load_config({"grid": {"ablation": None, "extra": [{"sizes": ["0.1M"], "tokens": ["3M"], "groups": [8],
                                                                 "precisions": ["W4A16"], "qat_fractions": [0.5]}]}})
    ids = [run.run_id for run in grid.grid_runs(extra)]
    assert [run_id for run_id in ids if "_f" in run_id] == ["0.1M/3M/seed0/W4A16_g8_f0.5"]  # its own fractions
    assert "0.1M/3M/seed0/BF16" in ids and "0.1M/3M/seed0/W4A16_g8" not in ids


@pytest.mark.parametrize(("grid_edit", "expected"), [
    ({"qat_fractions": [1.5]}, "grid.qat_fractions[0]: 1.5 is greater than the maximum of 1"),
    ({"qat_fractions": [-0.1]}, "grid.qat_fractions[0]: -0.1 is less than the minimum of 0"),
    ({"qat_fractions": [0.5, 0.5]}, "grid.qat_fractions: [0.5, 0.5] has non-unique elements"),
    ({"qat_fractions": []}, "grid.qat_fractions: [] should be non-empty"),
    ({"qat_fractions": ["half"]}, "grid.qat_fractions[0]: 'half' is not of type 'number'"),
    ({"qat_fractions": [0.001]}, "grid.qat_fractions[0]: 0.001 of the 244 steps of size '0.03M' at 1M tokens leaves "
                                 "0 QAT steps after a trunk of 244"),
    ({"qat_fractions": [0.999]}, "grid.qat_fractions[0]: 0.999 of the 244 steps of size '0.03M' at 1M tokens leaves "
                                 "244 QAT steps after a trunk of 0"),
    ({"extra": [{"sizes": ["0.1M"], "tokens": ["1M"], "groups": [8], "precisions": ["W4A4"], "qat_fractions": [2]}]},
     "grid.extra[0].qat_fractions[0]: 2 is greater than the maximum of 1"),
    ({"ablation": {"sizes": ["0.1M"], "tokens": ["1M"], "groups": [16], "precisions": ["W4A4"], "overrides": [],
                   "qat_fractions": [0.5]}}, "grid.ablation: unknown key 'qat_fractions'"),
])
def test_bad_fractions_are_one_clear_error(grid_edit, expected):
    with pytest.raises(config.ConfigError) as err:
        load_config({"grid": grid_edit})
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)


def train_baseline(tmp_path, stream, steps, name="base", **execution) -> dict[int, Path]:
    """QAT's BF16 baseline keeping a trunk checkpoint at each of ``steps``; their paths by step."""
    trunks = {k: tmp_path / name / "trunk" / f"step{k}.pt" for k in steps}
    run(tmp_path, QAT.baseline, stream, name, keep_trunks=trunks, **execution)
    return trunks


def outputs(tmp_path, name) -> tuple[pd.DataFrame, dict, pd.DataFrame]:
    model = torch.load(tmp_path / name / "model.pt", weights_only=False)["model"]
    return (pd.read_parquet(tmp_path / name / "metrics.parquet"), model,
            pd.read_parquet(tmp_path / name / "summary.parquet"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_branch_at_fraction_1_is_the_run_from_scratch_bit_for_bit(tmp_path, tokens):  # noqa: F811 (fixture)
    """A QAT run started from its baseline's trunk at step 0 (K = 0, f = 1) trains exactly as from scratch."""
    trunk = train_baseline(tmp_path, tokens, [0])[0]
    scratch, from_trunk = run(tmp_path, QAT, tokens, "scratch"), run(tmp_path, QAT, tokens, "trunk0", trunk=trunk)
    a, b = outputs(tmp_path, "scratch"), outputs(tmp_path, "trunk0")
    pd.testing.assert_frame_equal(a[0].drop(columns="tokens_per_s"), b[0].drop(columns="tokens_per_s"))
    assert_same_weights(a[1], b[1])
    assert from_trunk["val_loss"] == scratch["val_loss"] and from_trunk["loss"] == scratch["loss"]


def test_branch_trunk_is_the_baselines_first_steps_bit_for_bit(tmp_path, tokens, monkeypatch):  # noqa: F811 (fixture)
    trunk = train_baseline(tmp_path, tokens, [6])[6]
    assert not (tmp_path / "base" / "ckpt").exists() or not any((tmp_path / "base" / "ckpt").iterdir())
    # the baseline's own state at step 6: a run of it killed when it asks for batch 7, checkpointed every 6 steps
    real_batch = train.TokenBatches.batch

    def batch(self, step):
        if step == 6:
            raise KeyboardInterrupt("simulated kill")
        return real_batch(self, step)

    with monkeypatch.context() as patch:
        patch.setattr(train.TokenBatches, "batch", batch)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path, QAT.baseline, tokens, "stopped", checkpoint_every=6)
    at_6 = torch.load(tmp_path / "stopped" / "ckpt" / "ckpt.pt", weights_only=False)
    state = torch.load(trunk, weights_only=False)
    assert state["step"] == at_6["step"] == 6 and state["ema"] == at_6["ema"]
    assert [row[:-1] for row in state["rows"]] == [row[:-1] for row in at_6["rows"]]  # tokens_per_s aside
    assert_same_weights(state["model"], at_6["model"])
    model = train.build_model(QAT.baseline, VOCAB)
    name_of = {id(p): name for name, p in model.named_parameters()}
    names = [name_of[id(p)] for group in train.make_optimizer(model, QAT.baseline).param_groups for p in group["params"]]
    for i, name in enumerate(names):  # AdamW's state, by parameter name
        assert all(torch.equal(state["optimizer"][name][key], at_6["optimizer"]["state"][i][key])
                   for key in ("step", "exp_avg", "exp_avg_sq"))

    summary = run(tmp_path, BRANCH, tokens, "branch", trunk=trunk)
    base, branch = outputs(tmp_path, "base")[0], outputs(tmp_path, "branch")[0]
    pd.testing.assert_frame_equal(branch.head(6), base.head(6))  # the baseline's rows, as they were
    assert branch["lr"].tolist() == base["lr"].tolist()  # one LR schedule: QAT takes over its cooldown
    assert (branch["loss"].iloc[6:] != base["loss"].iloc[6:]).all()
    assert (summary["qat_fraction"], summary["steps"], summary["D"]) == (0.5, 12, QAT.tokens)
    assert outputs(tmp_path, "branch")[2]["qat_fraction"].item() == 0.5


def test_killed_branch_and_baseline_resume_exactly(tmp_path, tokens, monkeypatch):  # noqa: F811 (fixture)
    trunk = train_baseline(tmp_path, tokens, [6])[6]
    run(tmp_path, BRANCH, tokens, "branch", trunk=trunk)
    real_batch = train.TokenBatches.batch

    def killed_at(step_killed):
        def batch(self, step):
            if step == step_killed:
                raise KeyboardInterrupt("simulated kill")
            return real_batch(self, step)
        return batch

    with monkeypatch.context() as patch:  # the branch dies after its step-8 checkpoint
        patch.setattr(train.TokenBatches, "batch", killed_at(9))
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path, BRANCH, tokens, "killed", trunk=trunk)
    resumed = run(tmp_path, BRANCH, tokens, "killed", trunk=trunk)
    assert resumed["resumed"]
    a, b = outputs(tmp_path, "branch"), outputs(tmp_path, "killed")
    pd.testing.assert_frame_equal(a[0].drop(columns="tokens_per_s"), b[0].drop(columns="tokens_per_s"))
    assert_same_weights(a[1], b[1])

    with monkeypatch.context() as patch:  # the baseline dies after staging its trunk (step 6) and its step-8 checkpoint
        patch.setattr(train.TokenBatches, "batch", killed_at(9))
        with pytest.raises(KeyboardInterrupt):
            train_baseline(tmp_path, tokens, [6], "base_killed")
    assert not (tmp_path / "base_killed" / "trunk").exists()  # staged beside the checkpoint, not yet an output
    again = train_baseline(tmp_path, tokens, [6], "base_killed")[6]
    kept, fresh = torch.load(again, weights_only=False), torch.load(trunk, weights_only=False)
    assert [row[:-1] for row in kept["rows"]] == [row[:-1] for row in fresh["rows"]]  # tokens_per_s aside
    assert_same_weights(kept["model"], fresh["model"])


@pytest.mark.parametrize("damage", ["missing", "corrupt", "other step", "other settings"])
def test_missing_or_corrupt_trunk_is_one_error_line_and_trains_nothing(tmp_path, tokens, monkeypatch, damage):  # noqa: F811 (fixture)
    trunk = tmp_path / "trunk" / "step6.pt"
    if damage == "corrupt":
        trunk.parent.mkdir()
        trunk.write_bytes(b"not a checkpoint")
    elif damage != "missing":
        other = QAT.baseline if damage == "other step" else dataclasses.replace(QAT.baseline, lr=1e-3)
        step = 5 if damage == "other step" else 6
        run(tmp_path, other, tokens, "base", keep_trunks={step: trunk})

    def no_training(self, step):
        raise AssertionError("trained a step")

    monkeypatch.setattr(train.TokenBatches, "batch", no_training)
    with pytest.raises(train.TrainError) as err:
        run(tmp_path, BRANCH, tokens, "branch", trunk=trunk)
    assert str(trunk) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "branch").exists()

    if damage == "missing":  # `qatlaw train` refuses before any run of the job
        write_store(tmp_path, tokens)
        files = {name: str(tmp_path / "cli" / name) for name in ("summary", "metrics", "model", "ckpt")}
        argv = ["train", "--settings", BRANCH.to_json(), "--train-tokens", str(tmp_path / "train.npy"),
                "--val-tokens", str(tmp_path / "val.npy"), "--manifest", str(tmp_path / "manifest.json"),
                "--summary", files["summary"], "--metrics", files["metrics"], "--model", files["model"],
                "--checkpoint", files["ckpt"], "--trunk", str(trunk), "--device", "cpu"]
        assert cli_main(argv) != 0
        assert not (tmp_path / "cli").exists()


def test_ptq_is_the_baselines_final_model_under_the_precision(tmp_path, tokens):  # noqa: F811 (fixture)
    write_store(tmp_path, tokens)
    base = run(tmp_path, QAT.baseline, tokens, "base")
    files = {name: str(tmp_path / "ptq" / f"{name}.{ext}") for name, ext in
             (("summary", "parquet"), ("metrics", "parquet"), ("model", "pt"))}
    argv = ["ptq", "--settings", PTQ.to_json(), "--baseline-summary", str(tmp_path / "base" / "summary.parquet"),
            "--baseline-metrics", str(tmp_path / "base" / "metrics.parquet"),
            "--baseline-model", str(tmp_path / "base" / "model.pt"), "--val-tokens", str(tmp_path / "val.npy"),
            "--manifest", str(tmp_path / "manifest.json"), "--summary", files["summary"], "--metrics",
            files["metrics"], "--model", files["model"], "--device", "cpu"]
    assert cli_main(argv) == 0
    model = train.build_model(PTQ, VOCAB)
    saved = torch.load(tmp_path / "base" / "model.pt", weights_only=False)["model"]
    missing, unexpected = model.load_state_dict(saved, strict=False)
    assert missing and all(".lac." in name for name in missing) and not unexpected
    expected = train.evaluate(model, tokens[1], PTQ.seq_len, PTQ.eval_tokens, PTQ.batch_size)
    row = pd.read_parquet(files["summary"]).iloc[0]
    assert row["val_loss"] == expected != base["val_loss"]
    assert (row["run_id"], row["qat_fraction"], row["D"], row["steps"]) == (PTQ.run_id, 0.0, base["D"], base["steps"])
    assert pd.isna(row["loss"]) and list(pd.read_parquet(files["summary"]).columns) == list(runtable.SUMMARY_COLUMNS)
    pd.testing.assert_frame_equal(pd.read_parquet(files["metrics"]), pd.read_parquet(tmp_path / "base" / "metrics.parquet"))
    with pytest.raises(train.TrainError, match="is not the model of baseline"):
        other = dataclasses.replace(PTQ, lr=1e-3)
        train.quantize_run(other, baseline_summary=tmp_path / "base" / "summary.parquet",
                           baseline_metrics=tmp_path / "base" / "metrics.parquet",
                           baseline_model=tmp_path / "base" / "model.pt", val_tokens=tokens[1], manifest=MANIFEST,
                           summary_path=tmp_path / "x" / "s", metrics_path=tmp_path / "x" / "m",
                           model_path=tmp_path / "x" / "p")


def dry_run_jobs(workdir: Path, *args: str) -> dict[str, str]:
    """The shell command of every job of a dry run, by its first output."""
    result = run_snakemake(workdir, "--dry-run", "--cores", "1", "--printshellcmds", *args)
    assert result.returncode == 0, result.stderr
    jobs = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", result.stdout):
        output = re.search(r"^\s+output: ([^,\n]+)", block, re.MULTILINE)
        if output and block.startswith("rule "):
            jobs[output[1]] = re.sub(r"jobid: \d+|reason: .*|\[\w{3} \w{3} .*\]", "", block)
    return jobs


@pytest.mark.slow
def test_dry_run_branch_jobs_wait_for_the_trunks_and_no_key_changes_nothing(tmp_path):
    write_user_project(tmp_path)
    cfg = yaml.safe_load((tmp_path / "config.yaml").read_text())
    cfg["grid"].update(tokens=["8K", "16K"], precisions=["W4A4"], qat_fractions=[1])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    explicit = dry_run_jobs(tmp_path)
    cfg["grid"].pop("qat_fractions")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert dry_run_jobs(tmp_path) == explicit

    cfg["grid"]["qat_fractions"] = [0, 0.5, 1]
    cfg["training"]["micro_batch_size"] = 8
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    jobs = dry_run_jobs(tmp_path)
    for budget, k in (("8K", 2), ("16K", 4)):  # 3 and 7 steps of 16 x 128 tokens: K = 1.5 and 3.5, halves up
        cell = f"results/runs/0.1M/{budget}/seed0"
        trunk = f"{cell}/BF16/trunk/step{k}.pt"
        base = next(job for job in jobs.values() if f"{cell}/BF16/summary.parquet" in job)
        assert trunk in base and f"--keep-trunk {k}={trunk}" in base
        branch = jobs[f"{cell}/W4A4_g32_f0.5/summary.parquet"]
        assert f"input: results/data/train.npy, results/data/val.npy, results/data/manifest.json, " \
               f"results/data/budget.json, {trunk}" in branch and f"--trunk {trunk}" in branch
        assert "BF16" not in branch.split("output:")[1].split("\n")[0]  # not in its baseline's job
        ptq = jobs[f"{cell}/W4A4_g32_f0/summary.parquet"]
        assert ptq.startswith("rule ptq:") and f"--baseline-model {cell}/BF16/model.pt" in ptq
        assert "--micro-batch-size 8 " in ptq  # scored as the runs train: a whole paper batch is an OOM
        assert f"{cell}/W4A4_g32/summary.parquet" in base  # QAT from scratch trains with its baseline, as before
    gathers = [job for job in jobs.values() if job.startswith("rule layer_error:")]
    assert len(gathers) == 1 and "_f0" not in gathers[0]  # the analyses see the runs at f = 1 only
    # W4A4 only: no run with per-layer overrides, so no mixed-precision stage (it would have nothing to compare)
    assert not [job for job in jobs.values() if job.startswith(("rule mixed:", "rule figure_mixed_layer_ranking:"))]
    assert not (tmp_path / "results").exists()
