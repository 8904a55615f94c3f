"""Analyses cut into cell jobs: micro-batches, the resources of a job from its models' shapes, and the gather of
the cells' tables into the table one job over every model writes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import MODEL_SETTINGS as SETTINGS
from conftest import VOCAB, save_model

from qatlaw import analysis_plan, config, grid, layer_error, outliers
from qatlaw.cli import main
from qatlaw.tokens import write_tokens

ROOT = Path(__file__).resolve().parents[1]
# the paper's windows of 2048 tokens and its vocabulary (OLMo-2's tokenizer)
CONFIG = config.load(ROOT / "config.yaml", {"training": {"seq_len": 2048}})
PAPER_VOCAB = 100278


def paper_run(size: str, precision: str = "W4A4", group: int | str | None = 128) -> grid.RunSettings:
    return grid.run_settings(CONFIG, size, "100B", precision, group, 0)


def test_micro_batches_hold_about_chunk_tokens():
    assert analysis_plan.micro_batch(128) == 32
    assert analysis_plan.micro_batch(2048) == 2
    assert analysis_plan.micro_batch(8192) == 1  # never less than one window
    assert analysis_plan.analysed_tokens(65536, 2048) == 65536
    assert analysis_plan.analysed_tokens(5000, 2048) == 4096


def test_memory_grows_with_the_model_and_the_tokens():
    vocab, tokens = PAPER_VOCAB, 65536
    small, large = paper_run("74M"), paper_run("973M")
    assert analysis_plan.memory_bytes(small, vocab, tokens) < analysis_plan.memory_bytes(large, vocab, tokens)
    assert analysis_plan.memory_bytes(large, vocab, tokens // 4) < analysis_plan.memory_bytes(large, vocab, tokens)
    # at 973M: fp32 weights twice (the saved ones and the model's) and the 8192-wide fc2 input on the host ...
    params = grid.non_embedding_count(16, 2048, 8192, 32, 8) + 2 * vocab * 2048
    gpu = analysis_plan.memory_bytes(large, vocab, tokens, gpu=True)
    assert gpu == 2**20 * analysis_plan.BASE_MB + 8 * params + 4 * tokens * 8192
    # ... and on the CPU per token only the residual stream and one block's four inputs: no logits, which for
    # every token would take 26 GB; the micro-batch's forward and a statistics chunk do not grow with the tokens
    per_token = [analysis_plan.memory_bytes(large, vocab, n) - analysis_plan.memory_bytes(large, vocab, n, gpu=True)
                 for n in (tokens // 4, tokens)]
    assert per_token[1] - per_token[0] == 4 * (tokens - tokens // 4) * (2048 + 3 * 2048 + 8192)
    assert 4 * tokens * vocab > 25e9


def test_a_job_asks_for_its_largest_model_and_the_time_of_all():
    runs = [paper_run("74M", "BF16", None), paper_run("74M"), paper_run("74M", "W4A16")]
    one = analysis_plan.job_resources(runs[:1], PAPER_VOCAB, 65536, threads=8)
    job = analysis_plan.job_resources(runs, PAPER_VOCAB, 65536, threads=8)
    assert job["mem_mb"] == one["mem_mb"]
    seconds = sum(analysis_plan.seconds(run, 65536, threads=8) for run in runs)
    assert job["runtime"] == analysis_plan.BASE_MINUTES + int(np.ceil(2 * seconds / 60))
    on_gpu = analysis_plan.job_resources(runs, PAPER_VOCAB, 65536, threads=8, gpu=True)
    assert on_gpu["runtime"] < job["runtime"] and on_gpu["mem_mb"] < job["mem_mb"]


@pytest.fixture()
def three_models(tmp_path):
    """Three runs in two cells (seeds 0 and 1), and a validation shard."""
    bf16 = dataclasses.replace(SETTINGS, precision="BF16", group=None)
    runs = [SETTINGS, dataclasses.replace(SETTINGS, seed=1), bf16]
    paths = []
    for run in runs:
        paths.append(tmp_path / "runs" / run.run_id / "model.pt")
        save_model(paths[-1], run)
    write_tokens(np.random.default_rng(0).integers(0, VOCAB, 100).astype(np.uint16), tmp_path / "val.npy", VOCAB)
    return runs, paths


@pytest.mark.parametrize("analysis", ["layer_error", "outliers"])
def test_gathered_cells_are_the_table_of_one_job_over_every_model(tmp_path, three_models, analysis):
    runs, paths = three_models
    run = {"layer_error": layer_error.run_layer_error, "outliers": outliers.run_outliers}[analysis]
    whole = run(paths, tmp_path / "val.npy", tmp_path / "whole.parquet", n_tokens=48)
    cells = grid.cells(runs)
    assert list(cells) == ["toy/1024/seed0", "toy/1024/seed1"] and len(cells["toy/1024/seed0"]) == 2
    parts = []
    for cell, cell_runs in reversed(cells.items()):  # cell order does not matter, the run ids' order does
        parts.append(tmp_path / cell / "part.parquet")
        run([paths[runs.index(r)] for r in cell_runs], tmp_path / "val.npy", parts[-1], n_tokens=48)
    gathered = analysis_plan.gather_runs(parts, [r.run_id for r in runs], tmp_path / "gathered.parquet")
    pd.testing.assert_frame_equal(gathered, whole)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "gathered.parquet"),
                                  pd.read_parquet(tmp_path / "whole.parquet"))


def test_gather_refuses_missing_repeated_and_foreign_runs(tmp_path, three_models, capsys):
    runs, paths = three_models
    ids = [r.run_id for r in runs]
    val, out = tmp_path / "val.npy", tmp_path / "out.parquet"
    layer_error.run_layer_error(paths[:2], val, tmp_path / "a.parquet", n_tokens=32, groups=["channel"])
    layer_error.run_layer_error(paths[1:], val, tmp_path / "b.parquet", n_tokens=32, groups=["channel"])
    outliers.run_outliers(paths[2:], val, tmp_path / "c.parquet", n_tokens=32)
    with pytest.raises(analysis_plan.AnalysisError, match=f"b.parquet: run {ids[1]} is also in .*a.parquet"):
        analysis_plan.gather_runs([tmp_path / "a.parquet", tmp_path / "b.parquet"], ids, out)
    missing = f"no analysis table has run {ids[2]} \\(1 of 3 runs missing\\)"
    with pytest.raises(analysis_plan.AnalysisError, match=missing):
        analysis_plan.gather_runs([tmp_path / "a.parquet"], ids, out)
    with pytest.raises(analysis_plan.AnalysisError, match=f"a.parquet: run {ids[1]} is not one of the runs to gather"):
        analysis_plan.gather_runs([tmp_path / "a.parquet"], ids[:1], out)
    with pytest.raises(analysis_plan.AnalysisError, match="c.parquet: columns run_id, .* differ from those of"):
        analysis_plan.gather_runs([tmp_path / "a.parquet", tmp_path / "c.parquet"], ids, out)
    assert main(["gather-analysis", str(tmp_path / "a.parquet"), str(tmp_path / "missing.parquet"),
                 "--runs", *ids, "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("qatlaw gather-analysis: error: ")
    assert not out.exists()
