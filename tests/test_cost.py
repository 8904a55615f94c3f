"""GPUs, nodes, job segments and GPU-hours of a grid before it runs (qatlaw.cost), and what the config allows."""

import math

import pandas as pd
import pytest
from conftest import ROOT

from qatlaw import cli, config, cost, grid
from qatlaw.config import ConfigError

PAPER = [ROOT / "config.yaml", ROOT / "config" / "paper.yaml"]
VOCAB = {"data": {"vocab_size": 100278}}  # the OLMo-2 tokenizer's ids (config/paper.yaml reads it from the file)


@pytest.fixture(scope="module")
def paper() -> dict:
    return config.load(*PAPER, VOCAB, check_files=False)


def test_gpus_per_run_per_size_and_the_nodes_they_span(paper):
    training = paper["training"]
    assert [grid.run_gpus(training, s) for s in ("74M", "145M", "297M", "595M", "973M")] == [8, 8, 16, 32, 64]
    assert [grid.run_nodes(training, s) for s in ("74M", "297M", "973M")] == [1, 2, 8]
    # a size the mapping leaves out gets one GPU; one number is every size's
    assert grid.run_gpus({"gpus_per_run": {"74M": 8}}, "145M") == 1
    assert grid.run_gpus({"gpus_per_run": 2}, "145M") == 2
    assert grid.on_gpu({"device": "cpu", "gpus_per_run": {"74M": 8}})
    assert not grid.on_gpu({"device": "cpu", "gpus_per_run": 0})


def test_gpus_beyond_a_node_must_be_whole_nodes():
    with pytest.raises(ConfigError, match=r"^training.gpus_per_run: 16 GPUs of size '297M' are not whole nodes of "
                                          r"12 \(training.gpus_per_node\)$"):
        config.load(*PAPER, VOCAB, {"training": {"gpus_per_node": 12}}, check_files=False)


def test_without_reading_files_the_vocabulary_must_be_given():
    with pytest.raises(ConfigError, match="^data.vocab_size: required when the tokenizer file is not read$"):
        config.load(*PAPER, check_files=False)


def test_job_minutes_are_capped_by_the_job_limit_and_runs_split_into_segments():
    limited, free = {"job_hours": 48}, {"job_hours": None}
    assert cost.job_minutes(100, 3, free) == 300 and cost.job_minutes(100, 3, limited) == 300
    assert cost.job_minutes(2000, 2, limited) == 2880 and cost.job_minutes(5000, 1, limited) == 2880
    assert [cost.segments(m, limited) for m in (1, 2880, 2881, 5760, 5761)] == [1, 1, 2, 2, 3]
    assert cost.segments(10**6, free) == 1


def test_run_plans_follow_the_memory_model_and_the_flop_rate(paper):
    plans = cost.run_plans(paper)
    assert len(plans) == len(grid.grid_runs(paper)) == 432
    big = plans.set_index("run_id").loc["973M/200B/seed0/W4A4_gchannel"]
    run = next(r for r in grid.grid_runs(paper) if r.run_id == "973M/200B/seed0/W4A4_gchannel")
    assert (big["gpus"], big["nodes"]) == (64, 8)
    assert big["gpu_hours"] == pytest.approx(grid.training_flops(run, 100278) / grid.GPU_FLOPS_PER_GPU / 3600)
    estimate = grid.estimate_resources(run, 100278, gpus=64, nodes=8)["runtime"]
    assert big["wall_hours"] == estimate / 60 and big["segments"] == math.ceil(estimate / 2880) == 2
    assert big["job_minutes"] == 2880  # every job asks for the limit, never more
    from qatlaw import memory
    plan = memory.plan_run(run, 100278, paper["training"])
    assert (big["micro_batch"], big["checkpointing"], big["peak_bytes"]) == (plan.micro_batch, False, plan.peak_bytes)


def test_size_costs_sum_the_runs_and_the_cli_prints_them(paper, capsys, tmp_path):
    plans = cost.run_plans(paper)
    table = cost.size_costs(plans)
    assert list(table["size"]) == ["74M", "145M", "297M", "595M", "973M", "total"]
    assert table["runs"].iloc[:-1].sum() == table["runs"].iloc[-1] == 432
    assert table["gpu_hours"].iloc[:-1].sum() == pytest.approx(table["gpu_hours"].iloc[-1])
    assert list(table["nodes_per_run"].iloc[:-1]) == [1, 1, 2, 4, 8]
    out = tmp_path / "plans.parquet"
    assert cli.main(["cost", *map(str, PAPER), "--vocab-size", "100278", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "GPU-hours at 1e+14 FLOP/s per GPU" in printed and "jobs of at most 48 hours" in printed
    assert f"total: {table['gpu_hours'].iloc[-1]:,.0f} GPU-hours" in printed
    pd.testing.assert_frame_equal(pd.read_parquet(out), plans)


def test_a_cpu_grid_has_no_gpu_cost():
    with pytest.raises(ConfigError, match="^training: the grid trains on CPU"):
        cost.run_plans(config.load(ROOT / "config.yaml"))
