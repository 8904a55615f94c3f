"""The training sections of the benchmark.

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
``numerics``
    bf16 autocast against fp32 on this CPU (``training.numerics``): for every size, the FP32-precision baseline
    and W4A4 at G = 32, eager, each in both numerics, timed interleaved in one process as ``train`` does;
    ``speedup`` = the fp32 case's median step / the bf16 case's (above 1: bf16 is faster here). Whether bf16 pays
    depends on the CPU (native bf16 matmuls, e.g. AVX512-BF16 or AMX) and the size: a measured choice.
``concurrency``
    Threads per job vs parallel jobs: aggregate tokens/s of two concurrent 1-thread training processes vs one
    2-thread process (W4A4, G = 32). Each process builds and warms up every size first; then all processes
    train each size in the same wall-clock window (``--concurrency-seconds``), so the two 1-thread processes
    really run side by side. Also the processes' peak RSS. Only meaningful on an otherwise idle machine.
"""

from __future__ import annotations

import contextlib
import json
import os
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

DEFAULT_SIZES = ("0.1M", "0.3M", "1M")
VARIANTS = (("BF16", None), ("W4A4", 32), ("W4A4", "channel"))
MODES = ("eager", "compile")
CONCURRENCY_VARIANT = ("W4A4", 32)


def flops_per_token(layers: int, hidden: int, vocab: int, seq_len: int, n_params: int) -> float:
    """Training FLOPs per token: 6·(N + V·h) for the matmuls (forward and backward) plus 12·L·h·T for the
    attention score and value products (PaLM's MFU convention, no causal discount)."""
    return 6.0 * (n_params + vocab * hidden) + 12.0 * layers * hidden * seq_len


@dataclass
class _Case:
    """One model being timed: its optimizer, batches, the (possibly compiled) forward and the loss's token chunk."""

    size: str
    precision: str
    group: int | str | None
    mode: str
    numerics: str
    model: Any
    opt: Any
    forward: Callable
    batches: Any
    settings: Any
    chunk_tokens: int | None
    step: int = 0
    compile_s: float = 0.0


def _random_tokens(vocab: int, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=n).astype(np.uint16)


def _build_case(cfg: dict, size: str, precision: str, group: int | str | None, mode: str, numerics: str,
                tokens: np.ndarray) -> _Case:
    import dataclasses

    import torch

    from qatlaw.grid import run_settings
    from qatlaw.train import TokenBatches, build_model, make_optimizer

    s = dataclasses.replace(run_settings(cfg, size, cfg["grid"]["tokens"][0], precision, group, 0), numerics=numerics)
    model = build_model(s, int(cfg["data"]["vocab_size"]))
    if mode == "compile":
        # every case is its own graph of the same code; past dynamo's recompile limit (8) it would silently run
        # eager, so the limit is raised to the cases one process compiles
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    forward = torch.compile(model) if mode == "compile" else model
    return _Case(size, precision, group, mode, numerics, model, make_optimizer(model, s), forward,
                 TokenBatches(tokens, s.seq_len, s.batch_size, s.seed), s,
                 cfg["training"]["loss_chunk_tokens"])


def _train_step(case: _Case) -> float:
    """One training step as in :func:`qatlaw.train.train_run`; returns the loss."""
    import torch

    from qatlaw.train import autocast, lr_at

    s = case.settings
    lr = lr_at(case.step, 1000, s.lr, 10, s.min_lr_ratio)
    for group in case.opt.param_groups:
        group["lr"] = lr
    x, y = case.batches.batch(case.step)
    with autocast(torch.device("cpu"), s.numerics):
        loss = case.forward(x, y, case.chunk_tokens)
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
                     numerics: Sequence[str] = ("fp32",), repeats: int = 9, steps: int = 1, warmup: int = 2,
                     peak_gflops: float = float("nan"), log: Callable[[str], None] = print) -> pd.DataFrame:
    """Step time, tokens/s, GFLOP/s, fraction of ``peak_gflops`` and quantization overhead of every size ×
    variant × mode × numerics (see the module docstring); one row each. ``compile_sizes`` limits the compiled
    cases (None: every size)."""
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
        cases = [_build_case(cfg, size, p, g, m, n, tokens) for m in size_modes for n in numerics for p, g in variants]
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
            base = next((j for j, c in enumerate(cases)
                         if c.mode == case.mode and c.numerics == case.numerics and c.precision == "BF16"), None)

            def paired(samples: dict[int, list[float]], i: int = i, base: int | None = base) -> float:
                if base is None:
                    return float("nan")
                return statistics.median(a / b for a, b in zip(samples[i], samples[base], strict=True))

            step_s, best_s = statistics.median(wall[i]), min(wall[i])
            rows.append({
                "size": size, "N": n_params, "precision": case.precision,
                "group": "none" if case.group is None else str(case.group), "mode": case.mode,
                "numerics": case.numerics, "threads": threads,
                "tokens_per_step": s.tokens_per_step, "step_ms": 1e3 * step_s, "step_ms_min": 1e3 * best_s,
                "cpu_ms": 1e3 * statistics.median(cpu[i]), "tokens_per_s": s.tokens_per_step / step_s,
                "gflop_per_step": step_flops / 1e9, "gflops": step_flops / best_s / 1e9,
                "frac_peak": step_flops / best_s / 1e9 / peak_gflops, "ratio": paired(cpu), "ratio_wall": paired(wall),
                "ratio_same_model": statistics.median(same[i]) if i in same else float("nan"),
                "compile_s": case.compile_s, "repeats": repeats, "steps": steps, "load_avg_1m": os.getloadavg()[0],
            })
            log(f"  {size} {case.precision:4s} G={rows[-1]['group']:7s} {case.mode:7s} {case.numerics} "
                f"{1e3 * step_s:7.1f} ms/step "
                f"(cpu {rows[-1]['cpu_ms']:.1f}) {rows[-1]['tokens_per_s']:8.0f} tok/s {rows[-1]['gflops']:5.1f} "
                f"GFLOP/s ratio {rows[-1]['ratio']:.3f} (wall {rows[-1]['ratio_wall']:.3f}, same model "
                f"{rows[-1]['ratio_same_model']:.3f})")
        del cases
    return pd.DataFrame(rows)


def concurrency_worker(payload: dict) -> None:
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


def measure_numerics(cfg: dict, sizes: Sequence[str], *, threads: int = 1, repeats: int = 9, steps: int = 1,
                     warmup: int = 2, log: Callable[[str], None] = print) -> pd.DataFrame:
    """fp32 vs bf16 autocast training steps of every size (BF16 baseline and W4A4 G = 32, eager), with the
    speedup of bf16 per case."""
    rows = measure_training(cfg, sizes, threads=threads, modes=("eager",), variants=(("BF16", None), ("W4A4", 32)),
                            numerics=("fp32", "bf16"), repeats=repeats, steps=steps, warmup=warmup, log=log)
    key = ["size", "precision", "group"]
    fp32 = rows[rows["numerics"] == "fp32"].set_index(key)["step_ms"]
    out = rows[rows["numerics"] == "bf16"].set_index(key)
    out = out.assign(fp32_step_ms=fp32, speedup=fp32 / out["step_ms"]).reset_index()
    return out.loc[:, ["size", "N", "precision", "group", "threads", "tokens_per_step", "fp32_step_ms", "step_ms",
                       "speedup", "repeats", "steps", "load_avg_1m"]].rename(columns={"step_ms": "bf16_step_ms"})
