"""The workflow's jobs for a config (qatlaw.workflow_plan), without Snakemake: the tokenize jobs and their
resources, the runs trained here or restored, the training jobs they are grouped into with their trunks, names,
logs and resources, and the analysis cells."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from conftest import ROOT

from qatlaw import config, cost, data, grid, memory, workflow_plan
from qatlaw.workflow_plan import WorkflowPlan

# one size, two budgets, two precisions at one group, a PTQ run (f 0), a branch (f 0.5) and QAT from scratch
SPLIT_GRID = {"sizes": ["0.1M"], "tokens": ["64K", "128K"], "groups": [32], "precisions": ["W4A4", "W4A16"],
              "seeds": [0], "qat_fractions": [0, 0.5, 1], "ablation": None, "extra": []}


def load_config(*overlays: dict, files: tuple[str, ...] = ()) -> dict:
    return config.load(ROOT / "config.yaml", *(ROOT / f for f in files), *overlays, check_files=False)


def make_plan(cfg: dict, restored: tuple[str, ...] = (), tokenize_jobs: dict | None = None) -> WorkflowPlan:
    return WorkflowPlan(cfg, tokenize_jobs or {}, grid.grid_runs(cfg), list(restored))


def test_tokenize_jobs_in_corpus_order_and_their_minutes_from_the_file_sizes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "texts").mkdir()
    for i, mb in enumerate([40, 10, 30, 20, 100]):
        with open(tmp_path / "texts" / f"doc{i}.txt", "wb") as f:
            f.truncate(mb * 10**6)  # sparse: only the size counts
    cfg = load_config({"data": {"sources": ["sotu", "texts/*.txt"], "shards_per_job": 2}})
    jobs = data.tokenize_jobs(config.source_ids(cfg), cfg["data"]["shards_per_job"])
    plan = make_plan(cfg, tokenize_jobs=jobs)
    files = [f"texts/doc{i}.txt" for i in range(5)]
    # the built-in source is its package archive (not fetched yet: 0 MB), the user's files two to a job
    assert plan.corpus_files() == ["resources/corpus/sotu.pkg", *files]
    assert plan.corpus_shards() == ["sotu=resources/corpus/sotu.pkg", *(f"user1={f}" for f in files)]
    assert plan.tokenize_outputs("npy") == [f"results/data/shards/{job}.npy"
                                            for job in ("sotu", "user1-00000", "user1-00002", "user1-00004")]
    assert workflow_plan.files_mb(plan.corpus_files()) == 200
    assert workflow_plan.tokenize_minutes(["resources/corpus/sotu.pkg"], 1) == 10
    # 10 + 1 per 20 MB (50 MB: 12 minutes), x the attempt
    assert workflow_plan.tokenize_minutes(files[:2], 2) == 24
    assert plan.tokenizer_minutes(1) == 30 + 10 and plan.tokenizer_minutes(3) == 120
    assert plan.gather_minutes(1) == 30 and plan.gather_minutes(2) == 60


def test_data_flags_follow_the_config():
    plan = make_plan(load_config({"data": {"eos_token": "<|endoftext|>", "allow_repeat": True}}))
    assert (plan.eos_flag(), plan.allow_repeat_flag()) == ("--eos-token '<|endoftext|>'", "--allow-repeat")
    plan = make_plan(load_config({"data": {"eos_token": None, "allow_repeat": False}}))
    assert (plan.eos_flag(), plan.allow_repeat_flag()) == ("", "")


def test_split_grid_trains_branches_apart_from_their_baseline_after_its_trunk():
    plan = make_plan(load_config({"grid": SPLIT_GRID, "training": {"runs_per_job": 3}}))
    cell = "0.1M/64K/seed0"
    assert plan.batched and plan.ptq_runs == [f"{cell}/W4A4_g32_f0", f"{cell}/W4A16_g32_f0",
                                              "0.1M/128K/seed0/W4A4_g32_f0", "0.1M/128K/seed0/W4A16_g32_f0"]
    assert plan.train_batches[:2] == [[f"{cell}/BF16", f"{cell}/W4A4_g32", f"{cell}/W4A16_g32"],
                                      [f"{cell}/W4A4_g32_f0.5", f"{cell}/W4A16_g32_f0.5"]]
    # every run but the PTQ ones in exactly one job, a job never mixing cells
    batched = [run_id for batch in plan.train_batches for run_id in batch]
    assert sorted(batched) == sorted(set(plan.runs) - set(plan.ptq_runs))
    assert all(len({plan.runs[run_id].cell for run_id in batch}) == 1 for batch in plan.train_batches)
    assert [plan.batch_name(i) for i in range(4)] == ["train_0p1M_64K_seed0_1of2", "train_0p1M_64K_seed0_2of2",
                                                      "train_0p1M_128K_seed0_1of2", "train_0p1M_128K_seed0_2of2"]
    assert plan.batch_job_log(1) == "results/logs/train/0.1M/64K/seed0/train_0p1M_64K_seed0_2of2.log"
    # the baseline's job keeps the trunk at the branches' step (64K tokens: 16 steps, half of them), and the
    # branches' job starts from it: an output of the one job, an input of the other
    trunk = f"results/runs/{cell}/BF16/trunk/step8.pt"
    assert plan.runs[f"{cell}/W4A4_g32_f0.5"].branch_step == 8
    baseline, branches = plan.train_batches[:2]
    assert (plan.batch_trunk_outputs(baseline), plan.batch_trunk_inputs(baseline)) == ([trunk], [])
    assert (plan.batch_trunk_outputs(branches), plan.batch_trunk_inputs(branches)) == ([], [trunk, trunk])
    assert plan.batch_trunk_flags(baseline) == f"--keep-trunk 8={trunk} "
    assert plan.batch_trunk_flags(branches) == f"--trunk {trunk} {trunk} "
    # the analyses: the runs at QAT fraction 1 of each cell
    assert plan.cells[cell] == baseline
    assert plan.grid_run_ids().split() == [run_id for batch in plan.train_batches[::2] for run_id in batch]


def test_one_run_per_job_without_trunks_is_not_batched():
    plan = make_plan(load_config({"grid": {**SPLIT_GRID, "qat_fractions": [1]}, "training": {"runs_per_job": 1}}))
    assert not plan.batched and plan.train_batches == [] and plan.trunk_steps == {} and plan.ptq_runs == []
    # trunks batch a grid even at one run per job
    assert make_plan(load_config({"grid": SPLIT_GRID, "training": {"runs_per_job": 1}})).batched


def test_batch_files_logs_and_settings():
    batch = ["0.1M/1M/seed0/BF16", "0.1M/1M/seed0/W4A4_g8"]
    plan = make_plan(load_config())
    assert workflow_plan.run_outputs(batch, "model.pt") == ["results/runs/0.1M/1M/seed0/BF16/model.pt",
                                                            "results/runs/0.1M/1M/seed0/W4A4_g8/model.pt"]
    assert workflow_plan.batch_checkpoints(batch)[1] == "results/checkpoints/0.1M/1M/seed0/W4A4_g8/ckpt.pt"
    assert workflow_plan.run_log_flag(batch) == ("--run-log results/logs/train/0.1M/1M/seed0/BF16.log "
                                                 "results/logs/train/0.1M/1M/seed0/W4A4_g8.log ")
    assert plan.batch_settings_json(batch) == f"[{plan.runs[batch[0]].to_json()}, {plan.runs[batch[1]].to_json()}]"
    assert grid.RunSettings.many_from_json(plan.batch_settings_json(batch)) == [plan.runs[run_id] for run_id in batch]
    assert workflow_plan.analysis_flags({"groups": [32, "channel"], "bits": 4}) == "--groups 32 channel --bits 4 "
    assert workflow_plan.analysis_flags({}) == ""


def test_restored_runs_are_read_from_the_restored_folder_and_not_trained():
    cfg = load_config({"restore": "reference/laptop-v2/"})
    restored = ("0.1M/1M/seed0/BF16", "0.1M/1M/seed0/W4A4_g8")
    plan, fresh = make_plan(cfg, restored), make_plan(cfg)
    assert [run.run_id for run in plan.trained] == [r for r in plan.runs if r not in restored]
    assert plan.run_file(restored[0], "summary.parquet") == "results/restored/runs/0.1M/1M/seed0/BF16/summary.parquet"
    files = dict(zip(plan.runs, plan.run_files("metrics.parquet")))
    assert files[restored[1]] == "results/restored/runs/0.1M/1M/seed0/W4A4_g8/metrics.parquet"
    assert all(files[run_id] == f"results/runs/{run_id}/metrics.parquet"
               for run_id in plan.runs if run_id not in restored)
    assert not any(set(restored) & set(batch) for batch in plan.train_batches)
    assert plan.cells["0.1M/1M/seed0"] == [r for r in fresh.cells["0.1M/1M/seed0"] if r not in restored]
    # the gathered analyses take the restored runs' rows, after the cells' tables
    restored_rows = "results/restored/analysis/outliers.parquet"
    assert plan.cell_tables("outliers") == [*fresh.cell_tables("outliers"), restored_rows]
    assert plan.restore_inputs() == [
        "reference/laptop-v2/config.yaml", "reference/laptop-v2/runs.parquet", "reference/laptop-v2/run.json",
        "reference/laptop-v2/analysis/layer_error.parquet", "reference/laptop-v2/analysis/outliers.parquet",
        *(f"reference/laptop-v2/runs/{run_id}/metrics.parquet" for run_id in restored)]


def test_batch_resources_and_priority_on_the_cpu():
    plan = make_plan(load_config({"training": {"job_hours": None}}))
    batch = plan.train_batches[0]
    estimates = [cost.run_resources(plan.runs[run_id], plan.vocab_size, plan.training) for run_id in batch]
    resources = plan.batch_resources(batch)
    assert resources["mem_mb"] == max(e["mem_mb"] for e in estimates)
    assert (resources["gpu"], resources["nodes"]) == (0, 1)
    assert resources["runtime"](None, 2) == 2 * sum(e["runtime"] for e in estimates)
    assert plan.batch_priority(batch) == sum(grid.training_flops(plan.runs[r], plan.vocab_size) for r in batch) // 10**9
    # the longest jobs first
    first, last = (plan.train_batches[i] for i in (0, -1))
    assert plan.batch_priority(last) > plan.batch_priority(first) > 0
    assert plan.train_retries() is None
    # a job time limit (6 minutes) caps the runtime, and allows a retry per further segment of the longest run, plus
    # two for failures
    capped = make_plan(load_config({"training": {"job_hours": 0.1}}))
    assert capped.batch_resources(batch)["runtime"](None, 3) == 6
    longest = max(cost.wall_minutes(run, plan.vocab_size, plan.training) for run in plan.runs.values())
    assert longest > 6 and capped.train_retries() == 1 + math.ceil(longest / 6)


def test_cpu_jobs_execute_as_the_training_config_says():
    plan = make_plan(load_config({"training": {"micro_batch_size": None, "activation_checkpointing": "auto"}}))
    assert plan.job_plan(list(plan.runs.values())[:2]) == (0, "auto")
    plan = make_plan(load_config({"training": {"micro_batch_size": 4, "activation_checkpointing": True}}))
    assert plan.job_plan([]) == (4, 1)
    execution = plan.batch_execution(plan.train_batches[0])
    assert execution == plan.train_execution(4, 1)
    assert execution["slurm_extra"] == f"--signal=TERM@{plan.training['stop_seconds']}"
    assert execution["checkpoint_minutes"] == str(plan.training["checkpoint_minutes"])
    assert plan.analysis_execution() == {"gpu": 0, "analysis_device": "cpu"}
    # model sizes with dots, as a wildcard regex; every size on one node
    assert plan.node_sizes(multi_node=False) == r"0\.03M|0\.1M" and plan.node_sizes(multi_node=True) == ""


@pytest.fixture(scope="module")
def paper() -> WorkflowPlan:
    return make_plan(load_config({"data": {"vocab_size": 100278, "tokenizer": None}}, files=("config/paper.yaml",)))


def test_paper_runs_span_nodes_and_fit_their_gpus(paper):
    assert len(paper.runs) == 432 and not paper.batched
    # 8 GPUs a node: 74M and 145M on one node, 297M, 595M and 973M on several
    assert paper.node_sizes(multi_node=False) == "145M|74M" and paper.node_sizes(multi_node=True) == "297M|595M|973M"
    assert all(re.fullmatch(paper.node_sizes(multi_node=run.size not in ("74M", "145M")), run.size)
               for run in paper.runs.values())
    runs = [paper.runs["74M/10B/seed0/BF16"], paper.runs["973M/200B/seed0/W4A4_gchannel"]]
    plans = [memory.plan_run(run, 100278, paper.training) for run in runs]
    assert paper.job_plan(runs) == (min(p.micro_batch for p in plans), int(any(p.checkpointing for p in plans)))
    assert paper.analysis_execution() == {"gpu": 1, "analysis_device": "cuda"}
    # 92 h at the estimate for the longest run, 973M at 200B tokens: two jobs of training.job_hours (48 h)
    assert paper.train_retries() == 1 + 2
    assert paper.run_minutes(runs[1], 1) == 48 * 60
    assert paper.estimate(runs[1])["runtime"] > 48 * 60


def test_analysis_resources_grow_with_the_cells_models(paper):
    small = paper.analysis_resources([paper.runs[r] for r in paper.cells["74M/100B/seed0"]])
    large = paper.analysis_resources([paper.runs[r] for r in paper.cells["973M/100B/seed0"]])
    assert large["mem_mb"] > 3 * small["mem_mb"] and large["runtime"] > small["runtime"]


def test_files_mb_counts_only_files_that_exist(tmp_path: Path):
    (tmp_path / "a").write_bytes(b"x" * 500_000)
    assert workflow_plan.files_mb([str(tmp_path / "a"), str(tmp_path / "missing"), str(tmp_path)]) == 0.5
