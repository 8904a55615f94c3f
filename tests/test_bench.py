"""Benchmark smoke tests: every section runs on the smallest size with tiny repeats and gives finite, positive
numbers in the documented columns (no timing asserts: the machine is shared)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qatlaw.bench.__main__ import main
from qatlaw.bench.fitspeed import measure_fits, synthetic_runs
from qatlaw.bench.formats import QUANT_CASES, TRAIN_VARIANTS, measure_formats
from qatlaw.bench.machine import matmul_peak
from qatlaw.bench.pipeline import pipeline_overhead, read_wall_seconds
from qatlaw.bench.train import measure_numerics, measure_training
from qatlaw.config import load
from qatlaw.fit.forms import CHINCHILLA_INITS

CONFIG = Path(__file__).resolve().parents[1] / "config.yaml"
SMALLEST = "0.1M"


def positive(table: pd.DataFrame, columns: list[str]) -> None:
    for col in columns:
        values = table[col].to_numpy(float)
        assert np.isfinite(values).all() and (values > 0).all(), (col, values)


@pytest.fixture(scope="module")
def cfg() -> dict:
    return load(CONFIG)


def test_matmul_peak_is_finite_and_positive():
    row = matmul_peak(1, n=128, repeats=2)
    assert row["n"] == 128 and row["gflops_best"] >= row["gflops"] > 0


@pytest.mark.slow
def test_training_table_on_the_smallest_size(cfg):
    table = measure_training(cfg, [SMALLEST], modes=["eager"], repeats=2, steps=1, warmup=1,
                             peak_gflops=50.0, log=lambda _: None)
    assert list(table[["precision", "group"]].itertuples(index=False, name=None)) == [
        ("BF16", "none"), ("W4A4", "32"), ("W4A4", "channel")]
    assert set(table["mode"]) == {"eager"} and (table["size"] == SMALLEST).all()
    positive(table, ["N", "tokens_per_step", "step_ms", "step_ms_min", "cpu_ms", "tokens_per_s", "gflop_per_step",
                     "gflops", "frac_peak", "ratio", "ratio_wall"])
    assert (table["step_ms_min"] <= table["step_ms"]).all()
    assert table.loc[table["precision"] == "BF16", "ratio"].item() == 1.0
    # FLOPs per step: 6·(N + V·h) + 12·L·h·T per token, from the config's shape of the size
    arch, vocab, seq = cfg["models"][SMALLEST], cfg["data"]["vocab_size"], cfg["training"]["seq_len"]
    per_token = 6 * (table["N"].iloc[0] + vocab * arch["hidden"]) + 12 * arch["layers"] * arch["hidden"] * seq
    assert table["gflop_per_step"].iloc[0] == pytest.approx(per_token * table["tokens_per_step"].iloc[0] / 1e9)


@pytest.mark.slow
def test_formats_tables_compare_every_format_with_int4(cfg):
    quant, train = measure_formats(cfg, [SMALLEST], repeats=2, warmup=1, log=lambda _: None)
    assert len(quant) == 2 * len(QUANT_CASES) and set(quant["tensor"]) == {"activation", "weight"}
    positive(quant, ["ms", "melem_per_s", "ratio"])
    int4 = quant[quant["format"] == "INT4"]
    assert (int4["ratio"] == 1.0).all() and set(quant["versus"]) == {"INT4 G32", "INT4 G16"}
    assert list(train[["precision", "group"]].itertuples(index=False, name=None)) == [
        (p, "none" if g is None else str(g)) for p, g in TRAIN_VARIANTS]
    positive(train, ["step_ms", "tokens_per_s", "ratio"])


@pytest.mark.slow
def test_numerics_table_pairs_bf16_with_fp32_steps(cfg):
    table = measure_numerics(cfg, [SMALLEST], repeats=2, steps=1, warmup=1, log=lambda _: None)
    assert list(table[["precision", "group"]].itertuples(index=False, name=None)) == [("BF16", "none"), ("W4A4", "32")]
    positive(table, ["fp32_step_ms", "bf16_step_ms", "speedup"])
    np.testing.assert_allclose(table["speedup"], table["fp32_step_ms"] / table["bf16_step_ms"])


@pytest.mark.slow
def test_fit_table_and_synthetic_runs():
    runs = synthetic_runs(40)
    assert len(runs) == 40 and (runs[["N", "D", "G", "delta", "loss"]] > 0).all().all()
    table = measure_fits(n_runs=40, inits=8, n_boot=2, workflow_boot=4, log=lambda _: None)
    assert list(table["law"]) == ["unified", "chinchilla", "run_fits (reference/laptop)"]
    assert list(table["inits"]) == [1, 8, CHINCHILLA_INITS] and table["boot_resamples"].iloc[-1] == 4
    positive(table, ["runs", "inits", "fit_s", "objective"])
    # a difference of two timings (with and without resamples): finite, and at least zero
    laws = table.iloc[:2]
    assert np.isfinite(laws["s_per_resample"]).all() and (laws["s_per_resample"] >= 0).all()


def test_pipeline_overhead_from_a_results_directory(tmp_path):
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    for i, (s, rss) in enumerate([(20.0, 800.0), (30.0, 700.0)]):
        path = tmp_path / "benchmarks" / "train" / "0.1M" / "100K" / "seed0" / f"run{i}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(header + f"{s}\t0:00:{int(s)}\t{rss}\t1\t1\t1\t0\t0\t90\t{s}\n")
        summary = tmp_path / "runs" / "0.1M" / "100K" / "seed0" / f"run{i}" / "summary.parquet"
        summary.parent.mkdir(parents=True)
        pd.DataFrame({"run_id": [f"run{i}"], "wall_s": [s - 5.0]}).to_parquet(summary)
    (tmp_path / "benchmarks" / "fit.tsv").write_text(header + "10.0\t0:00:10\t300\t1\t1\t1\t0\t0\t90\t10\n")
    out = pipeline_overhead(tmp_path, 100.0, cores=2)
    assert (out["train_jobs"], out["run_summaries"], out["benchmarked_jobs"]) == (2, 2, 3)
    assert (out["train_jobs_s"], out["train_loop_s"], out["other_jobs_s"]) == (50.0, 40.0, 10.0)
    assert out["per_train_job_overhead_s"] == 5.0 and out["max_train_rss_mib"] == 800.0
    assert out["core_s"] == 200.0 and out["train_loop_share"] == pytest.approx(0.2)
    assert out["outside_training_share"] == pytest.approx(0.8) and out["jobs_over_2GiB"] == 0
    assert math.isnan(pipeline_overhead(tmp_path)["outside_training_share"])
    (tmp_path / "wall.txt").write_text("real 123.5\nuser 200.0\nsys 3.0\n")
    assert read_wall_seconds(tmp_path / "wall.txt") == 123.5
    (tmp_path / "wall.txt").write_text("\nreal\t11m2.5s\nuser\t0m1s\n")
    assert read_wall_seconds(tmp_path / "wall.txt") == 662.5
    (tmp_path / "wall.txt").write_text("661.2\n")
    assert read_wall_seconds(tmp_path / "wall.txt") == 661.2


@pytest.mark.slow
def test_cli_quick_writes_every_table(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["--quick", "--config", str(CONFIG), "--sections", "peak,train,fit,pipeline", "--repeats", "2",
                 "--fit-runs", "30", "--fit-inits", "4", "--fit-boot", "1", "--results", str(tmp_path / "none"),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "### Training throughput" in printed and "pipeline: skipped" in printed
    names = sorted(p.stem for p in out.glob("*.parquet"))
    assert names == ["fit", "machine", "peak", "targets", "train"]
    machine = pd.read_parquet(out / "machine.parquet")
    assert machine["logical_cpus"].item() >= 1 and machine["torch"].item()
    targets = pd.read_parquet(out / "targets.parquet")
    assert list(targets.columns) == ["target", "measured", "bound", "met"]
    assert np.isfinite(targets["measured"]).all() and (targets["measured"] > 0).all()


@pytest.mark.slow
def test_gpu_section_smoke_runs_every_check_end_to_end(tmp_path):
    """The GPU check's code path on the CPU: every planned case and metric is one row, measured eager and compiled
    (only GPU memory and DDP are skipped here, with the reason) and consistent with the config's shapes and the
    memory model; the resume is compared with its noise floor."""
    import torch

    from qatlaw import memory
    from qatlaw.bench import gpu
    from qatlaw.grid import non_embedding_count

    out = tmp_path / "gpu"
    assert main(["--sections", "gpu", "--smoke", "--config", str(CONFIG), "--peak-flops", "1e11", "--commit", "abc123",
                 "--out", str(out)]) == 0
    table = pd.read_parquet(out / "gpu.parquet")
    assert list(table.columns) == [*gpu.COLUMNS, *gpu.ENVIRONMENT]
    plan = gpu.make_plan(CONFIG, "unused", smoke=True)
    expected = [(c.name, check, metric) for c in plan.cases() for check in c.checks for metric in gpu.METRICS[check]]
    assert sorted(table[["case", "check", "metric"]].itertuples(index=False, name=None)) == sorted(expected)
    env = table[list(gpu.ENVIRONMENT)].drop_duplicates()
    assert len(env) == 1 and env["mode"].item() == "smoke" and env["commit"].item() == "abc123"
    assert env["torch"].item() == torch.__version__ and len(env["source_sha256"].item()) == 16
    ddp = table[table["check"] == "ddp"]
    assert list(ddp["metric"]) == list(gpu.METRICS["ddp"]) and (ddp["status"] == "skipped").all()
    assert (ddp["note"] == "DDP needs 2 or more GPUs: the smoke mode runs on the CPU").all() and ddp["compiled"].all()
    skipped = table[(table["status"] == "skipped") & (table["check"] != "ddp")]
    assert set(skipped["metric"]) == {"max_allocated_gib", "max_reserved_gib", "device_used_gib", "ratio_allocated",
                                      "ratio_reserved", "ratio_device"}
    assert (skipped["note"] == "no CUDA").all() and skipped["value"].isna().all()
    measured = table[table["status"] != "skipped"]
    assert (measured["status"] == "ok").all() and np.isfinite(measured["value"]).all(), measured[["case", "error"]]
    assert (measured["ranks"] == 1).all()
    value = table.set_index(["check", "case", "metric"])["value"].sort_index()

    cfg, vocab = plan.paper, plan.paper["data"]["vocab_size"]
    mfu = [c for c in plan.cases() if c.part == "mfu"]
    assert sorted(c.compiled for c in mfu) == [False, False, True, True]
    assert set(table[table["check"] == "mfu"]["compiled"]) == {False, True}
    for case in mfu:
        arch, v = cfg["models"][case.size], value.loc["mfu", case.name]
        n = non_embedding_count(arch["layers"], arch["hidden"], arch["ffn"], arch["heads"], arch["kv_heads"])
        assert v["mfu"] == pytest.approx(6 * (n + vocab * arch["hidden"]) * v["tokens_per_s"] / 1e11)
        assert v["mfu_attention"] > v["mfu"] > 0
        assert v["tokens_per_s"] * v["step_s"] == pytest.approx(8 * 32)  # the smoke batch: 8 sequences of 32
    for case in (c for c in plan.cases() if c.part == "memory"):
        row = table[(table["case"] == case.name) & (table["metric"] == "predicted_gib")].iloc[0]
        s = gpu._settings(cfg, case.size, case.precision, case.group, case.numerics, 2)
        assert row["micro_batch"] == memory.plan_run(s, vocab, cfg["training"]).micro_batch == 4
        assert row["value"] == pytest.approx(memory.peak_bytes(s, vocab, 4, 1, 64) / 2**30)
        assert 0 < value.loc["eval", case.name, "val_loss"] < math.log(vocab) + 1
        assert value.loc["eval", case.name, "eval_windows"] == 8
    deltas = value.loc["delta"].xs("delta_val_loss", level="metric")
    effect = value.loc["numerics_effect"].xs("delta_bf16_minus_fp32", level="metric").item()
    assert effect == pytest.approx(deltas.filter(like="bf16").item() - deltas.filter(like="fp32").item())
    resume = value.loc["resume"].droplevel("case")
    assert resume["resume_step"] == 3 and resume["max_abs_loss_diff"] <= 1e-6 and resume["val_loss_abs_diff"] <= 1e-6
    # the CPU's kernels are deterministic: two uninterrupted runs agree, and the resumed one is within that noise
    assert resume["noise_max_abs_loss_diff"] <= 1e-6 and resume["noise_val_loss_abs_diff"] <= 1e-6
    assert resume["within_noise"] == 1
    assert (out / "gpu.md").read_text().startswith("GPU check (smoke) on ")


def test_gpu_parts_that_fail_or_run_out_of_time_are_failed_rows(monkeypatch):
    """A case that raises (an out-of-memory error) and a part stopped at its cap give failed rows with the error;
    a part with no time left is not started."""
    from qatlaw.bench import gpu

    plan = gpu.make_plan(CONFIG, "unused", smoke=True)
    case = next(c for c in plan.cases() if c.part == "memory")

    def out_of_memory():
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    rows = gpu._guard(case, "cpu", out_of_memory)
    assert [(r["check"], r["metric"]) for r in rows] == [(c, m) for c in ("memory", "eval") for m in gpu.METRICS[c]]
    assert {r["status"] for r in rows} == {"failed"} and all(math.isnan(r["value"]) for r in rows)
    assert {r["error"] for r in rows} == {"RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"}

    monkeypatch.setattr(gpu, "PART_SHARES", {"resume": 0.9, "delta": 0.1})
    monkeypatch.setattr(gpu, "MIN_PART_S", 0.2)  # resume starts (0.54 s), delta's cap (0.06 s) is less than that
    table = gpu.measure_gpu(CONFIG, "unused", smoke=True, budget_s=0.6, echo=lambda _: None)
    assert (table["status"] == "failed").all()
    resume, delta = table[table["check"] == "resume"], table[table["check"] != "resume"]
    assert resume["error"].str.startswith("time cap: stopped after").all()
    assert len(resume) == len(gpu.METRICS["resume"])
    assert set(delta["check"]) == {"delta", "numerics_effect"} and delta["error"].str.startswith("not started").all()


def test_gpu_part_caps_are_shares_of_the_budget():
    """Every part's cap grows with the budget; the parts that run share all of it (ddp's share goes to the others
    on fewer than 2 GPUs), and the default budget leaves room for the check's start within 8 minutes."""
    from qatlaw.bench import gpu

    one, eight = (gpu.make_plan(CONFIG, "unused", smoke=True, gpus=g) for g in (1, 8))
    assert one.ddp_skipped.startswith("DDP needs 2 or more GPUs") and not eight.ddp_skipped
    assert list(gpu.part_caps(eight, 450)) == list(gpu.PART_SHARES)
    assert list(gpu.part_caps(one, 450)) == [p for p in gpu.PART_SHARES if p != "ddp"]
    for plan in (one, eight):
        caps, doubled = gpu.part_caps(plan, gpu.BUDGET_S), gpu.part_caps(plan, 2 * gpu.BUDGET_S)
        assert sum(caps.values()) == pytest.approx(gpu.BUDGET_S)
        assert doubled == pytest.approx({p: 2 * c for p, c in caps.items()})
    assert gpu.part_caps(eight, 450) == pytest.approx({p: 450 * share for p, share in gpu.PART_SHARES.items()})
    assert gpu.part_caps(one, 450)["mfu"] > gpu.part_caps(eight, 450)["mfu"]
    assert gpu.BUDGET_S + gpu.STOP_GRACE_S <= 8 * 60 - 15


@pytest.mark.slow
def test_gpu_ddp_part_runs_under_torchrun_with_rank_0_reporting():
    """The ddp part on the CPU: two gloo ranks under torchrun train one case through train_run, each with the
    per-GPU batch, and only rank 0 reports its rows."""
    from qatlaw.bench import gpu
    from qatlaw.grid import non_embedding_count

    plan = gpu.make_plan(CONFIG, "unused", smoke=True, compile=False, gpus=2)
    payload = gpu.worker_payload(plan, CONFIG, "unused", 1e11, "given")
    rows = pd.DataFrame(gpu._part_rows("ddp", 120, plan, payload, time.perf_counter() + 120, 120, lambda _: None))
    case = next(c for c in plan.cases() if c.part == "ddp")
    assert list(rows["metric"]) == list(gpu.METRICS["ddp"]) and set(rows["case"]) == {case.name}
    assert (rows["ranks"] == 2).all() and (rows["batch"] == 2 * 8).all() and not rows["compiled"].any()
    measured = rows[rows["status"] != "skipped"]
    assert (measured["status"] == "ok").all() and np.isfinite(measured["value"]).all(), rows[["metric", "error"]]
    assert set(rows[rows["status"] == "skipped"]["metric"]) == {"max_allocated_gib", "device_used_gib"}
    v = rows.set_index("metric")["value"]
    assert v["tokens_per_s"] * v["step_s"] == pytest.approx(2 * 8 * 32)  # both ranks' batches of 8 sequences
    arch, vocab = plan.paper["models"][case.size], plan.paper["data"]["vocab_size"]
    n = non_embedding_count(arch["layers"], arch["hidden"], arch["ffn"], arch["heads"], arch["kv_heads"])
    assert v["mfu"] == pytest.approx(6 * (n + vocab * arch["hidden"]) * v["tokens_per_s"] / 2 / 1e11)  # per GPU


def test_gpu_token_store_is_written_and_read_as_the_train_rule_does(tmp_path):
    """The check trains from token stores on disk: the data stage's format, opened against their manifest."""
    from qatlaw.bench import gpu
    from qatlaw.tokens import TokenStore, open_tokens

    train, val = gpu._split_walk(300, 1000, 200, 0)
    store = gpu.write_store(tmp_path, 300, train, val)
    assert isinstance(store.train, TokenStore) and isinstance(store.val, TokenStore)
    assert store.manifest["token_dtype"] == "uint16" and store.manifest["vocab_size"] == 300
    assert {k: v["tokens"] for k, v in store.manifest["splits"].items()} == {"train": 1000, "val": 200}
    assert np.array_equal(store.train[:], train) and np.array_equal(np.load(tmp_path / "val.npy"), val)
    assert len(open_tokens(tmp_path / "train.npy", store.manifest, "train")) == 1000


def test_gpu_resume_verdict_against_the_noise_floor():
    from qatlaw.bench.gpu import NOISE_EPS, NOISE_FACTOR, within_noise

    assert within_noise((0.0, 0.0), (0.0, 0.0)) and within_noise((NOISE_EPS, 0.0), (0.0, 0.0))
    assert not within_noise((1e-5, 0.0), (0.0, 0.0))  # deterministic kernels: a resume must be exact
    assert within_noise((0.03, 0.001), (0.01, 0.001)) and within_noise((NOISE_FACTOR * 0.01, 0.0), (0.01, 0.0))
    assert not within_noise((0.05, 0.0), (0.01, 0.0)) and not within_noise((0.0, 0.005), (0.01, 0.001))


def test_peak_flops_by_device_name_or_given():
    from qatlaw.bench.gpu import peak_flops

    assert peak_flops("NVIDIA H200", None) == (989e12, "peak 9.89e+14 FLOP/s (H200 dense bf16, table)")
    assert peak_flops("NVIDIA A100-SXM4-80GB", None)[0] == 312e12
    assert peak_flops("NVIDIA H200", 5e14) == (5e14, "peak 5e+14 FLOP/s (--peak-flops)")
    value, note = peak_flops("AMD EPYC", None)
    assert math.isnan(value) and "give --peak-flops" in note


def test_input_section_reads_a_ranks_share_of_cold_batches(tmp_path):
    """The input section on a small store: before, rank 0 of 8 reads all 16 windows and keeps 2; after, it reads its
    2; prefetched, the loop waits for none of them while a step computes. Timings are printed, never asserted."""
    from qatlaw.bench.inputs import measure_input

    table = measure_input(tmp_path, tokens=2_000_000, batch=16, seq_len=256, steps=3, step_ms=5)
    assert table["world"].tolist() == [1, 8] and table["windows_read"].tolist() == [16, 2]
    assert (table[["whole_ms", "own_ms", "prefetch_wait_ms"]] > 0).all().all()
    assert (tmp_path / "input.npy").stat().st_size >= 8_000_000
