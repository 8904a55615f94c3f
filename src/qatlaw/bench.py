"""Benchmarks: matmul peak, training throughput, quantization overhead, threads vs jobs, fit speed, pipeline.

Run ``python -m qatlaw.bench`` from the repository root (``--quick`` for a short check, ``--help`` for options).
It prints one Markdown table per section and writes each to ``results/bench/<section>.parquet`` (atomically),
plus ``machine.parquet`` (CPU, cores, torch, load average) and ``targets.parquet`` (each target as measured vs
its bound). Sections (``--sections``):

``peak``
    fp32 matmul GFLOP/s of a large square ``torch.mm`` (n = 2048) at the benchmark's thread count: median and
    best of the repeats, measured before and again after the ``train`` section. ``frac_peak`` in ``train`` is
    relative to the best of all.
``train``
    For every size (default 0.1M, 0.3M and 1M of ``config.yaml``) the FP32 baseline ("BF16" in the grid) and
    W4A4 at G = 32 and G = channel, eager and ``torch.compile`` (as ``training.compile`` does: the whole model).
    One step is exactly a training step of :func:`qatlaw.train.train_run` (batch, forward, loss, backward,
    gradient clipping, AdamW) at the config's batch and sequence length on random tokens. All cases of a size
    are built in one process and timed interleaved (order ABC, then CBA, ...), ``--steps`` steps per sample,
    ``--repeats`` samples each, after ``--warmup`` steps (the first compiled step's extra time is
    ``compile_s``). ``step_ms`` is the median sample's wall time (``step_ms_min`` the fastest, ``cpu_ms`` the
    median process CPU time); ``tokens_per_s`` = tokens per step / median step; ``gflops`` = model FLOPs per
    step / fastest step, with FLOPs per token = 6·(N + V·h) + 12·L·h·T: N the non-embedding parameters, V·h
    the LM head (the input embedding is a lookup and does no FLOPs), and the attention products as in PaLM's
    MFU (T = seq_len, no causal discount); ``frac_peak`` = gflops / best matmul GFLOP/s (both the least
    disturbed measurements). ``ratio`` is the quantization overhead: the median over samples of the case's
    step CPU time / the FP32 model's step CPU time in the same round (same size and mode); ``ratio_wall`` the
    same with wall times. With one thread, CPU time leaves out the time the process waited for a core while
    other processes ran, so ``ratio`` stays meaningful on a busy machine; on an idle one the two agree.
    ``ratio_same_model`` (eager W4A4 only) compares a quantized step with a step of the same model instance
    with its quantizers switched off, each after an untimed step in the same state, in alternating order
    (median over the rounds): two model
    instances of the same shape can differ by ±5% in speed on their own (memory placement), which this
    removes, so it is the figure the ≤ 1.10 target is judged on in eager mode.
``concurrency``
    Threads per job vs parallel jobs: aggregate tokens/s of two concurrent 1-thread training processes vs one
    2-thread process (W4A4, G = 32). Each process builds and warms up every size first; then all processes
    train each size in the same wall-clock window (``--concurrency-seconds``), so the two 1-thread processes
    really run side by side. Also the processes' peak RSS. Only meaningful on an otherwise idle machine.
``fit``
    Seconds to fit ``--fit-runs`` synthetic runs (300) from ``--fit-inits`` starts (1000) with
    :func:`qatlaw.fit.fit_delta` (unified δ law) and :func:`qatlaw.fit.fit_chinchilla`, and seconds per
    bootstrap resample (``--fit-boot`` resamples at the default starts, minus the fit without them, divided).
``pipeline``
    Share of a whole workflow run spent outside training, from an existing ``--results`` directory and the
    run's wall time (``--pipeline-wall`` seconds, or ``--pipeline-wall-file``): see :func:`pipeline_overhead`.
    Also the peak RSS of the jobs (Snakemake benchmark files). Skipped when ``results/benchmarks`` is missing.
``data``
    The data stage at scale (not run by default: it writes about 2 GB under ``--data-dir``). For each corpus
    size (``--data-tokens``, default 20M and 200M tokens) a repeated corpus of generated English-like documents
    is written as ``.jsonl.zst`` shards of about 10M tokens; a BPE (vocabulary 512, as the CPU grids) is trained
    once on a 16 MiB sample. Then, as the workflow runs them: ``qatlaw tokenize`` per shard, two at a time
    (1 thread each), ``qatlaw gather``, and a short real training job (``qatlaw train``, 0.1M, 40 steps,
    validation on 250K tokens) on the token stores, whose peak RSS is ``train_peak_rss_mb`` (from
    ``wait4``). ``tokenize_tokens_per_s`` is per core: tokens / the jobs' summed encode seconds;
    ``s_per_1B_tokens_2_cores`` the data stage's time per 1B tokens on 2 cores (tokenize at twice the per-core
    rate, then gather).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

SECTIONS = ("peak", "train", "concurrency", "fit", "pipeline", "data")
# Run by default: every section but data, which writes about 2 GB to --data-dir (ask for it with --sections data).
DEFAULT_SECTIONS = SECTIONS[:-1]
DATA_CORPUS_TOKENS = (20_000_000, 200_000_000)
DATA_SHARD_TOKENS = 10_000_000
DEFAULT_SIZES = ("0.1M", "0.3M", "1M")
VARIANTS = (("BF16", None), ("W4A4", 32), ("W4A4", "channel"))
MODES = ("eager", "compile")
CONCURRENCY_VARIANT = ("W4A4", 32)
PEAK_N = 2048
TARGETS = {"quant_ratio": 1.10, "frac_peak": 0.50, "fit_s": 10.0, "rss_mib": 2048.0, "bench_s": 300.0,
           "train_rss_growth_mb": 64.0}


# ------------------------------------------------------------------------------------------------- machine

def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int) -> dict[str, Any]:
    """CPU model, core counts, library versions and the load average (other processes skew every timing)."""
    import torch

    model = cpu_model()
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": model, "logical_cpus": os.cpu_count(), "usable_cpus": affinity, "threads": threads,
        "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "load_avg_1m": os.getloadavg()[0],
    }


# ------------------------------------------------------------------------------------------------- peak

def matmul_peak(threads: int, n: int = PEAK_N, repeats: int = 5) -> dict[str, Any]:
    """fp32 GFLOP/s of an n×n by n×n torch.mm at ``threads`` threads: median and best of ``repeats``."""
    import torch

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    out = torch.empty(n, n)
    for _ in range(2):
        torch.mm(a, b, out=out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - t0)
    flops = 2.0 * n**3
    return {"n": n, "threads": threads, "repeats": repeats, "gflops": flops / statistics.median(times) / 1e9,
            "gflops_best": flops / min(times) / 1e9}


# ------------------------------------------------------------------------------------------------- training

def flops_per_token(layers: int, hidden: int, vocab: int, seq_len: int, n_params: int) -> float:
    """Training FLOPs per token: 6·(N + V·h) for the matmuls (forward and backward) plus 12·L·h·T for the
    attention score and value products (PaLM's MFU convention, no causal discount)."""
    return 6.0 * (n_params + vocab * hidden) + 12.0 * layers * hidden * seq_len


@dataclass
class _Case:
    """One model being timed: its optimizer, batches and the (possibly compiled) forward."""

    size: str
    precision: str
    group: int | str | None
    mode: str
    model: Any
    opt: Any
    forward: Callable
    batches: Any
    settings: Any
    step: int = 0
    compile_s: float = 0.0


def _random_tokens(vocab: int, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=n).astype(np.uint16)


def _build_case(cfg: dict, size: str, precision: str, group: int | str | None, mode: str,
                tokens: np.ndarray) -> _Case:
    import torch

    from qatlaw.grid import run_settings
    from qatlaw.train import TokenBatches, build_model, make_optimizer

    s = run_settings(cfg, size, cfg["grid"]["tokens"][0], precision, group, 0)
    model = build_model(s, int(cfg["data"]["vocab_size"]))
    if mode == "compile":
        # every case is its own graph of the same code; past dynamo's recompile limit (8) it would silently run
        # eager, so the limit is raised to the cases one process compiles
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    forward = torch.compile(model) if mode == "compile" else model
    return _Case(size, precision, group, mode, model, make_optimizer(model, s), forward,
                 TokenBatches(tokens, s.seq_len, s.batch_size, s.seed), s)


def _train_step(case: _Case) -> float:
    """One training step as in :func:`qatlaw.train.train_run`; returns the loss."""
    import torch

    from qatlaw.train import lr_at

    s = case.settings
    lr = lr_at(case.step, 1000, s.lr, 10, s.min_lr_ratio)
    for group in case.opt.param_groups:
        group["lr"] = lr
    x, y = case.batches.batch(case.step)
    _, loss = case.forward(x, y)
    value = loss.item()
    case.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(case.model.parameters(), s.grad_clip).item()
    case.opt.step()
    case.step += 1
    return value


@contextmanager
def _unquantized(model: Any) -> Iterator[None]:
    """The model's quantized linear layers compute in full precision inside the block (same weights, same
    memory): the "unquantized step" of the same model."""
    from qatlaw.precision import LayerQuant, TensorQuant
    from qatlaw.quant import QATLinear

    layers = [m for m in model.modules() if isinstance(m, QATLinear)]
    saved = [m.quant for m in layers]
    full = LayerQuant(TensorQuant(16), TensorQuant(16))
    for m in layers:
        m.quant = full
    try:
        yield
    finally:
        for m, quant in zip(layers, saved, strict=True):
            m.quant = quant


def _cpu_step(case: _Case, quantized: bool = True) -> float:
    """Process CPU seconds of a training step, optionally with quantization switched off, after an untimed step
    in the same state (the first step after a switch allocates differently and pays page faults)."""
    with contextlib.nullcontext() if quantized else _unquantized(case.model):
        _train_step(case)
        c0 = time.process_time()
        _train_step(case)
        return time.process_time() - c0


def measure_training(cfg: dict, sizes: Sequence[str], *, threads: int = 1, modes: Sequence[str] = MODES,
                     compile_sizes: Sequence[str] | None = None, variants: Sequence[tuple] = VARIANTS,
                     repeats: int = 9, steps: int = 1, warmup: int = 2, peak_gflops: float = float("nan"),
                     log: Callable[[str], None] = print) -> pd.DataFrame:
    """Step time, tokens/s, GFLOP/s, fraction of ``peak_gflops`` and quantization overhead of every size ×
    variant × mode (see the module docstring); one row each. ``compile_sizes`` limits the compiled cases (None:
    every size)."""
    import torch

    from qatlaw.grid import run_settings
    from qatlaw.model import non_embedding_params
    from qatlaw.train import model_config

    torch.set_num_threads(threads)
    vocab = int(cfg["data"]["vocab_size"])
    rows = []
    for size in sizes:
        size_modes = [m for m in modes if m == "eager" or compile_sizes is None or size in compile_sizes]
        s = run_settings(cfg, size, cfg["grid"]["tokens"][0], "BF16", None, 0)
        tokens = _random_tokens(vocab, (warmup + repeats * steps + 2) * s.tokens_per_step + 1, seed=1)
        mc = model_config(s, vocab)
        n_params = non_embedding_params(mc)
        step_flops = flops_per_token(mc.n_layers, mc.hidden, vocab, mc.seq_len, n_params) * s.tokens_per_step
        cases = [_build_case(cfg, size, p, g, m, tokens) for m in size_modes for p, g in variants]
        for case in cases:
            t0 = time.perf_counter()
            _train_step(case)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(max(0, warmup - 1)):
                _train_step(case)
            typical = (time.perf_counter() - t0) / max(1, warmup - 1) if warmup > 1 else 0.0
            case.compile_s = max(0.0, first - typical) if case.mode == "compile" else 0.0
            if case.mode == "compile":
                log(f"  {size} {case.precision} G={case.group}: compiled in {case.compile_s:.1f} s")
        wall: dict[int, list[float]] = {i: [] for i in range(len(cases))}
        cpu: dict[int, list[float]] = {i: [] for i in range(len(cases))}
        same: dict[int, list[float]] = {i: [] for i, c in enumerate(cases) if c.mode == "eager" and c.group}
        for r in range(repeats):
            for i in (range(len(cases)) if r % 2 == 0 else reversed(range(len(cases)))):  # ABC CBA: cancels drift
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(steps):
                    _train_step(cases[i])
                wall[i].append((time.perf_counter() - t0) / steps)
                cpu[i].append((time.process_time() - c0) / steps)
                if i in same:  # the same model's unquantized step right after (before it on odd rounds)
                    first, second = (False, True) if r % 2 else (True, False)
                    a, b = _cpu_step(cases[i], first), _cpu_step(cases[i], second)
                    on, off = (a, b) if first else (b, a)
                    same[i].append(on / off)
        for i, case in enumerate(cases):
            base = next((j for j, c in enumerate(cases) if c.mode == case.mode and c.precision == "BF16"), None)

            def paired(samples: dict[int, list[float]], i: int = i, base: int | None = base) -> float:
                if base is None:
                    return float("nan")
                return statistics.median(a / b for a, b in zip(samples[i], samples[base], strict=True))

            step_s, best_s = statistics.median(wall[i]), min(wall[i])
            rows.append({
                "size": size, "N": n_params, "precision": case.precision,
                "group": "none" if case.group is None else str(case.group), "mode": case.mode, "threads": threads,
                "tokens_per_step": s.tokens_per_step, "step_ms": 1e3 * step_s, "step_ms_min": 1e3 * best_s,
                "cpu_ms": 1e3 * statistics.median(cpu[i]), "tokens_per_s": s.tokens_per_step / step_s,
                "gflop_per_step": step_flops / 1e9, "gflops": step_flops / best_s / 1e9,
                "frac_peak": step_flops / best_s / 1e9 / peak_gflops, "ratio": paired(cpu), "ratio_wall": paired(wall),
                "ratio_same_model": statistics.median(same[i]) if i in same else float("nan"),
                "compile_s": case.compile_s, "repeats": repeats, "steps": steps, "load_avg_1m": os.getloadavg()[0],
            })
            log(f"  {size} {case.precision:4s} G={rows[-1]['group']:7s} {case.mode:7s} {1e3 * step_s:7.1f} ms/step "
                f"(cpu {rows[-1]['cpu_ms']:.1f}) {rows[-1]['tokens_per_s']:8.0f} tok/s {rows[-1]['gflops']:5.1f} "
                f"GFLOP/s ratio {rows[-1]['ratio']:.3f} (wall {rows[-1]['ratio_wall']:.3f}, same model "
                f"{rows[-1]['ratio_same_model']:.3f})")
        del cases
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------- concurrency

def _worker(payload: dict) -> None:
    """A training process of the concurrency section: builds and warms up every size, prints 'ready', reads
    the common start time from stdin, then trains each size in its time slot and prints one JSON line per
    size (``maxrss_mib``: the process's peak RSS so far)."""
    import torch

    from qatlaw.config import load

    torch.set_num_threads(payload["threads"])
    cfg = load(payload["config"])
    tokens = _random_tokens(int(cfg["data"]["vocab_size"]), 600_000, seed=2)
    cases = [_build_case(cfg, size, *payload["variant"], "eager", tokens) for size in payload["sizes"]]
    for case in cases:
        for _ in range(2):
            _train_step(case)
    print("ready", flush=True)
    start = float(sys.stdin.readline())
    for i, case in enumerate(cases):
        t_slot = start + i * (payload["seconds"] + payload["gap_s"])
        time.sleep(max(0.0, t_slot - time.time()))
        _train_step(case)  # re-warm the caches after the previous size
        time.sleep(max(0.0, t_slot + payload["gap_s"] - time.time()))
        t0, n, end = time.time(), 0, t_slot + payload["gap_s"] + payload["seconds"]
        while time.time() < end or n == 0:
            _train_step(case)
            n += 1
        elapsed = time.time() - t0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        print(json.dumps({"size": case.size, "steps": n, "elapsed_s": elapsed,
                          "tokens_per_s": n * case.settings.tokens_per_step / elapsed,
                          "late_s": max(0.0, t0 - (t_slot + payload["gap_s"])), "maxrss_mib": rss}), flush=True)


def measure_concurrency(config: str | Path, sizes: Sequence[str], *, seconds: float = 5.0, gap_s: float = 1.0,
                        log: Callable[[str], None] = print) -> pd.DataFrame:
    """Aggregate tokens/s of two 1-thread training processes side by side vs one 2-thread process, per size
    (see the module docstring); one row per size and layout."""
    rows = []
    for layout, procs, threads in (("2 jobs x 1 thread", 2, 1), ("1 job x 2 threads", 1, 2)):
        payload = {"config": str(config), "sizes": list(sizes), "threads": threads, "seconds": seconds,
                   "gap_s": gap_s, "variant": list(CONCURRENCY_VARIANT)}
        cmd = [sys.executable, "-m", "qatlaw.bench", "--worker", json.dumps(payload)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        load = os.getloadavg()[0]  # before this layout's processes start
        workers = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
                   for _ in range(procs)]
        try:
            for w in workers:
                if w.stdout.readline().strip() != "ready":
                    raise RuntimeError(f"concurrency worker failed to start (exit {w.wait()})")
            start = time.time() + 0.5
            for w in workers:
                w.stdin.write(f"{start}\n")
                w.stdin.flush()
            results = [[json.loads(line) for line in w.stdout] for w in workers]
            for w in workers:
                if w.wait():
                    raise RuntimeError(f"concurrency worker exited with {w.returncode}")
        finally:
            for w in workers:
                if w.poll() is None:
                    w.kill()
        for i, size in enumerate(sizes):
            per = [r[i] for r in results]
            rows.append({"size": size, "layout": layout, "processes": procs, "threads_per_process": threads,
                         "tokens_per_s": sum(p["tokens_per_s"] for p in per),
                         "tokens_per_s_per_process": statistics.mean(p["tokens_per_s"] for p in per),
                         "steps": sum(p["steps"] for p in per), "seconds": seconds,
                         "late_s": max(p["late_s"] for p in per), "maxrss_mib": max(p["maxrss_mib"] for p in per),
                         "load_avg_1m": load})
            log(f"  {size} {layout}: {rows[-1]['tokens_per_s']:.0f} tok/s in all, peak RSS "
                f"{rows[-1]['maxrss_mib']:.0f} MiB")
    table = pd.DataFrame(rows)
    two = table[table["processes"] == 2].set_index("size")["tokens_per_s"]
    one = table[table["processes"] == 1].set_index("size")["tokens_per_s"]
    table["vs_other_layout"] = [row.tokens_per_s / (one if row.processes == 2 else two)[row.size]
                                for row in table.itertuples()]
    return table


# ------------------------------------------------------------------------------------------------- fits

def synthetic_runs(n: int, seed: int = 0) -> pd.DataFrame:
    """n runs with N in [1e5, 1e9], D in [1e6, 1e10], G in {32..512}: the paper's W4A4 δ law (Table 1) and a
    Chinchilla loss with α = β, each with 1% log-normal noise."""
    rng = np.random.default_rng(seed)
    N = np.exp(rng.uniform(np.log(1e5), np.log(1e9), n))
    D = np.exp(rng.uniform(np.log(1e6), np.log(1e10), n))
    G = rng.choice([32, 64, 128, 256, 512], n)
    delta = 0.1582 * D**0.0745 * np.log2(G) ** 0.7779 / N**0.2186
    loss = 1.93 + 237.7 / N**0.3022 + 596.2 / D**0.3022
    noise = np.exp(0.01 * rng.standard_normal((2, n)))
    return pd.DataFrame({"N": N, "D": D, "G": G, "delta": delta * noise[0], "loss": loss * noise[1]})


def measure_fits(n_runs: int = 300, inits: int = 1000, n_boot: int = 20,
                 log: Callable[[str], None] = print) -> pd.DataFrame:
    """Seconds of fit_delta and fit_chinchilla on ``n_runs`` synthetic runs from ``inits`` starts, and seconds
    per bootstrap resample (at the default starts); one row per law."""
    from qatlaw import fit

    runs = synthetic_runs(n_runs)
    rows = []
    for law, fn in (("unified (fit_delta)", fit.fit_delta), ("chinchilla (fit_chinchilla)", fit.fit_chinchilla)):
        t0 = time.perf_counter()
        out = fn(runs, inits=inits)
        fit_s = time.perf_counter() - t0
        plain_s = math.inf
        for _ in range(2):  # the better of two, so the difference below is the resamples' time
            t0 = time.perf_counter()
            fn(runs)
            plain_s = min(plain_s, time.perf_counter() - t0)
        per_boot = float("nan")
        if n_boot:
            t0 = time.perf_counter()
            fn(runs, n_boot=n_boot)
            per_boot = max(0.0, time.perf_counter() - t0 - plain_s) / n_boot
        rows.append({"law": law, "runs": n_runs, "inits": inits, "fit_s": fit_s, "objective": out["objective"],
                     "default_inits_s": plain_s, "boot_resamples": n_boot, "s_per_resample": per_boot})
        log(f"  {law}: {fit_s:.2f} s for {n_runs} runs x {inits} starts, {per_boot:.4f} s per resample")
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------- pipeline

def _bench_corpus(directory: Path, tokens: int, tokenizer: Path | None = None, seed: int = 0) -> list[Path]:
    """``.jsonl.zst`` shards of about ``tokens`` tokens (of ``tokenizer``; 2 characters a token without one) in
    all, at most DATA_SHARD_TOKENS each: a pool of generated documents written over and over."""
    import random

    import zstandard

    from qatlaw.io import atomic_path

    rng = random.Random(seed)
    words = ["".join(rng.choices("etaoinshrdlucmfwypvbgk", k=rng.randint(1, 10))) for _ in range(5000)]
    pool = []
    for _ in range(2000):
        text = " ".join(" ".join(rng.choices(words, k=rng.randint(5, 20))).capitalize() + "."
                        for _ in range(rng.randint(5, 40)))
        pool.append((json.dumps({"id": "x", "text": text}) + "\n").encode())
    pool_chars = sum(len(line) - 20 for line in pool)
    pool_tokens = pool_chars / 2
    if tokenizer is not None:
        from tokenizers import Tokenizer

        pool_tokens = sum(len(e.ids) + 1 for e in Tokenizer.from_file(str(tokenizer)).encode_batch(
            [json.loads(line)["text"] for line in pool]))
    n_shards = max(1, math.ceil(tokens / DATA_SHARD_TOKENS))
    per_shard = tokens / n_shards * pool_chars / pool_tokens
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n_shards):
        path = directory / f"shard-{k:04d}.jsonl.zst"
        with atomic_path(path) as tmp, tmp.open("wb") as raw, \
                zstandard.ZstdCompressor(level=1).stream_writer(raw) as out:
            written = 0
            while written < per_shard:
                out.write(b"".join(pool))
                written += pool_chars
        paths.append(path)
    return paths


# Runs a command and prints its peak RSS (KiB). A child's ru_maxrss starts at its parent's RSS at fork (Linux
# keeps the pre-exec high-water mark), so the command is started from this small process, not from the bench.
_RSS_WRAPPER = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
                "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)")


def _run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run a command to the end; its wall seconds and peak RSS (MB)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _RSS_WRAPPER, *cmd], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    lines = proc.stderr.strip().splitlines()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:4])} failed: {lines[-2:-1]}")
    return wall, int(lines[-1]) / 1024


def measure_data(corpus_tokens: Sequence[int], workdir: Path, config: str | Path) -> pd.DataFrame:
    """The data section (see the module docstring): one row per corpus size."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    from qatlaw import data
    from qatlaw.config import load
    from qatlaw.grid import grid_runs

    qatlaw = [sys.executable, "-m", "qatlaw"]
    env = dict(os.environ, RAYON_NUM_THREADS="1")
    shutil.rmtree(workdir, ignore_errors=True)
    tokenizer = workdir / "tokenizer.json"
    seed_shards = _bench_corpus(workdir / "sample", 2_000_000)
    data.build_tokenizer([data.Shard("user1", str(p)) for p in seed_shards], tokenizer, vocab_size=512,
                         min_frequency=2, sample_bytes=16 * 2**20, val_fraction=0.02, seed=0, text_field="text",
                         min_chars=200)
    cfg = load(config)
    run = next(r for r in grid_runs(load(cfg, {"grid": {"sizes": ["0.1M"], "tokens": [40 * 32 * 128],
                                                        "groups": [32], "precisions": ["W4A4"], "extra": []},
                                               "training": {"compile": False}})) if r.precision == "W4A4")
    rows = []
    for tokens in corpus_tokens:
        root = workdir / f"{tokens}"
        files = _bench_corpus(root / "corpus", tokens, tokenizer)
        jobs = [(f"user1={f}", root / "shards" / f"{i}.npy", root / "shards" / f"{i}.parquet")
                for i, f in enumerate(files)]

        def tokenize(job: tuple[str, Path, Path]) -> float:
            return _run_measured([*qatlaw, "tokenize", "--shards", job[0], "--tokenizer", str(tokenizer), "--seed", "0",
                                  "--tokens", str(job[1]), "--docs", str(job[2])], env)[1]

        t0 = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            tokenize_rss = max(pool.map(tokenize, jobs))
        tokenize_wall = time.perf_counter() - t0
        encode_s = sum(json.loads(pq_metadata(j[2]))["encode_s"] for j in jobs)
        store = {name: root / f"{name}.npy" for name in ("train", "val")}
        gather_s, gather_rss = _run_measured(
            [*qatlaw, "gather", "--tokens", *(str(j[1]) for j in jobs), "--docs", *(str(j[2]) for j in jobs),
             "--tokenizer", str(tokenizer), "--train", str(store["train"]), "--val", str(store["val"]),
             "--doc-table", str(root / "documents.parquet"), "--manifest", str(root / "manifest.json"),
             "--val-fraction", "0.002", "--seed", "0"], env)
        manifest = json.loads((root / "manifest.json").read_text())
        total = manifest["splits"]["train"]["tokens"] + manifest["splits"]["val"]["tokens"]
        for _, npy, _ in jobs:
            npy.unlink()
        out = root / "run"
        train_s, train_rss = _run_measured(
            [*qatlaw, "train", "--settings", run.to_json(), "--train-tokens", str(store["train"]),
             "--val-tokens", str(store["val"]), "--manifest", str(root / "manifest.json"),
             "--summary", str(out / "summary.parquet"), "--metrics", str(out / "metrics.parquet"),
             "--model", str(out / "model.pt"), "--checkpoint", str(out / "ckpt.pt"), "--device", "cpu",
             "--checkpoint-every", "1000"], env)
        per_core = total / encode_s
        rows.append({"corpus_tokens": total, "shards": len(jobs),
                     "store_mb": sum(p.stat().st_size for p in store.values()) / 1e6,
                     "tokenize_tokens_per_s": per_core, "tokenize_wall_s": tokenize_wall,
                     "tokenize_peak_rss_mb": tokenize_rss,
                     "gather_s": gather_s, "gather_peak_rss_mb": gather_rss, "train_s": train_s,
                     "train_peak_rss_mb": train_rss,
                     "s_per_1B_tokens_2_cores": 1e9 / (2 * per_core) + gather_s * 1e9 / total})
        shutil.rmtree(root)
    shutil.rmtree(workdir)
    table = pd.DataFrame(rows)
    table["train_rss_growth_mb"] = table["train_peak_rss_mb"] - table["train_peak_rss_mb"].iloc[0]
    return table


def pq_metadata(path: Path) -> str:
    """The ``qatlaw`` key of a Parquet file's metadata (a tokenize job's summary)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.metadata[b"qatlaw"].decode()


def read_wall_seconds(path: str | Path) -> float:
    """Total wall seconds from a file: a plain number (e.g. GNU ``time -f %e``), or ``time -p`` output (the
    ``real`` line), or bash ``time`` output (``real 11m2.5s``)."""
    text = Path(path).read_text()
    match = re.search(r"^real\s+(?:(\d+)m)?([\d.]+)s?\s*$", text, re.MULTILINE)
    if match:
        return 60.0 * float(match.group(1) or 0) + float(match.group(2))
    for token in text.split():
        try:
            return float(token)
        except ValueError:
            continue
    raise ValueError(f"{path}: no wall time in seconds found")


def _benchmark_files(results: Path) -> pd.DataFrame:
    rows = []
    for path in sorted((results / "benchmarks").rglob("*.tsv")):
        table = pd.read_csv(path, sep="\t")
        if "s" not in table.columns or table.empty:
            continue
        rel = path.relative_to(results / "benchmarks")
        rss = pd.to_numeric(table.get("max_rss", pd.Series([np.nan])), errors="coerce")
        rows.append({"job": str(rel.with_suffix("")), "train": rel.parts[0] == "train",
                     "s": float(pd.to_numeric(table["s"], errors="coerce").mean()), "max_rss_mib": float(rss.max())})
    return pd.DataFrame(rows, columns=["job", "train", "s", "max_rss_mib"])


def pipeline_overhead(results: str | Path = "results", total_wall_s: float | None = None, *, cores: int = 2,
                      threads_per_job: int = 1) -> dict[str, Any]:
    """Where a workflow run's time went, from its ``results`` directory.

    Inputs: every Snakemake benchmark file ``results/benchmarks/**/*.tsv`` (column ``s``: the job's wall
    seconds, mean over its rows; ``max_rss``: peak RSS in MiB) — the train jobs are those under
    ``benchmarks/train/`` — and every run's ``results/runs/**/summary.parquet`` (``wall_s``: the run's training
    loop, checkpoint writes included, without interpreter start, data loading, evaluation and output writes).
    ``total_wall_s`` is the wall time of the whole ``snakemake --cores <cores>`` invocation.

    Returns: ``train_jobs_s`` (Σ s of train jobs), ``train_loop_s`` (Σ wall_s), ``other_jobs_s`` (Σ s of the
    other benchmarked jobs; jobs without a ``benchmark:`` directive are not counted anywhere),
    ``per_train_job_overhead_s`` = (train_jobs_s − train_loop_s) / train jobs; with ``total_wall_s``:
    ``core_s`` = cores × total_wall_s (the CPU time the run had), ``train_jobs_share`` = train_jobs_s ×
    threads_per_job / core_s, ``train_loop_share`` = train_loop_s × threads_per_job / core_s, and
    ``outside_training_share`` = 1 − train_loop_share: the share of the run's core-seconds not spent in a
    training loop (scheduling, start-up, data, evaluation, analyses, fits, figures, idle cores). Also the
    peak RSS over train jobs and the number of jobs over 2 GiB.
    """
    results = Path(results)
    jobs = _benchmark_files(results)
    walls = [float(pd.read_parquet(p, columns=["wall_s"])["wall_s"].sum())
             for p in sorted((results / "runs").rglob("summary.parquet"))]
    train = jobs[jobs["train"]]
    out: dict[str, Any] = {
        "results": str(results), "cores": cores, "threads_per_job": threads_per_job,
        "total_wall_s": float("nan") if total_wall_s is None else float(total_wall_s),
        "benchmarked_jobs": len(jobs), "train_jobs": len(train), "run_summaries": len(walls),
        "train_jobs_s": float(train["s"].sum()), "train_loop_s": float(sum(walls)),
        "other_jobs_s": float(jobs.loc[~jobs["train"], "s"].sum()),
        "max_train_rss_mib": float(train["max_rss_mib"].max()) if len(train) else float("nan"),
        "median_train_rss_mib": float(train["max_rss_mib"].median()) if len(train) else float("nan"),
        "jobs_over_2GiB": int((jobs["max_rss_mib"] > 2048).sum()),
    }
    out["per_train_job_overhead_s"] = ((out["train_jobs_s"] - out["train_loop_s"]) / len(train)
                                       if len(train) else float("nan"))
    core_s = cores * out["total_wall_s"]
    out["core_s"] = core_s
    out["train_jobs_share"] = out["train_jobs_s"] * threads_per_job / core_s
    out["train_loop_share"] = out["train_loop_s"] * threads_per_job / core_s
    out["outside_training_share"] = 1.0 - out["train_loop_share"]
    return out


# ------------------------------------------------------------------------------------------------- report

def _fmt(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if not math.isfinite(v):
            return "–"
        if v == 0:
            return "0"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 1:
            return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
        return f"{v:.3g}"
    return str(value)


def markdown(table: pd.DataFrame) -> str:
    """A DataFrame as a GitHub Markdown table."""
    head = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def targets(train: pd.DataFrame | None, fits: pd.DataFrame | None, pipeline: dict | None,
            conc: pd.DataFrame | None, bench_s: float | None, data: pd.DataFrame | None = None) -> pd.DataFrame:
    """Every target of the issue as measured vs its bound (``met`` is None where there is no bound)."""
    rows = []

    def add(what: str, measured: float, bound: float | None, better: str) -> None:
        met = None if bound is None or not math.isfinite(measured) else (
            measured <= bound if better == "max" else measured >= bound)
        rows.append({"target": what, "measured": measured, "bound": bound if bound is not None else float("nan"),
                     "met": met})

    if train is not None and len(train):
        for row in train[train["precision"] != "BF16"].itertuples():
            same = row.mode == "eager" and math.isfinite(row.ratio_same_model)
            add(f"W4A4 step / unquantized step, {row.size} G={row.group} {row.mode}"
                f"{' (same model)' if same else ' (vs FP32 model)'}", row.ratio_same_model if same else row.ratio,
                TARGETS["quant_ratio"], "max")
        largest = train[train["size"] == train["size"].iloc[-1]]
        for mode, part in largest[largest["precision"] == "BF16"].groupby("mode", sort=False):
            add(f"training / matmul peak, {part['size'].iloc[0]} FP32 {mode}", float(part["frac_peak"].iloc[0]),
                TARGETS["frac_peak"], "min")
    if conc is not None and len(conc):
        for row in conc[conc["processes"] == 2].itertuples():
            add(f"2 jobs x 1 thread / 1 job x 2 threads (tokens/s), {row.size}", row.vs_other_layout, None, "min")
    if fits is not None:
        for row in fits.itertuples():
            add(f"fit {row.law}: {row.runs} runs x {row.inits} starts (s)", row.fit_s, TARGETS["fit_s"], "max")
    if pipeline is not None:
        add("peak RSS of a train job (MiB, from results/benchmarks)", pipeline["max_train_rss_mib"],
            TARGETS["rss_mib"], "max")
        add("workflow share outside training loops", pipeline["outside_training_share"], None, "max")
    if conc is not None and len(conc):
        add("peak RSS of a bench training process (MiB)", float(conc["maxrss_mib"].max()), TARGETS["rss_mib"], "max")
    if data is not None and len(data) > 1:
        add(f"training job peak RSS growth, {data['corpus_tokens'].iloc[0]:,} -> {data['corpus_tokens'].iloc[-1]:,} "
            "tokens (MB)", float(data["train_rss_growth_mb"].iloc[-1]), TARGETS["train_rss_growth_mb"], "max")
    if bench_s is not None:
        add("benchmark run time (s)", bench_s, TARGETS["bench_s"], "max")
    return pd.DataFrame(rows, columns=["target", "measured", "bound", "met"])


# ------------------------------------------------------------------------------------------------- CLI

def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qatlaw.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="short run: smallest size, 5 samples, 1 warm-up step, eager only, 1 s concurrency windows, "
                        "60 fit runs x 100 starts, 5 resamples")
    p.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default: all but data)")
    p.add_argument("--config", default="config.yaml", help="config file with the model sizes (default config.yaml)")
    p.add_argument("--sizes", help=f"comma-separated model sizes (default {','.join(DEFAULT_SIZES)})")
    p.add_argument("--threads", type=int, default=1, help="torch threads for peak and train (default 1)")
    p.add_argument("--repeats", type=int, help="timing samples per case (default 9)")
    p.add_argument("--steps", type=int, help="training steps per sample (default 1)")
    p.add_argument("--warmup", type=int, help="untimed steps per case first (default 2)")
    p.add_argument("--modes", help="eager,compile (default both)")
    p.add_argument("--compile-sizes", help="sizes to also time compiled (default: the largest of --sizes)")
    p.add_argument("--concurrency-seconds", type=float, help="measured seconds per size (default 5)")
    p.add_argument("--fit-runs", type=int, help="synthetic runs (default 300)")
    p.add_argument("--fit-inits", type=int, help="starts per fit (default 1000)")
    p.add_argument("--fit-boot", type=int, help="bootstrap resamples timed (default 20)")
    p.add_argument("--results", default="results", help="workflow results directory for the pipeline section")
    p.add_argument("--pipeline-wall", type=float, help="wall seconds of the whole snakemake run")
    p.add_argument("--pipeline-wall-file", help="file with that wall time (a number, or `time -p` output)")
    p.add_argument("--cores", type=int, default=2, help="snakemake --cores of that run (default 2)")
    p.add_argument("--data-tokens", help="comma-separated corpus sizes of the data section, in tokens "
                                         f"(default {','.join(str(t) for t in DATA_CORPUS_TOKENS)})")
    p.add_argument("--data-dir", default="results/bench/data-work", help="scratch directory of the data section")
    p.add_argument("--out", default="results/bench", help="output directory for the Parquet tables")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        _worker(json.loads(args.worker))
        return 0
    t_start = time.perf_counter()
    from qatlaw.config import load
    from qatlaw.io import write_parquet

    quick = args.quick
    sections = _csv(args.sections)
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"unknown sections: {', '.join(unknown)} (choose from {', '.join(SECTIONS)})")
    cfg = load(args.config)
    sizes = _csv(args.sizes) if args.sizes else ([DEFAULT_SIZES[0]] if quick else list(DEFAULT_SIZES))
    missing = [s for s in sizes if s not in cfg["models"]]
    if missing:
        raise SystemExit(f"sizes not in {args.config}: {', '.join(missing)}")
    repeats = args.repeats or (5 if quick else 9)
    steps = args.steps or 1
    warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    modes = _csv(args.modes) if args.modes else (["eager"] if quick else list(MODES))
    compile_sizes = _csv(args.compile_sizes) if args.compile_sizes else [sizes[-1]]
    out = Path(args.out)
    tables: dict[str, pd.DataFrame] = {}

    def emit(name: str, table: pd.DataFrame, title: str) -> None:
        tables[name] = table
        write_parquet(table, out / f"{name}.parquet")
        print(f"\n### {title}\n\n{markdown(table)}\n", flush=True)

    info = machine_info(args.threads)
    emit("machine", pd.DataFrame([info]), "Machine")
    peaks = []
    if "peak" in sections or "train" in sections:
        peaks.append(matmul_peak(args.threads, n=1024 if quick else PEAK_N, repeats=repeats) | {"when": "first"})
    if "train" in sections:
        print(f"training: sizes {', '.join(sizes)}; modes {', '.join(modes)} (compiled: {', '.join(compile_sizes)})",
              flush=True)
        train = measure_training(cfg, sizes, threads=args.threads, modes=modes, compile_sizes=compile_sizes,
                                 repeats=repeats, steps=steps, warmup=warmup)
        # the peak again after training: a busy machine can spoil one measurement, and frac_peak takes the best
        peaks.append(matmul_peak(args.threads, n=peaks[0]["n"], repeats=repeats) | {"when": "after train"})
        train["frac_peak"] = train["gflops"] / max(p["gflops_best"] for p in peaks)
    if peaks:
        emit("peak", pd.DataFrame(peaks), f"fp32 matmul peak ({peaks[0]['n']}x{peaks[0]['n']}, {args.threads} "
                                          f"thread(s); frac_peak uses the best)")
    if "train" in sections:
        emit("train", train, "Training throughput and quantization overhead (ratio = step / FP32 step)")
    if "concurrency" in sections:
        print("concurrency: 2 processes x 1 thread vs 1 process x 2 threads", flush=True)
        conc = measure_concurrency(args.config, sizes, seconds=args.concurrency_seconds or (1.0 if quick else 5.0))
        emit("concurrency", conc, "Threads per job vs parallel jobs (W4A4 G=32, aggregate tokens/s)")
    if "fit" in sections:
        print("fits", flush=True)
        fits = measure_fits(args.fit_runs or (60 if quick else 300), args.fit_inits or (100 if quick else 1000),
                            args.fit_boot if args.fit_boot is not None else (5 if quick else 20))
        emit("fit", fits, "Law fits")
    if "data" in sections:
        sizes_tokens = [int(float(t)) for t in _csv(args.data_tokens)] if args.data_tokens else list(DATA_CORPUS_TOKENS)
        print(f"data: corpora of {', '.join(f'{t:,}' for t in sizes_tokens)} tokens in {args.data_dir}", flush=True)
        emit("data", measure_data(sizes_tokens, Path(args.data_dir), args.config),
             "Data stage: tokenize per core, gather, training RSS on the token store")
    pipeline = None
    if "pipeline" in sections:
        results = Path(args.results)
        if (results / "benchmarks").is_dir():
            wall = args.pipeline_wall
            if wall is None and args.pipeline_wall_file:
                wall = read_wall_seconds(args.pipeline_wall_file)
            pipeline = pipeline_overhead(results, wall, cores=args.cores, threads_per_job=args.threads)
            emit("pipeline", pd.DataFrame([pipeline]), f"Pipeline overhead ({results})")
        else:
            print(f"\npipeline: skipped ({results / 'benchmarks'} not found)")
    bench_s = time.perf_counter() - t_start
    emit("targets", targets(tables.get("train"), tables.get("fit"), pipeline, tables.get("concurrency"), bench_s,
                            tables.get("data")),
         f"Targets (measured vs bound; {bench_s:.0f} s in all, load average {os.getloadavg()[0]:.2f} at the end)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
