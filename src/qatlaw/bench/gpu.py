"""The ``gpu`` section: a check of the workflow's GPU path that fits in 8 minutes on one GPU.

``python -m qatlaw.bench --sections gpu`` (``make gpu-check``) runs four parts, each in a worker process of its own
under a time cap (:data:`PART_CAPS`, and all together under ``--gpu-budget``), so that a part that runs out of
memory, hangs or crashes becomes failed rows with its error while the others still run. Every training goes through
:func:`qatlaw.train.train_run`, the train rule's code (micro-batches, chunked loss, autocast, fused AdamW on CUDA,
its final evaluation, checkpoints), on tokens generated in memory. The checks:

``mfu``
    74M and 145M (shapes and batch from the models table; seq_len, numerics and loss chunk from config/paper.yaml),
    BF16 and W4A4 G = 32, one rank of a paper run: its per-GPU batch (config/paper.yaml's GPUs per run) at the
    micro-batch and activation checkpointing of the memory model (:func:`qatlaw.memory.plan_run`), on
    uniform random tokens of the paper's vocabulary (``--vocab``, :data:`PAPER_VOCAB`): ``warmup`` steps, then
    ``timed`` steps whose wall times (train_run's per-step metrics; their mean) give ``tokens_per_s`` and
    ``step_s``. ``mfu`` = 6·(N + V·h)·tokens/s / the peak bf16 FLOP/s of the device, ``mfu_attention`` with the
    attention products 12·L·h·T per token added (the convention of the CPU ``train`` section); the peak is
    ``--peak-flops`` or :data:`PEAK_BF16_FLOPS` by device name, and ``note`` says which. Also the run's
    ``max_allocated_gib`` and the memory model's ``predicted_gib`` at that micro-batch. Eager unless
    ``--gpu-compile`` (the paper grid compiles; compiling each case takes about a minute more).
``memory``
    973M, BF16 and W4A4 G = channel (LAC: the largest predicted peak of its runs), each at the micro-batch the memory
    model chose for it (with its GPUs per run): two optimizer steps of two micro-batches (a rank's memory does not grow with more
    micro-batches: the gradients and AdamW moments exist from the first step on). ``max_allocated_gib`` and
    ``max_reserved_gib`` (torch.cuda, over the whole run: training and the final evaluation) against
    :func:`qatlaw.memory.peak_bytes` of one process (``predicted_gib``); the ``ratio_*`` divide by the prediction less its CUDA
    context, which torch does not count. Not measured on a CPU (skipped rows).
``eval``
    The final evaluation of those runs, :func:`qatlaw.train.evaluate` scoring the training micro-batch of windows per
    forward as every run does, over ``eval_windows`` windows: its ``val_loss`` (about ln V on random tokens) is there
    only if it did not run out of memory.
``delta`` and ``numerics_effect``
    δ = val_loss(W4A4 G = 32) − val_loss(BF16) (``delta_val_loss``; ``delta_loss`` the same of the smoothed training
    loss) at 6M with config.yaml's recipe (seq_len 128, batch 32, its learning rate), ``delta_steps`` (300) steps on
    a generated learnable stream (:func:`walk_tokens`) and ``val_windows`` (512) held-out windows of it, once in fp32
    and once under bf16 autocast, same seed and batches; ``numerics_effect`` is δ(bf16) − δ(fp32).
``resume``
    W4A4 G = 32 at that size in the paper's numerics: ``resume_steps`` (40) steps uninterrupted, and the same run
    stopped after ``resume_step`` (20) steps (train_run's stop request: it writes its checkpoint and raises Stopped),
    then run again, resuming. ``max_abs_loss_diff`` over every step's training loss, ``val_loss_abs_diff``, and
    ``bitwise`` (1 when all are equal): GPU kernels need not be deterministic, so the differences are the measured
    tolerance.

One row per measurement (:data:`COLUMNS`): the ``check``, its ``case`` (size, precision, group, numerics), the run's
``micro_batch``, ``batch``, ``seq_len`` and ``steps``, the ``metric``, its ``value`` and ``unit``, the ``status``
(ok; skipped: not measurable here; failed: see ``error``), the case's wall ``seconds`` and a ``note``; and the
environment: ``mode`` (gpu or smoke), ``device``, ``torch``, ``cuda``, ``commit`` and ``source_sha256`` (of the
package's files, for a copy without git). ``gpu.md`` is a short Markdown table of the headline metrics.

``--smoke`` (automatic when torch sees no CUDA GPU, unless ``--require-cuda``) runs the same code on the CPU with
config.yaml's smallest sizes, seq_len 32 and a few steps, in well under a minute, so that the check cannot rot before
a GPU comes (tests/test_bench.py).
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import hashlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

import qatlaw
from qatlaw.bench.train import flops_per_token
from qatlaw.grid import RunSettings, run_settings, variant_name

if TYPE_CHECKING:
    from qatlaw.train import Execution

# The OLMo-2 tokenizer's vocabulary (tokenizer.json of allenai/OLMo-2-1124-7B, 100,278 ids): config/paper.yaml
# reads it from that file, which is not shipped.
PAPER_VOCAB = 100278
# Dense bf16 tensor-core peak FLOP/s of the SXM parts (NVIDIA data sheets; PCIe and NVL parts are lower: give
# --peak-flops), matched by name in torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
MFU_SIZES = ("74M", "145M")
MEMORY_SIZE = "973M"
SMALL_SIZE = "6M"  # delta and resume
MFU_VARIANTS = (("BF16", None), ("W4A4", 32))
MEMORY_VARIANTS = (("BF16", None), ("W4A4", "channel"))
# seconds per part: they add up to 370 of the default 450 s budget, leaving the workers' start-up (torch, CUDA)
PART_CAPS = {"mfu": 150.0, "memory": 100.0, "delta": 80.0, "resume": 40.0}
BUDGET_S = 450.0
MIN_PART_S = 10.0  # a part with less time left is not started
# smoke mode: config.yaml's CPU sizes in place of the paper's, the same code on the CPU in seconds
SMOKE_SIZES = {"mfu": ("0.03M", "0.1M"), "memory": "0.1M", "small": "0.03M"}
SMOKE_SMALL = {"seq_len": 32, "batch_size": 8}
SMOKE_TRAINING = {**SMOKE_SMALL, "micro_batch_size": 4, "loss_chunk_tokens": 64, "numerics": "bf16"}
GIB = 2**30

METRICS: dict[str, dict[str, str]] = {  # check -> metric -> unit, in report order
    "mfu": {"mfu": "fraction of peak", "mfu_attention": "fraction of peak", "tokens_per_s": "tokens/s",
            "step_s": "s", "max_allocated_gib": "GiB", "predicted_gib": "GiB"},
    "memory": {"max_allocated_gib": "GiB", "max_reserved_gib": "GiB", "predicted_gib": "GiB",
               "ratio_allocated": "measured / predicted", "ratio_reserved": "measured / predicted"},
    "eval": {"val_loss": "nats", "eval_windows": "windows"},
    "delta": {"delta_val_loss": "nats", "delta_loss": "nats", "val_loss_BF16": "nats", "val_loss_W4A4": "nats"},
    "numerics_effect": {"delta_bf16_minus_fp32": "nats"},
    "resume": {"max_abs_loss_diff": "nats", "val_loss_abs_diff": "nats", "bitwise": "1 = equal", "resume_step": "step"},
}
HEADLINE = {"mfu": ("mfu", "tokens_per_s"), "memory": ("max_allocated_gib", "predicted_gib", "ratio_allocated"),
            "eval": ("val_loss",), "delta": ("delta_val_loss",), "numerics_effect": ("delta_bf16_minus_fp32",),
            "resume": ("max_abs_loss_diff", "val_loss_abs_diff")}
CONTEXT = ("micro_batch", "batch", "seq_len", "steps")
COLUMNS = ("check", "case", "size", "precision", "group", "numerics", *CONTEXT, "metric", "value", "unit", "status",
           "error", "seconds", "note")
ENVIRONMENT = ("mode", "device", "torch", "cuda", "commit", "source_sha256")

log = logging.getLogger("qatlaw.bench.gpu")


@dataclass(frozen=True)
class Case:
    """One trained configuration of a part and the checks measured on it."""

    part: str
    checks: tuple[str, ...]
    size: str
    precision: str
    group: int | str | None
    numerics: str

    @property
    def name(self) -> str:
        return f"{self.size} {variant_name(self.precision, self.group)} {self.numerics}"


@dataclass(frozen=True)
class Plan:
    """What the section trains: ``paper`` is the config of the mfu and memory parts, ``small`` that of delta and
    resume (config.yaml's recipe), on ``device``, with the steps of each part."""

    smoke: bool
    paper: dict
    small: dict
    device: str
    compile: bool
    mfu_sizes: tuple[str, ...]
    memory_size: str
    small_size: str
    warmup: int
    timed: int
    delta_steps: int
    val_windows: int
    resume_steps: int
    resume_at: int

    def cases(self) -> list[Case]:
        """Every case, part by part in :data:`PART_CAPS` order."""
        numerics = self.paper["training"]["numerics"]
        out = [Case("mfu", ("mfu",), size, p, g, numerics) for size in self.mfu_sizes for p, g in MFU_VARIANTS]
        out += [Case("memory", ("memory", "eval"), self.memory_size, p, g, numerics) for p, g in MEMORY_VARIANTS]
        out += [Case("delta", ("delta",), self.small_size, "W4A4", 32, n) for n in ("fp32", "bf16")]
        out.append(Case("delta", ("numerics_effect",), self.small_size, "W4A4", 32, "bf16-fp32"))
        out.append(Case("resume", ("resume",), self.small_size, "W4A4", 32, numerics))
        return out


def make_plan(config: str | Path, paper_config: str | Path, *, smoke: bool, vocab: int = PAPER_VOCAB,
              compile: bool = False) -> Plan:
    """The section's plan from config.yaml and the paper overlay (smoke: config.yaml alone, tiny shapes); a
    ConfigError in one line when a config does not load."""
    from qatlaw.config import load
    from qatlaw.corpus import BUILTIN_SOURCES

    if smoke:
        small, paper = load(config, {"training": SMOKE_SMALL}), load(config, {"training": SMOKE_TRAINING})
        return Plan(True, paper, small, "cpu", compile, SMOKE_SIZES["mfu"], SMOKE_SIZES["memory"],
                    SMOKE_SIZES["small"], warmup=1, timed=2, delta_steps=6, val_windows=32, resume_steps=6,
                    resume_at=3)
    small = load(config)
    # the section reads no corpus: a built-in source name stands in for the paper's OLMo-mix directory, --vocab for
    # its tokenizer file
    stand_in = {"data": {"sources": [next(iter(BUILTIN_SOURCES))], "tokenizer": None, "vocab_size": vocab}}
    paper = load(config, paper_config, stand_in)
    return Plan(False, paper, small, "cuda", compile, MFU_SIZES, MEMORY_SIZE, SMALL_SIZE, warmup=2, timed=3,
                delta_steps=300, val_windows=512, resume_steps=40, resume_at=20)


def peak_flops(device_name: str, given: float | None) -> tuple[float, str]:
    """The device's peak bf16 FLOP/s and where it came from (NaN when neither given nor in the table)."""
    if given:
        return given, f"peak {given:.3g} FLOP/s (--peak-flops)"
    for key, value in PEAK_BF16_FLOPS.items():
        if key.lower() in device_name.lower():
            return value, f"peak {value:.3g} FLOP/s ({key} dense bf16, table)"
    return float("nan"), f"no peak FLOP/s for {device_name!r}: give --peak-flops"


def uniform_tokens(vocab: int, n: int, seed: int) -> np.ndarray:
    """``n`` token ids drawn uniformly from the vocabulary (throughput and memory do not depend on the text)."""
    from qatlaw.tokens import token_dtype

    return np.random.default_rng(seed).integers(0, vocab, size=n).astype(token_dtype(vocab))


def walk_tokens(vocab: int, n: int, seed: int) -> np.ndarray:
    """A learnable stream of ``n`` ids: each is the previous one plus one of 8 fixed offsets (mod ``vocab``), drawn
    with fixed unequal probabilities, so a model can learn it down to that entropy and no further."""
    from qatlaw.tokens import token_dtype

    rng = np.random.default_rng(seed)
    offsets, probs = rng.integers(1, vocab, size=8), rng.dirichlet(np.ones(8))
    return (np.cumsum(offsets[rng.choice(8, size=n, p=probs)]) % vocab).astype(token_dtype(vocab))


def _row(case: Case, check: str, metric: str, value: float, context: Mapping[str, int] | None = None, *,
         status: str = "ok", error: str = "", note: str = "") -> dict[str, Any]:
    return {"check": check, "case": case.name, "size": case.size, "precision": case.precision,
            "group": "none" if case.group is None else str(case.group), "numerics": case.numerics,
            **{k: (context or {}).get(k) for k in CONTEXT}, "metric": metric, "value": float(value),
            "unit": METRICS[check][metric], "status": status, "error": error, "seconds": float("nan"), "note": note}


def _failed(case: Case, error: str) -> list[dict[str, Any]]:
    return [_row(case, check, metric, float("nan"), status="failed", error=error)
            for check in case.checks for metric in METRICS[check]]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _rows(case: Case, check: str, values: Mapping[str, float], context: Mapping[str, int], *,
          notes: Mapping[str, str] | None = None, skipped: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Rows of a check's measured values (every metric of :data:`METRICS`); a metric in ``skipped`` is not
    measurable here (the reason is its note), any other non-finite value has failed."""
    if list(values) != list(METRICS[check]):
        raise ValueError(f"{check}: measured {', '.join(values)}, expected {', '.join(METRICS[check])}")
    notes, skipped = notes or {}, skipped or {}
    out = []
    for metric, value in values.items():
        if metric in skipped:
            out.append(_row(case, check, metric, value, context, status="skipped", note=skipped[metric]))
        elif math.isfinite(value):
            out.append(_row(case, check, metric, value, context, note=notes.get(metric, "")))
        else:
            out.append(_row(case, check, metric, value, context, status="failed", error=f"{metric} is {value}"))
    return out


# ----------------------------------------------------------------------------------------------- in the workers


class StopAfter:
    """A stop request after ``steps`` steps, in place of :class:`qatlaw.stopping.StopSignals`: train_run reads
    ``received`` once after every step."""

    def __init__(self, steps: int):
        self.left = steps

    @property
    def received(self) -> signal.Signals | None:
        self.left -= 1
        return signal.SIGUSR1 if self.left <= 0 else None


def _settings(cfg: Mapping[str, Any], size: str, precision: str, group: int | str | None, numerics: str,
              steps: int) -> RunSettings:
    """The grid's settings of a run of ``steps`` optimizer steps in ``numerics`` (seed 0)."""
    s = run_settings(cfg, size, 1, precision, group, 0)
    return dataclasses.replace(s, tokens=steps * s.tokens_per_step, numerics=numerics)


def _execution(plan: Plan, cfg: Mapping[str, Any], micro_batch: int | None, steps: int,
               checkpointing: bool = False) -> Execution:
    """How the section's runs execute: the config's threads and loss chunk, the plan's device and compile, the
    memory model's activation checkpointing, no checkpoint but the ones asked for."""
    from qatlaw.train import Execution

    training = cfg["training"]
    return Execution(threads=training["threads"], checkpoint_every=steps + 1, checkpoint_minutes=math.inf,
                     compile=plan.compile, device=plan.device, micro_batch_size=micro_batch,
                     loss_chunk_tokens=training["loss_chunk_tokens"], activation_checkpointing=checkpointing)


def _train(s: RunSettings, execution: Execution, vocab: int, tokens: tuple[np.ndarray, np.ndarray], data: str,
           folder: Path, stop: StopAfter | None = None) -> tuple[dict[str, Any], pd.DataFrame]:
    """One :func:`qatlaw.train.train_run` into ``folder``: its summary and per-step metrics."""
    from qatlaw.train import train_run

    digest = hashlib.sha256(data.encode()).hexdigest()
    manifest = {"vocab_size": vocab, "corpus_sha256": digest, "tokenizer_sha256": digest}
    summary = train_run(s, train_tokens=tokens[0], val_tokens=tokens[1], manifest=manifest,
                        summary_path=folder / "summary.parquet", metrics_path=folder / "metrics.parquet",
                        model_path=folder / "model.pt", checkpoint_path=folder / "checkpoint.pt",
                        execution=execution, stop=stop)
    return summary, pd.read_parquet(folder / "metrics.parquet")


def _split_walk(vocab: int, train: int, val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    stream = walk_tokens(vocab, train + val, seed)
    return stream[:train], stream[train:]


def _peaks(device: str) -> tuple[float, float]:
    """Peak GiB allocated and reserved by torch on the GPU since the case began (NaN on a CPU)."""
    if device != "cuda":
        return float("nan"), float("nan")
    import torch

    return torch.cuda.max_memory_allocated() / GIB, torch.cuda.max_memory_reserved() / GIB


def _guard(case: Case, device: str, measure: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """A case's rows, or its failed rows with the error; every row with the case's wall seconds."""
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        rows = measure()
    except Exception as exc:  # out of memory, a kernel or shape error: this case fails, the part goes on
        log.warning("%s failed: %s", case.name, _one_line(exc))
        rows = _failed(case, _one_line(exc))
    seconds = time.perf_counter() - t0
    for row in rows:
        row["seconds"] = seconds
    return rows


def _mfu_part(plan: Plan, cases: list[Case], peak: float, peak_note: str) -> Iterator[list[dict[str, Any]]]:
    from qatlaw.config import run_gpus
    from qatlaw.memory import peak_bytes, plan_run
    from qatlaw.model import non_embedding_params
    from qatlaw.train import model_config

    cfg, steps = plan.paper, plan.warmup + plan.timed
    training, vocab = cfg["training"], int(cfg["data"]["vocab_size"])

    def measure(case: Case) -> list[dict[str, Any]]:
        s = _settings(cfg, case.size, case.precision, case.group, case.numerics, steps)
        run = plan_run(s, vocab, training)  # the workflow's, for the paper's GPUs per run
        micro = run.micro_batch
        s = dataclasses.replace(s, batch_size=s.batch_size // max(1, run_gpus(training, s.size)),
                                eval_tokens=micro * s.seq_len)
        s = dataclasses.replace(s, tokens=steps * s.tokens_per_step)
        tokens = (uniform_tokens(vocab, steps * s.tokens_per_step + 1, 1),
                  uniform_tokens(vocab, micro * s.seq_len + 1, 2))
        with tempfile.TemporaryDirectory(prefix="qatlaw-gpu-") as folder:
            _, metrics = _train(s, _execution(plan, cfg, micro, s.steps, run.checkpointing), vocab, tokens, "uniform",
                                Path(folder))
        allocated, _ = _peaks(plan.device)
        step_s = float((s.tokens_per_step / metrics["tokens_per_s"].iloc[plan.warmup:]).mean())
        mc = model_config(s, vocab)
        n_params = non_embedding_params(mc)
        tokens_per_s = s.tokens_per_step / step_s
        values = {
            "mfu": flops_per_token(mc.n_layers, mc.hidden, vocab, 0, n_params) * tokens_per_s / peak,
            "mfu_attention": flops_per_token(mc.n_layers, mc.hidden, vocab, mc.seq_len, n_params) * tokens_per_s / peak,
            "tokens_per_s": tokens_per_s, "step_s": step_s, "max_allocated_gib": allocated,
            "predicted_gib": peak_bytes(s, vocab, micro, 1, training["loss_chunk_tokens"], run.checkpointing) / GIB,
        }
        mode = "compiled" if plan.compile else "eager"
        skipped = {"mfu": peak_note, "mfu_attention": peak_note} if not math.isfinite(peak) else {}
        if plan.device != "cuda":
            skipped["max_allocated_gib"] = "no CUDA"
        context = {"micro_batch": micro, "batch": s.batch_size, "seq_len": s.seq_len, "steps": plan.timed}
        return _rows(case, "mfu", values, context, skipped=skipped,
                     notes={"mfu": f"{mode}; {peak_note}", "tokens_per_s": f"{mode}, mean of {plan.timed} steps "
                                                                            f"after {plan.warmup}"})

    for case in cases:
        yield _guard(case, plan.device, lambda case=case: measure(case))


def _memory_part(plan: Plan, cases: list[Case], peak: float, peak_note: str) -> Iterator[list[dict[str, Any]]]:
    from qatlaw.memory import CUDA_CONTEXT_BYTES, peak_bytes, plan_run

    cfg = plan.paper
    training, vocab = cfg["training"], int(cfg["data"]["vocab_size"])
    steps = 2

    def measure(case: Case) -> list[dict[str, Any]]:
        s = _settings(cfg, case.size, case.precision, case.group, case.numerics, steps)
        run = plan_run(s, vocab, training)  # the workflow's, for the paper's batch over its GPUs per run
        micro = run.micro_batch
        windows = 2 * micro
        s = dataclasses.replace(s, batch_size=2 * micro, tokens=steps * 2 * micro * s.seq_len,
                                eval_tokens=windows * s.seq_len)
        tokens = (uniform_tokens(vocab, s.tokens + 1, 3), uniform_tokens(vocab, windows * s.seq_len + 1, 4))
        with tempfile.TemporaryDirectory(prefix="qatlaw-gpu-") as folder:
            summary, _ = _train(s, _execution(plan, cfg, micro, s.steps, run.checkpointing), vocab, tokens, "uniform",
                                Path(folder))
        allocated, reserved = _peaks(plan.device)
        predicted = peak_bytes(s, vocab, micro, 1, training["loss_chunk_tokens"], run.checkpointing)  # one process
        tensors = (predicted - CUDA_CONTEXT_BYTES) / GIB  # what torch's allocator can see of the prediction
        memory = {"max_allocated_gib": allocated, "max_reserved_gib": reserved, "predicted_gib": predicted / GIB,
                  "ratio_allocated": allocated / tensors, "ratio_reserved": reserved / tensors}
        context = {"micro_batch": micro, "batch": s.batch_size, "seq_len": s.seq_len, "steps": steps}
        no_cuda = {k: "no CUDA" for k in memory if k != "predicted_gib"} if plan.device != "cuda" else {}
        forwards = math.ceil(training["eval_tokens"] / s.seq_len / micro)
        return [*_rows(case, "memory", memory, context, skipped=no_cuda,
                       notes={"max_allocated_gib": "training and its final evaluation"}),
                *_rows(case, "eval", {"val_loss": summary["val_loss"], "eval_windows": windows}, context,
                       notes={"val_loss": f"{micro} windows per forward; the config's eval_tokens take {forwards} "
                                          "forwards"})]

    for case in cases:
        yield _guard(case, plan.device, lambda case=case: measure(case))


def _delta_part(plan: Plan, cases: list[Case], peak: float, peak_note: str) -> Iterator[list[dict[str, Any]]]:
    cfg, steps = plan.small, plan.delta_steps
    vocab = int(cfg["data"]["vocab_size"])
    deltas: dict[str, float] = {}

    def measure(case: Case) -> list[dict[str, Any]]:
        runs = {}
        for precision, group in (("BF16", None), (case.precision, case.group)):
            s = _settings(cfg, case.size, precision, group, case.numerics, steps)
            tokens = _split_walk(vocab, steps * s.tokens_per_step + 1, plan.val_windows * s.seq_len + 1, 5)
            with tempfile.TemporaryDirectory(prefix="qatlaw-gpu-") as folder:
                runs[precision], _ = _train(s, _execution(plan, cfg, None, steps), vocab, tokens, "walk", Path(folder))
        base, qat = runs["BF16"], runs[case.precision]
        deltas[case.numerics] = qat["val_loss"] - base["val_loss"]
        context = {"batch": s.batch_size, "seq_len": s.seq_len, "steps": steps}
        return _rows(case, "delta", {"delta_val_loss": deltas[case.numerics], "delta_loss": qat["loss"] - base["loss"],
                                     "val_loss_BF16": base["val_loss"], "val_loss_W4A4": qat["val_loss"]}, context)

    for case in cases:
        if case.checks == ("numerics_effect",):
            if {"bf16", "fp32"} <= set(deltas):
                yield _rows(case, "numerics_effect", {"delta_bf16_minus_fp32": deltas["bf16"] - deltas["fp32"]},
                            {"steps": steps})
            else:
                yield _failed(case, "needs δ in both numerics")
        else:
            yield _guard(case, plan.device, lambda case=case: measure(case))


def _resume_part(plan: Plan, cases: list[Case], peak: float, peak_note: str) -> Iterator[list[dict[str, Any]]]:
    import torch

    from qatlaw.stopping import Stopped

    cfg = plan.small
    vocab = int(cfg["data"]["vocab_size"])

    def measure(case: Case) -> list[dict[str, Any]]:
        s = _settings(cfg, case.size, case.precision, case.group, case.numerics, plan.resume_steps)
        execution = _execution(plan, cfg, None, s.steps)
        tokens = _split_walk(vocab, s.tokens + 1, plan.val_windows * s.seq_len + 1, 6)
        with tempfile.TemporaryDirectory(prefix="qatlaw-gpu-") as folder:
            once, stopped = Path(folder) / "uninterrupted", Path(folder) / "resumed"
            reference, ref_metrics = _train(s, execution, vocab, tokens, "walk", once)
            try:
                _train(s, execution, vocab, tokens, "walk", stopped, stop=StopAfter(plan.resume_at))
                raise RuntimeError("train_run did not stop when asked to")
            except Stopped:
                pass
            step = torch.load(stopped / "checkpoint.pt", map_location="cpu", weights_only=False)["step"]
            resumed, metrics = _train(s, execution, vocab, tokens, "walk", stopped)
        if not resumed["resumed"]:
            raise RuntimeError("the second run did not resume from the checkpoint")
        diff = np.abs(ref_metrics["loss"].to_numpy() - metrics["loss"].to_numpy())
        val_diff = abs(resumed["val_loss"] - reference["val_loss"])
        context = {"batch": s.batch_size, "seq_len": s.seq_len, "steps": s.steps}
        return _rows(case, "resume", {"max_abs_loss_diff": float(diff.max()), "val_loss_abs_diff": val_diff,
                                      "bitwise": float(diff.max() == 0 and val_diff == 0), "resume_step": step},
                     context, notes={"max_abs_loss_diff": f"over all {s.steps} steps' training losses"})

    for case in cases:
        yield _guard(case, plan.device, lambda case=case: measure(case))


PartRunner = Callable[[Plan, list[Case], float, str], Iterator[list[dict[str, Any]]]]
PARTS: dict[str, PartRunner] = {"mfu": _mfu_part, "memory": _memory_part, "delta": _delta_part,
                                "resume": _resume_part}
ROW_PREFIX = "ROW "


def gpu_worker(payload: Mapping[str, Any]) -> None:
    """One part of the section in this process (``--gpu-part``): prints each case's rows as JSON lines (prefixed
    :data:`ROW_PREFIX`) as soon as the case ends; train_run's log goes to stderr."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    plan = make_plan(payload["config"], payload["paper_config"], smoke=payload["smoke"], vocab=payload["vocab"],
                     compile=payload["compile"])
    cases = [c for c in plan.cases() if c.part == payload["part"]]
    for rows in PARTS[payload["part"]](plan, cases, payload["peak"], payload["peak_note"]):
        for row in rows:
            print(ROW_PREFIX + json.dumps(row), flush=True)


# ----------------------------------------------------------------------------------------------- in the parent


def _run_worker(payload: Mapping[str, Any], timeout: float) -> tuple[list[dict[str, Any]], str]:
    """Run one part in a worker process for at most ``timeout`` seconds: the rows it reported, and what ended it
    early ("" when it finished). Its log and other output pass through."""
    cmd = [sys.executable, "-m", "qatlaw.bench", "--gpu-part", json.dumps(payload)]
    # its own session, so that a timeout also ends the compile workers it started
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    rows: list[dict[str, Any]] = []
    last: collections.deque[str] = collections.deque(maxlen=1)

    def read_rows() -> None:
        for line in proc.stdout:
            if line.startswith(ROW_PREFIX):
                rows.append(json.loads(line[len(ROW_PREFIX):]))
            else:
                print(line, end="", flush=True)

    def relay_log() -> None:
        for line in proc.stderr:
            print(line, end="", file=sys.stderr, flush=True)
            if line.strip():
                last.append(line.strip())

    readers = [threading.Thread(target=f, daemon=True) for f in (read_rows, relay_log)]
    for reader in readers:
        reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        if proc.poll() is None:  # past its cap, or this process is being stopped (SIGTERM, Ctrl-C): the part ends
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            timed_out = True
        else:
            timed_out = False
    for reader in readers:
        reader.join(timeout=10)
    if timed_out:
        return rows, f"time cap: stopped after {timeout:.0f} s"
    code = proc.returncode
    return rows, "" if code == 0 else f"worker exited with status {code}: {last[0] if last else 'no message'}"[:300]


def source_sha256() -> str:
    """SHA-256 (first 16 hex digits) of the package's .py and .yaml files: names the code of a copy without git."""
    root = Path(qatlaw.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.suffix in (".py", ".yaml") and "__pycache__" not in path.parts:
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def environment(smoke: bool, commit: str | None = None) -> dict[str, str]:
    """The :data:`ENVIRONMENT` columns: mode, device name, torch and CUDA versions, commit, source hash."""
    import torch

    from qatlaw.machine import cpu_model
    from qatlaw.reference import git_commit

    return {"mode": "smoke" if smoke else "gpu", "device": cpu_model() if smoke else torch.cuda.get_device_name(0),
            "torch": torch.__version__, "cuda": torch.version.cuda or "none",
            "commit": commit or git_commit(Path.cwd()), "source_sha256": source_sha256()}


def measure_gpu(config: str | Path, paper_config: str | Path, *, smoke: bool, vocab: int = PAPER_VOCAB,
                compile: bool = False, peak: float | None = None, budget_s: float = BUDGET_S,
                commit: str | None = None, echo: Callable[[str], None] = print,
                save: Callable[[pd.DataFrame], None] | None = None) -> pd.DataFrame:
    """Every part of the section, each in its worker under its cap (see the module docstring); one row per
    measurement, a failed row for each one a part did not report. ``save`` gets the table so far after each part
    (a machine lent for minutes may go before the end). A config that does not load is a ConfigError before any
    work."""
    plan = make_plan(config, paper_config, smoke=smoke, vocab=vocab, compile=compile)
    env = environment(smoke, commit)
    peak_value, peak_note = peak_flops(env["device"], peak)
    payload = {"config": str(config), "paper_config": str(paper_config), "smoke": smoke, "vocab": vocab,
               "compile": compile, "peak": peak_value, "peak_note": peak_note}
    deadline = time.perf_counter() + budget_s
    rows: list[dict[str, Any]] = []
    # SIGTERM (a time limit around the check) stops the running worker too (see _run_worker)
    previous = signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        for part, cap in PART_CAPS.items():
            rows += _part_rows(part, cap, plan, payload, deadline, budget_s, echo)
            table = pd.DataFrame(rows, columns=list(COLUMNS)).astype({k: "Int64" for k in CONTEXT}).assign(**env)
            if save is not None:
                save(table)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return table


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _part_rows(part: str, cap: float, plan: Plan, payload: Mapping[str, Any], deadline: float, budget_s: float,
               echo: Callable[[str], None]) -> list[dict[str, Any]]:
    """A part's rows from its worker, and a failed row for every measurement of its cases it did not report."""
    cases = [c for c in plan.cases() if c.part == part]
    left = deadline - time.perf_counter()
    if min(cap, left) < MIN_PART_S:
        got, error = [], f"not started: {left:.0f} s of the {budget_s:.0f} s budget left"
    else:
        echo(f"gpu {part}: {', '.join(c.name for c in cases)} (at most {min(cap, left):.0f} s)")
        got, error = _run_worker({**payload, "part": part}, min(cap, left))
    reported = {(r["case"], r["check"], r["metric"]) for r in got}
    return got + [r for case in cases for r in _failed(case, error or "the worker did not report it")
                  if (r["case"], r["check"], r["metric"]) not in reported]


def gpu_markdown(table: pd.DataFrame) -> str:
    """A short report: the environment, then one line per headline measurement (note, or error if it failed)."""
    from qatlaw.bench.report import markdown

    env = table.iloc[0]
    head = (f"GPU check ({env['mode']}) on {env['device']}: torch {env['torch']}, CUDA {env['cuda']}, commit "
            f"{env['commit']} (source {env['source_sha256']})")
    shown = table[[m in HEADLINE[c] for c, m in zip(table["check"], table["metric"])]]
    lines = pd.DataFrame({
        "check": shown["check"], "case": shown["case"],
        "micro-batch": [("" if pd.isna(m) else int(m)) for m in shown["micro_batch"]],
        "metric": shown["metric"], "value": shown["value"], "unit": shown["unit"], "status": shown["status"],
        "note": [e or n for e, n in zip(shown["error"], shown["note"])],
    })
    return f"{head}\n\n{markdown(lines)}"
