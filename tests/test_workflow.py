"""The Snakemake workflow itself: lint, a data-stage run on a user-supplied corpus, and bad config at start-up."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import (
    ROOT,
    SNAKEMAKE,
    copy_project,
    dry_run_resources,
    run_snakemake,
    write_paper_standin,
)

from qatlaw import outputs


def test_lint_is_clean():
    result = run_snakemake(ROOT, "--lint")
    assert result.returncode == 0, result.stderr
    assert "Lints for" not in result.stdout + result.stderr


@pytest.mark.slow
def test_whole_workflow_on_a_user_corpus(trained_project):
    data_dir = trained_project / "results" / "data"
    manifest = json.loads((data_dir / "manifest.json").read_text())
    assert manifest["sources"]["user1"]["documents"] == 40
    assert manifest["splits"]["train"]["tokens"] == len(np.load(data_dir / "train.npy", mmap_mode="r"))
    assert len(manifest["jobs"]) == 40  # one tokenize job per file
    assert not list((data_dir / "shards").glob("*.npy"))  # the jobs' token files are gone once gathered
    budget = json.loads((data_dir / "budget.json").read_text())
    assert set(budget["epochs"]) == {"4000", "8000"}
    runs = pd.read_parquet(trained_project / "results" / "runs.parquet")
    assert len(runs) == 2 * 5 and set(runs["precision"]) == {"BF16", "W4A4", "W4A16", "W16A4", "W4A4-fc2a8"}
    assert not runs["diverged"].any()
    analysis = trained_project / "results" / "analysis"
    decomposition = pd.read_parquet(analysis / "decomposition.parquet")
    assert len(decomposition) == 2 * 2  # two cells x two metrics
    layers = pd.read_parquet(analysis / "outliers.parquet")
    assert len(layers) == 10 * 2 * 4  # runs x blocks x layer types
    assert set(pd.read_parquet(analysis / "mixed_precision.parquet")["precision"]) == {"W4A4-fc2a8"}
    params = pd.read_parquet(trained_project / "results" / "fit" / "params.parquet")
    chinchilla = params[params["law"] == "chinchilla"]
    assert set(chinchilla["constant"]) == {"A", "B", "E", "alpha", "beta"}
    assert set(params["precision"]) >= {"BF16", "W4A4", "W4A16", "W16A4", "W4A4-fc2a8"}
    figures = trained_project / "results" / "figures"
    assert {p.stem for p in figures.glob("*.png")} == set(outputs.FIGURES)
    assert {p.name for p in (trained_project / "results" / "tables").iterdir()} == {
        f"{t}.{ext}" for t in outputs.TABLES for ext in ("csv", "md")
    }
    assert "| W4A4 gamma_N > 0 |" in (trained_project / "results" / "FINDINGS.md").read_text()
    # every run has its own log at results/logs/train/<run_id>.log, also when a job trains several runs, and the
    # job's log is named after its cell
    logs = trained_project / "results" / "logs" / "train"
    for run_id in runs["run_id"]:
        assert f"{run_id}: done" in (logs / f"{run_id}.log").read_text(), run_id
    assert {p.name for p in (logs / "0.1M" / "4K" / "seed0").glob("train_*.log")} == {"train_0p1M_4K_seed0_1of1.log"}
    # nothing left to do on a second run
    again = run_snakemake(trained_project, "--cores", "2", "--dry-run")
    assert "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.slow
def test_budget_beyond_the_corpus_fails_clearly(data_project, tmp_path):
    workdir = copy_project(data_project, tmp_path / "project", grid={"tokens": ["50M"]})
    result = run_snakemake(workdir, "--cores", "2", "--show-failed-logs")
    assert result.returncode != 0
    assert "grid.tokens: budget 50,000,000 exceeds the" in result.stdout + result.stderr
    assert not (workdir / "results" / "data" / "budget.json").exists()


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ({"grid": {"precisions": ["W4A5x"]}}, "grid.precisions[0]"),
        ({"grid": {"groups": [48]}}, "grid.groups[0]: group size 48 does not divide"),
        ({"grid": {"sizes": ["9M"]}}, "grid.sizes[0]: size '9M' is not in the models table"),
        ({"grid": {"tokens": [-1]}}, "grid.tokens[0]"),
        ({"data": {"sources": ["missing/*.txt"]}}, "data.sources[0]: 'missing/*.txt'"),
    ],
)
def test_bad_config_fails_before_any_job(tmp_path, edit, expected):
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    for section, values in edit.items():
        cfg[section].update(values)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    result = run_snakemake(tmp_path, "--cores", "1", "--dry-run")
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines() if expected in line]
    assert len(lines) == 1, result.stdout + result.stderr
    assert not (tmp_path / "results").exists()


def test_paper_grid_schedules_every_run_of_the_paper(tmp_path):
    """config/paper.yaml: 4 sizes x 4 budgets x (BF16 + 5 precisions x 5 groups) + 973M validation at 2 budgets
    x (BF16 + W4A4 x 5 groups) + 4 new ablation runs at 595M/100B/G128 = 416 + 12 + 4 training jobs; on a stand-in
    corpus of four compressed JSON-lines shards, one tokenize job per shard, the user's tokenizer, one gather."""
    shutil.copy(ROOT / "config.yaml", tmp_path / "config.yaml")
    shards = write_paper_standin(tmp_path)
    result = run_snakemake(tmp_path, "--configfile", str(ROOT / "config" / "paper.yaml"), "--dry-run", "--cores", "1",
                           "--printshellcmds")
    assert result.returncode == 0, result.stderr
    counted = ("train", "train_nodes", "fit", "tokenize", "tokenizer", "gather", "layer_error_cell", "outliers_cell",
               "layer_error", "outliers")
    counts = dict(line.split()[:2] for line in result.stdout.splitlines() if line.split()[:1] in ([r] for r in counted))
    # 74M and 145M train on one node of 8 GPUs (rule train); 297M, 595M and 973M on 2, 4 and 8 nodes (train_nodes);
    # the analyses: one job per (size, tokens, seed) cell (4 x 4 + 973M at 2 budgets), then one gather
    assert counts == {"train": str(2 * 4 * (1 + 5 * 5)), "train_nodes": str(2 * 4 * (1 + 5 * 5) + 2 * (1 + 5) + 4),
                      "fit": "1", "tokenize": "4", "tokenizer": "1", "gather": "1", "layer_error_cell": "18",
                      "outliers_cell": "18", "layer_error": "1", "outliers": "1"}
    jobs = result.stdout.split("\nrule ")
    big = next(job for job in jobs if "973M/200B/seed0/W4A4_gchannel/summary.parquet" in job.split("\n", 3)[2])
    assert big.startswith("train_nodes:")
    # 92 h at the estimate: two jobs of at most training.job_hours (48 h), torchrun on each of 8 nodes under srun
    assert re.search(r"runtime=2880, gpu=64, nodes=8, tasks=8, tasks_per_gpu=0, mpi=srun, .*micro_batch_size=4", big)
    assert "mem_mb=256000," in big  # host memory per node: 8 GPUs x 32 GB
    assert "--gpus 64 --nodes 8" in big
    # SIGTERM training.stop_seconds ahead of the time limit, torchrun waits as long; a resumed segment appends
    assert "slurm_extra=--signal=TERM@120" in big and "--stop-seconds 120 " in big
    assert ">> results/logs/train/973M/200B/seed0/W4A4_gchannel.log 2>&1" in big
    gather = next(job for job in jobs if job.startswith("gather:"))
    assert "mem_mb=2000," in gather  # the tokenize jobs' document tables, which size it, do not exist yet
    small = next(job for job in jobs if "74M/10B/seed0/BF16/summary.parquet" in job.split("\n", 3)[2])
    assert small.startswith("train:") and re.search(r"runtime=\d+, gpu=8, nodes=1, ", small)
    assert "mpi=" not in small and "tasks=" not in small
    for shard in shards:  # each shard is the input of its own job
        assert f"input: {shard.relative_to(tmp_path)}, results/data/tokenizer.json" in result.stdout
    assert "input: olmo2-tokenizer.json" in result.stdout
    assert "74M/10B/seed0/W4A4_g32" in result.stdout and "973M/200B/seed0/W4A4_gchannel" in result.stdout
    assert "595M/100B/seed0/W4A4-qkva8_g128" in result.stdout
    assert not (tmp_path / "results").exists()


def analysis_jobs(output: str) -> dict[str, dict[str, str]]:
    """Resources of the per-cell analysis jobs of a dry run, keyed by rule and cell: layer_error_cell 973M/100B/0."""
    jobs = dry_run_resources(output)
    cells = {}
    for key, resources in jobs.items():
        if match := re.fullmatch(r"rule_(layer_error_cell|outliers_cell)_wildcards_(.+)_(.+)_(\d+)", key):
            cells[f"{match[1]} {match[2]}/{match[3]}/seed{match[4]}"] = resources
    return cells


def test_paper_analyses_ask_for_a_gpu_and_memory_from_the_model_size(tmp_path, monkeypatch):
    """config/paper.yaml trains on GPUs: each cell's analysis job asks for one GPU, runs on cuda, and gets the
    memory and time that qatlaw.analysis_plan estimates for the cell's models at analysis.tokens."""
    from qatlaw import analysis_plan, config, grid

    shutil.copy(ROOT / "config.yaml", tmp_path / "config.yaml")
    write_paper_standin(tmp_path)
    monkeypatch.chdir(tmp_path)
    cfg = config.load(ROOT / "config.yaml", ROOT / "config" / "paper.yaml")
    result = run_snakemake(tmp_path, "--configfile", str(ROOT / "config" / "paper.yaml"), "--dry-run", "--cores", "1",
                           "--printshellcmds")
    assert result.returncode == 0, result.stderr
    jobs = analysis_jobs(result.stdout)
    cells = grid.cells(grid.grid_runs(cfg))
    assert set(jobs) == {f"{rule} {cell}" for rule in ("layer_error_cell", "outliers_cell") for cell in cells}
    for name, resources in jobs.items():
        cell = name.split()[1]
        expected = analysis_plan.job_resources(cells[cell], cfg["data"]["vocab_size"], cfg["analysis"]["tokens"],
                                               threads=cfg["training"]["threads"], gpu=True)
        assert (resources["gpu"], resources["analysis_device"]) == ("1", "cuda"), name
        assert {key: int(resources[key]) for key in expected} == expected, name
    mem_mb = {cell: int(jobs[f"layer_error_cell {cell}"]["mem_mb"]) for cell in ("74M/100B/seed0", "973M/100B/seed0")}
    assert mem_mb["973M/100B/seed0"] > 3 * mem_mb["74M/100B/seed0"]
    assert re.search(r"qatlaw outliers results/runs/973M/200B/seed0/BF16/model.pt .* --device cuda", result.stdout)


def test_default_analyses_run_on_the_cpu_one_job_per_cell(tmp_path):
    shutil.copy(ROOT / "config.yaml", tmp_path / "config.yaml")
    result = run_snakemake(tmp_path, "--dry-run", "--cores", "2", "--printshellcmds")
    assert result.returncode == 0, result.stderr
    jobs = analysis_jobs(result.stdout)
    cells = ["0.03M/1M/seed0", "0.03M/2M/seed0", "0.1M/1M/seed0", "0.1M/2M/seed0"]
    assert set(jobs) == {f"{rule} {cell}" for rule in ("layer_error_cell", "outliers_cell") for cell in cells}
    assert all((r["gpu"], r["analysis_device"]) == ("0", "cpu") for r in jobs.values())
    # the ablation's runs are analysed with their cell, and the gather puts every run in grid order
    assert re.search(r"qatlaw layer-error results/runs/0.1M/1M/seed0/BF16/model.pt .*W4A4-fc2w8_g16/model.pt "
                     r"--val results/data/val.npy --out results/analysis/layer_error/0.1M/1M/seed0.parquet .*"
                     r"--device cpu", result.stdout)
    assert re.search(r"qatlaw gather-analysis results/analysis/outliers/0.03M/1M/seed0.parquet .* --runs "
                     r"0.03M/1M/seed0/BF16 .* 0.1M/1M/seed0/W4A4-fc2w8_g16 --out results/analysis/outliers.parquet",
                     result.stdout)
    assert not (tmp_path / "results").exists()


def test_an_overlay_switches_the_ablation_off(tmp_path):
    shutil.copy(ROOT / "config.yaml", tmp_path / "config.yaml")
    (tmp_path / "overlay.yaml").write_text("grid: {ablation: null, extra: null}\n")
    result = run_snakemake(tmp_path, "--configfile", str(tmp_path / "overlay.yaml"), "--dry-run", "--cores", "1")
    assert result.returncode == 0, result.stderr
    assert "0.1M/1M/seed0/W4A4_g16" in result.stdout and "W4A4-qkva8" not in result.stdout
    assert not (tmp_path / "results").exists()


def test_malformed_config_yaml_fails(tmp_path):
    shutil.copy(ROOT / "config.yaml", tmp_path / "config.yaml")
    with open(tmp_path / "config.yaml", "a") as fh:
        fh.write("grid: [unclosed\n")
    result = run_snakemake(tmp_path, "--cores", "1", "--dry-run")
    assert result.returncode != 0
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_rules_find_the_workflows_tools_without_the_venv_on_path(data_project, tmp_path):
    """`.venv/bin/snakemake` started from a shell whose PATH lacks the venv: the rules still find `qatlaw`."""
    workdir = copy_project(data_project, tmp_path / "project")
    bare = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                           if Path(p).resolve() != Path(sys.executable).parent.resolve())
    result = subprocess.run([*SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "--directory", str(workdir), "--cores", "1",
                             "results/data/budget.json"], capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, PATH=bare))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (workdir / "results" / "data" / "budget.json").is_file()


@pytest.mark.slow
def test_whole_workflow_with_an_fp_to_qat_split(data_project, tmp_path):
    """The split end to end on a W4A4-only grid (the shape of config/laptop-split.yaml): branches from the
    baselines' trunks and PTQ runs in the run table, today's stages on the f = 1 runs only, the split's findings
    rows and figures, and no mixed-precision stage (no run with per-layer overrides to compare)."""
    workdir = copy_project(data_project, tmp_path / "project", grid=dict(
        tokens=["8K", "16K"], precisions=["W4A4"], seeds=[0, 1], ablation=None, extra=[
            {"sizes": ["0.1M"], "tokens": ["8K", "16K"], "groups": [32], "precisions": ["W4A4"],
             "qat_fractions": [0, 0.25, 0.5]}]))
    result = run_snakemake(workdir, "--cores", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = pd.read_parquet(workdir / "results" / "runs.parquet")
    assert len(runs) == 2 * 2 * (1 + 4)  # budgets x seeds x (BF16 + W4A4 at 4 fractions)
    assert sorted(runs.loc[runs["precision"] == "W4A4", "qat_fraction"].unique()) == [0, 0.25, 0.5, 1]
    assert {p.stem for p in (workdir / "results" / "figures").glob("*.png")} == {
        *outputs.FIGURES, *outputs.SPLIT_FIGURES} - set(outputs.MIXED_FIGURES)
    assert not any((workdir / path).exists() for path in outputs.MIXED_ANALYSES)
    decomposition = pd.read_parquet(workdir / "results" / "analysis" / "decomposition.parquet")
    assert len(decomposition) == 2 * 2 * 2  # the f = 1 runs only: cells x metrics
    findings = (workdir / "results" / "FINDINGS.md").read_text()
    assert "| W4A4 gamma_N > 0 |" in findings and "PTQ" in findings


def external_config(workdir: Path, table: pd.DataFrame, precisions: list[str]) -> None:
    """config.yaml of the repository with a run table from outside (external.table) and 20 bootstrap draws."""
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    table.to_csv(workdir / "table.csv", index=False)
    cfg["external"] = {"table": "table.csv", "precisions": precisions}
    cfg["fit"]["bootstrap"] = 20
    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg))


def outside_table() -> pd.DataFrame:
    """BF16 and MXFP4-fwd (G 32) runs at 4 sizes × 3 D/N from known laws."""
    from qatlaw import fit

    rows = []
    for n in (3e7, 5e7, 1e8, 2e8):
        for ratio in (25, 100, 400):
            base = float(fit.predict_loss({"E": 1.9, "A": 240.0, "B": 600.0, "alpha": 0.3, "beta": 0.3}, n, n * ratio))
            delta = 0.5 * (n * ratio) ** 0.07 / n**0.22 * (1 + 0.02 * np.sin(n * ratio))
            rows += [{"N": n, "D": n * ratio, "precision": "BF16", "G": None, "loss": base},
                     {"N": n, "D": n * ratio, "precision": "MXFP4-fwd", "G": 32, "loss": base + delta}]
    return pd.DataFrame(rows)


@pytest.mark.slow
def test_a_run_table_from_outside_starts_the_workflow_at_its_runs_stage(tmp_path):
    """external.table: no data stage, no training, no stage that needs model weights; fit, figures, tables and
    FINDINGS.md as for a trained grid, and FINDINGS.md says which stages ran."""
    external_config(tmp_path, outside_table(), ["MXFP4-fwd"])
    result = run_snakemake(tmp_path, "--cores", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Stages run: import, fit, figures, tables, findings; skipped: data, training" in result.stderr
    results = tmp_path / "results"
    assert not (results / "data").exists() and not (results / "analysis").exists()
    assert (results / "figures" / "delta_vs_paper.png").is_file() and (results / "tables" / "table1_constants.md").is_file()
    text = (results / "FINDINGS.md").read_text()
    assert "Runs imported from table.csv" in text and "| MXFP4-fwd gamma_N > 0 |" in text
    assert "## Beside the paper's INT4 law" in text


def test_a_bad_run_table_from_outside_fails_before_any_job(tmp_path):
    table = outside_table()
    external_config(tmp_path, table.drop(index=[0]), ["MXFP4-fwd"])
    result = run_snakemake(tmp_path, "--cores", "1", "--dry-run")
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "external.table" in line]
    assert len(lines) == 1 and "QAT row(s) 1 have no BF16 row of the same N, D and seed" in lines[0], lines
    assert not (tmp_path / "results").exists()
