"""A study in parts: the runs of a shipped study folder restored into a new workflow (config key restore) count as
done, new cells are trained on top, and the merged outputs are those of one uninterrupted run; a folder that is
not the same study is refused in one line before any job."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import copy_project, run_snakemake, write_user_project

from qatlaw import config, grid, reference
from qatlaw.train import SUMMARY_COLUMNS

# Outputs of the study compared between one uninterrupted run and one in two parts.
TARGETS = ["results/runs.parquet", "results/analysis/layer_error.parquet", "results/analysis/outliers.parquet",
           "results/analysis/decomposition.parquet", "results/fit/params.parquet", "results/FINDINGS.md",
           "results/figures/training_curves.png", "results/tables/table1_constants.md"]
# Columns of a run's summary that time its training (another session measures other times).
TIMING = ["wall_s", "tokens_per_s"]


def write_project(workdir: Path, tokens: list[str], precisions: list[str], restore: str | None = None) -> dict:
    """The user-corpus project of test_workflow at 0.1M with the given budgets and precisions (and restore)."""
    write_user_project(workdir, shards_per_job=40)
    cfg = yaml.safe_load((workdir / "config.yaml").read_text())
    cfg["grid"].update(tokens=tokens, precisions=precisions)
    cfg["restore"] = restore
    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg))
    return cfg


def study_folder(folder: Path, cfg: dict, run_ids: list[str]) -> Path:
    """A study folder as `qatlaw reference` writes it, with only what restore reads filled in."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    (folder / "run.json").write_text(json.dumps({"wall_s": 1.0}))
    settings = {run.run_id: run for run in grid.grid_runs(cfg)}
    rows = [{column: getattr(settings[run_id], column, 1.0) for column in SUMMARY_COLUMNS} | {"run_id": run_id}
            for run_id in run_ids]
    # a study shipped before runs.parquet recorded numerics
    pd.DataFrame(rows).drop(columns="numerics").to_parquet(folder / "runs.parquet")
    (folder / "analysis").mkdir()
    for analysis in reference.RUN_ANALYSES:
        rows = pd.DataFrame({"run_id": [r for r in run_ids for _ in range(2)], "layer": [0, 1] * len(run_ids)})
        rows.to_parquet(folder / "analysis" / f"{analysis}.parquet")
    for run_id in run_ids:
        (folder / "runs" / run_id).mkdir(parents=True)
        pd.DataFrame({"step": [1]}).to_parquet(folder / "runs" / run_id / "metrics.parquet")
    return folder


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A validated config (0.1M, 4K and 8K, W4A4 and W4A16) and a study folder holding its 8K cell and the
    4K cell's BF16 run."""
    monkeypatch.chdir(tmp_path)
    write_project(tmp_path, ["4K", "8K"], ["W4A4", "W4A16"])
    cfg = config.load(tmp_path / "config.yaml")
    shipped = ["0.1M/8K/seed0/BF16", "0.1M/8K/seed0/W4A4_g32", "0.1M/8K/seed0/W4A16_g32", "0.1M/4K/seed0/BF16"]
    return cfg, study_folder(tmp_path / "shipped", cfg, shipped)


def test_restore_plan_takes_the_grids_runs_of_the_folder_in_grid_order(project):
    cfg, folder = project
    assert reference.restore_plan(cfg, folder) == ["0.1M/4K/seed0/BF16", "0.1M/8K/seed0/BF16",
                                                   "0.1M/8K/seed0/W4A4_g32", "0.1M/8K/seed0/W4A16_g32"]
    # how the corpus is split into tokenize jobs does not change the tokens
    cfg["data"]["shards_per_job"] = 1
    assert len(reference.restore_plan(cfg, folder)) == 4


def test_restore_writes_summaries_metrics_and_analysis_rows(project, tmp_path):
    cfg, folder = project
    run_ids = reference.restore_plan(cfg, folder)[1:]
    reference.restore(folder, run_ids, tmp_path / "results")
    written = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "results").rglob("*") if p.is_file())
    assert written == sorted(reference.restored_files(run_ids))
    summary = pd.read_parquet(tmp_path / "results/restored/runs/0.1M/8K/seed0/W4A4_g32/summary.parquet")
    assert tuple(summary.columns) == SUMMARY_COLUMNS and len(summary) == 1
    assert summary.iloc[0][["run_id", "precision", "loss", "numerics"]].tolist() == [
        "0.1M/8K/seed0/W4A4_g32", "W4A4", 1.0, "fp32"]
    rows = pd.read_parquet(tmp_path / "results/restored/analysis/outliers.parquet")
    assert list(rows["run_id"]) == [r for r in run_ids for _ in range(2)]
    assert reference.metrics_path(tmp_path / "results", run_ids[0]) == (
        tmp_path / "results/restored/runs" / run_ids[0] / "metrics.parquet")
    assert reference.metrics_path(folder, run_ids[0]) == folder / "runs" / run_ids[0] / "metrics.parquet"


def test_a_changed_run_setting_is_refused_naming_run_and_setting(project):
    cfg, folder = project
    cfg["models"]["0.1M"]["lr"] = 0.002
    cfg["grid"]["tokens"] = ["4K", "8K"]
    changed = config.validate(cfg, check_files=False)
    with pytest.raises(reference.ReferenceError,
                       match=r"^run 0.1M/4K/seed0/BF16: lr is 0.002 here but 0.001 in .*config.yaml; a restored "
                             r"run must be the same run$"):
        reference.restore_plan(changed, folder)


@pytest.mark.parametrize(("section", "key", "value"), [("data", "vocab_size", 640), ("data", "split_seed", 7),
                                                       ("analysis", "tokens", 2048)])
def test_other_data_or_analysis_settings_are_refused(project, section, key, value):
    cfg, folder = project
    cfg[section][key] = value
    with pytest.raises(reference.ReferenceError, match=rf"^{section}.{key} is {value} here but .* in .*config.yaml"):
        reference.restore_plan(cfg, folder)


def test_a_folder_without_the_grids_runs_is_refused(project):
    cfg, folder = project
    cfg["grid"]["sizes"] = ["0.03M"]
    cfg["grid"]["groups"] = [32]
    with pytest.raises(reference.ReferenceError, match=r"runs.parquet: none of the configured grid's runs is in it"):
        reference.restore_plan(config.validate(cfg, check_files=False), folder)


@pytest.mark.parametrize(("damage", "expected"), [
    (lambda f: shutil.rmtree(f), r"shipped: no such folder"),
    (lambda f: (f / "runs.parquet").unlink(), r"shipped/runs.parquet: missing; .* is not a whole study folder"),
    (lambda f: (f / "runs.parquet").write_bytes(b"PAR1 truncated"), r"shipped/runs.parquet: "),
    (lambda f: (f / "config.yaml").write_text("grid: [unclosed\n"), r"shipped/config.yaml: .*malformed YAML"),
    (lambda f: (f / "runs/0.1M/8K/seed0/BF16/metrics.parquet").unlink(),
     r"shipped/runs/0.1M/8K/seed0/BF16/metrics.parquet: missing"),
    (lambda f: pd.DataFrame({"run_id": ["0.1M/8K/seed0/BF16"]}).to_parquet(f / "analysis" / "outliers.parquet"),
     r"shipped/analysis/outliers.parquet: no rows of run 0.1M/4K/seed0/BF16; the folder is damaged"),
])
def test_a_missing_or_damaged_folder_is_one_line(project, damage, expected):
    cfg, folder = project
    damage(folder)
    with pytest.raises(reference.ReferenceError, match=expected) as info:
        reference.restore_plan(cfg, folder)
    assert "\n" not in str(info.value)


def test_workflow_trains_only_the_runs_not_restored(project, tmp_path):
    cfg, _ = project
    cfg_file = yaml.safe_load((tmp_path / "config.yaml").read_text())
    cfg_file["restore"] = "shipped"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg_file))
    result = run_snakemake(tmp_path, "--dry-run", "--cores", "1", "--printshellcmds")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # one restore job; the 4K cell's two quantized runs are trained (one job), and analysed alone
    assert "qatlaw restore shipped --runs 0.1M/4K/seed0/BF16 0.1M/8K/seed0/BF16 0.1M/8K/seed0/W4A4_g32 " in out
    trained = {run.run_id for run in grid.grid_runs(cfg)} - set(reference.restore_plan(cfg, "shipped"))
    assert trained == {"0.1M/4K/seed0/W4A4_g32", "0.1M/4K/seed0/W4A16_g32"}
    assert out.count("exec qatlaw train") == 1 and "--summary results/runs/0.1M/4K/seed0/W4A4_g32/summary" in out
    assert "qatlaw layer-error results/runs/0.1M/4K/seed0/W4A4_g32/model.pt results/runs/0.1M/4K/seed0/" \
           "W4A16_g32/model.pt --val" in out
    assert "results/analysis/layer_error/0.1M/8K" not in out
    assert ("qatlaw gather-analysis results/analysis/outliers/0.1M/4K/seed0.parquet "
            "results/restored/analysis/outliers.parquet --runs") in out


def test_workflow_refuses_a_changed_run_in_one_line(project, tmp_path):
    cfg_file = yaml.safe_load((tmp_path / "config.yaml").read_text())
    cfg_file["restore"] = "shipped"
    cfg_file["training"]["weight_decay"] = 0.05
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg_file))
    result = run_snakemake(tmp_path, "--dry-run", "--cores", "1")
    assert result.returncode != 0
    expected = "restore: run 0.1M/4K/seed0/BF16: weight_decay is 0.05 here but 0.1 in shipped/config.yaml"
    lines = [line for line in (result.stdout + result.stderr).splitlines() if expected in line]
    assert len(lines) == 1, result.stdout + result.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_a_study_in_two_parts_equals_one_uninterrupted_run(data_project, tmp_path, monkeypatch):
    """Train a tiny grid in one go; train part of it (the 8K cell with W4A4), ship it, restore it into a fresh
    workdir that adds W4A16 (so the 8K cell is partly restored) and the 4K cell, and run the rest."""
    full, part, rest = tmp_path / "full", tmp_path / "part", tmp_path / "rest"
    grid_cfg = {"tokens": ["4K", "8K"], "precisions": ["W4A4", "W4A16"]}
    copy_project(data_project, full, grid=grid_cfg)
    copy_project(data_project, part, grid={"tokens": ["8K"], "precisions": ["W4A4"]})
    for workdir in (full, part):
        result = run_snakemake(workdir, "--cores", "2", *TARGETS)
        assert result.returncode == 0, result.stderr[-3000:]
    copy_project(data_project, rest, grid=grid_cfg, restore="reference/part")
    shipped = rest / "reference" / "part"
    monkeypatch.chdir(part)  # the config's corpus is relative to its workdir
    reference.package(part / "results", shipped, config.load(part / "config.yaml"), wall_s=1.0, command="test",
                      title="part")
    result = run_snakemake(rest, "--cores", "2", *TARGETS)
    assert result.returncode == 0, result.stderr[-3000:]

    restored = ["0.1M/8K/seed0/BF16", "0.1M/8K/seed0/W4A4_g32"]
    assert not any((rest / "results" / "runs" / run_id).exists() for run_id in restored)  # not trained again
    runs = pd.read_parquet(rest / "results" / "runs.parquet")
    expected = pd.read_parquet(full / "results" / "runs.parquet")
    pd.testing.assert_frame_equal(runs.drop(columns=TIMING), expected.drop(columns=TIMING), check_exact=True)
    pd.testing.assert_frame_equal(runs[runs["run_id"].isin(restored)].reset_index(drop=True),
                                  pd.read_parquet(shipped / "runs.parquet"), check_exact=True)
    for name in ("layer_error", "outliers", "decomposition"):
        pd.testing.assert_frame_equal(pd.read_parquet(rest / f"results/analysis/{name}.parquet"),
                                      pd.read_parquet(full / f"results/analysis/{name}.parquet"), check_exact=True)
    for name in ("fit/params", "findings"):
        pd.testing.assert_frame_equal(pd.read_parquet(rest / f"results/{name}.parquet"),
                                      pd.read_parquet(full / f"results/{name}.parquet"), check_exact=False,
                                      rtol=1e-9, atol=1e-12)
    # nothing left to do; the whole study ships with every run's metrics and the part it continued
    again = run_snakemake(rest, "--cores", "2", "--dry-run", *TARGETS)
    assert "Nothing to be done" in again.stdout + again.stderr
    monkeypatch.chdir(rest)
    whole = reference.package(rest / "results", tmp_path / "whole", config.load(rest / "config.yaml"), wall_s=2.0,
                              command="test", title="whole")
    assert all((whole / "runs" / run_id / "metrics.parquet").is_file() for run_id in expected["run_id"])
    assert json.loads((whole / "run.json").read_text())["restored"]["title"] == "part"
