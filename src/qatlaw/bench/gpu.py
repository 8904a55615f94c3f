"""The ``gpu`` section: a check of the path a paper run takes on GPUs that fits in 8 minutes on one GPU.

``python -m qatlaw.bench --sections gpu`` (``make gpu-check``) runs five parts, each in a worker process of its own
(a ``torchrun`` of every GPU for ``ddp``) under a time cap, so that a part that runs out of memory, hangs or
crashes becomes failed rows with its error while the others still run. Each cap is the part's share of
``--gpu-budget`` (:data:`BUDGET_S`, 450 s: with the start of the check, at most 8 minutes) in :data:`PART_SHARES`:
mfu 0.48, ddp 0.14, memory 0.12, delta 0.16, resume 0.10, the shares of the parts that run taken to sum to one
(on fewer than 2 GPUs, where ddp does not run, mfu gets 0.56 of the budget, 251 s by default; a larger budget gives
every part proportionally more). Every training goes through :func:`qatlaw.train.train_run`, the train rule's
code (micro-batches, chunked loss, autocast, fused AdamW on CUDA, torch.compile, DDP under torchrun, its final
evaluation, checkpoints), on generated tokens that it reads, as the train rule does, from token stores on disk:
written by the data stage's writer (:func:`qatlaw.tokens.write_tokens`) into the case's temporary folder and
opened with :func:`qatlaw.tokens.open_tokens` against their data manifest (:func:`write_store`). The checks:

``mfu``
    74M and 145M (shapes and batch from the models table; seq_len, numerics and loss chunk from config/paper.yaml),
    BF16 and W4A4 G = 32, one rank of a paper run: its per-GPU batch (config/paper.yaml's GPUs per run) at the
    micro-batch and activation checkpointing of the memory model (:func:`qatlaw.memory.plan_run`), on
    uniform random tokens of the paper's vocabulary (``--vocab``, :data:`PAPER_VOCAB`); each eager, then each
    compiled (``compiled``; as the paper grid trains; ``--gpu-eager-only`` leaves these out): ``warmup`` steps (they
    take the compile), then ``timed`` steps whose wall times (train_run's per-step metrics; their mean) give
    ``tokens_per_s`` and ``step_s``. ``mfu`` = 6·(N + V·h)·tokens/s / the peak bf16 FLOP/s of the device,
    ``mfu_attention`` with the attention products 12·L·h·T per token added (the convention of the CPU ``train``
    section); the peak is ``--peak-flops`` or :data:`PEAK_BF16_FLOPS` by device name, and ``note`` says which.
    Also the run's ``max_allocated_gib``, ``device_used_gib`` (below) and the memory model's ``predicted_gib`` at
    that micro-batch.
``ddp``
    74M W4A4 G = 32 as in ``mfu``, compiled (eager with ``--gpu-eager-only``), data-parallel over every GPU torch
    sees (``ranks``): ``torchrun --standalone --nproc-per-node=ranks`` of the worker, train_run in each rank with
    the per-GPU batch of ``mfu`` (``batch`` is that of all ranks), rank 0 reporting. ``tokens_per_s`` is that of
    all ranks, ``mfu`` per GPU, memory that of rank 0 (``predicted_gib`` with NCCL's allowance). Skipped rows, with
    the reason, on fewer than 2 GPUs and in the smoke mode.
``memory``
    973M, BF16 and W4A4 G = channel (LAC: the largest predicted peak of its runs), each at the micro-batch the memory
    model chose for it (with its GPUs per run), eager: two optimizer steps of two micro-batches (a rank's memory does
    not grow with more micro-batches: the gradients and AdamW moments exist from the first step on).
    ``max_allocated_gib`` and ``max_reserved_gib`` (torch.cuda, over the whole run: training and the final
    evaluation) against :func:`qatlaw.memory.peak_bytes` of one process (``predicted_gib``); ``ratio_allocated`` and
    ``ratio_reserved`` divide by the prediction less its CUDA context, which torch does not count. Beside them
    ``device_used_gib``: the most memory in use on the device while the run trains and evaluates (total − free of
    torch.cuda.mem_get_info, sampled every :data:`SAMPLE_S`: what nvidia-smi shows, the CUDA context, libraries'
    workspaces and NCCL's buffers included, and any other process on the device), and ``ratio_device``, it over the
    whole prediction. Not measured on a CPU (skipped rows).
``eval``
    The final evaluation of those runs, :func:`qatlaw.train.evaluate` scoring the training micro-batch of windows per
    forward as every run does, over ``eval_windows`` windows: its ``val_loss`` (about ln V on random tokens) is there
    only if it did not run out of memory.
``delta`` and ``numerics_effect``
    δ = val_loss(W4A4 G = 32) − val_loss(BF16) (``delta_val_loss``; ``delta_loss`` the same of the smoothed training
    loss) at 6M with config.yaml's recipe (seq_len 128, batch 32, its learning rate), ``delta_steps`` (300) steps on
    a generated learnable stream (:func:`walk_tokens`) and ``val_windows`` (512) held-out windows of it, once in fp32
    and once under bf16 autocast, same seed and batches; ``numerics_effect`` is δ(bf16) − δ(fp32). Eager.
``resume``
    W4A4 G = 32 at that size in the paper's numerics, eager: ``resume_steps`` (40) steps uninterrupted, twice, and
    the same run stopped after ``resume_step`` (20) steps (train_run's stop request: it writes its checkpoint and
    raises Stopped), then run again, resuming. ``max_abs_loss_diff`` over every step's training loss and
    ``val_loss_abs_diff`` compare the resumed run with the first uninterrupted one, ``bitwise`` is 1 when they are
    all equal; GPU kernels need not be deterministic (attention's backward is not), so ``noise_max_abs_loss_diff``
    and ``noise_val_loss_abs_diff`` compare the two uninterrupted runs: the noise floor. ``within_noise`` is 1 when
    each difference of the resumed run is at most max(:data:`NOISE_FACTOR` × its noise floor, :data:`NOISE_EPS`)
    (:func:`within_noise`): a resume that loses state differs by more than two runs that did not stop.

One row per measurement (:data:`COLUMNS`): the ``check``, its ``case`` (size, precision, group, numerics, eager or
compiled), the case's ``compiled`` (torch.compile or eager) and ``ranks`` (processes; for a skipped ddp case the
GPUs torch sees), the run's ``micro_batch``, ``batch``, ``seq_len`` and ``steps``, the ``metric``, its ``value``
and ``unit``, the ``status`` (ok; skipped: not measurable here; failed: see ``error``), the case's wall ``seconds``
and a ``note``; and the environment: ``mode`` (gpu or smoke), ``device``, ``torch``, ``cuda``, ``commit`` and
``source_sha256`` (of the package's files, for a copy without git). ``gpu.md`` is a short Markdown table of the
headline metrics.

``--smoke`` (automatic when torch sees no CUDA GPU, unless ``--require-cuda``) runs the same code on the CPU with
config.yaml's smallest sizes (mfu at 0.03M only), seq_len 32 and a few steps, eager and compiled, so that the
check cannot rot before a GPU comes (tests/test_bench.py): about 25 s on 2 cores with inductor's cache warm, about
a minute on a first run, which compiles its C++ kernels.
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
from qatlaw import launch
from qatlaw.bench.train import flops_per_token
from qatlaw.grid import RunSettings, run_settings, variant_name

if TYPE_CHECKING:
    from qatlaw.tokens import TokenStore
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
DDP_VARIANT = ("W4A4", 32)  # at the first of the mfu sizes
MEMORY_VARIANTS = (("BF16", None), ("W4A4", "channel"))
# each part's share of the budget, in the order the parts run: compiling the four mfu cases takes most of it
PART_SHARES = {"mfu": 0.48, "ddp": 0.14, "memory": 0.12, "delta": 0.16, "resume": 0.10}
BUDGET_S = 450.0  # with the parent's start and end, at most 8 minutes
MIN_PART_S = 10.0  # a part with less time left is not started
STOP_GRACE_S = 15.0  # a worker past its cap has this long after SIGTERM (torchrun ends its ranks) before SIGKILL
SAMPLE_S = 0.05  # how often device_used_gib reads torch.cuda.mem_get_info
# the resume is within noise when each of its differences is at most max(NOISE_FACTOR x the two uninterrupted runs'
# difference, NOISE_EPS): the larger of two samples of the same noise is rarely 4 times the other, a resume that
# loses state (optimizer moments, the learning-rate step, the batch order) differs by far more
NOISE_FACTOR = 4.0
NOISE_EPS = 1e-6
# smoke mode: config.yaml's CPU sizes in place of the paper's, the same code on the CPU in seconds (one mfu size:
# compiling on the CPU takes 2-15 s a case)
SMOKE_SIZES = {"mfu": ("0.03M",), "memory": "0.1M", "small": "0.03M"}
SMOKE_SMALL = {"seq_len": 32, "batch_size": 8}
SMOKE_TRAINING = {**SMOKE_SMALL, "micro_batch_size": 4, "loss_chunk_tokens": 64, "numerics": "bf16"}
GIB = 2**30
DEVICE_NOTE = "the most in use on the device (total − free, torch.cuda.mem_get_info): CUDA context, NCCL included"

_MFU = {"mfu": "fraction of peak", "mfu_attention": "fraction of peak", "tokens_per_s": "tokens/s", "step_s": "s",
        "max_allocated_gib": "GiB", "device_used_gib": "GiB", "predicted_gib": "GiB"}
METRICS: dict[str, dict[str, str]] = {  # check -> metric -> unit, in report order
    "mfu": _MFU,
    "ddp": _MFU,
    "memory": {"max_allocated_gib": "GiB", "max_reserved_gib": "GiB", "device_used_gib": "GiB", "predicted_gib": "GiB",
               "ratio_allocated": "measured / predicted", "ratio_reserved": "measured / predicted",
               "ratio_device": "measured / predicted"},
    "eval": {"val_loss": "nats", "eval_windows": "windows"},
    "delta": {"delta_val_loss": "nats", "delta_loss": "nats", "val_loss_BF16": "nats", "val_loss_W4A4": "nats"},
    "numerics_effect": {"delta_bf16_minus_fp32": "nats"},
    "resume": {"max_abs_loss_diff": "nats", "val_loss_abs_diff": "nats", "noise_max_abs_loss_diff": "nats",
               "noise_val_loss_abs_diff": "nats", "within_noise": "1 = yes", "bitwise": "1 = equal",
               "resume_step": "step"},
}
HEADLINE = {"mfu": ("mfu", "tokens_per_s"), "ddp": ("mfu", "tokens_per_s", "device_used_gib"),
            "memory": ("max_allocated_gib", "device_used_gib", "predicted_gib", "ratio_allocated"),
            "eval": ("val_loss",), "delta": ("delta_val_loss",), "numerics_effect": ("delta_bf16_minus_fp32",),
            "resume": ("max_abs_loss_diff", "noise_max_abs_loss_diff", "within_noise")}
CONTEXT = ("micro_batch", "batch", "seq_len", "steps")
COLUMNS = ("check", "case", "size", "precision", "group", "numerics", "compiled", "ranks", *CONTEXT, "metric",
           "value", "unit", "status", "error", "seconds", "note")
ENVIRONMENT = ("mode", "device", "torch", "cuda", "commit", "source_sha256")

log = logging.getLogger("qatlaw.bench.gpu")


@dataclass(frozen=True)
class Case:
    """One trained configuration of a part and the checks measured on it: eager or compiled, in one process or
    data-parallel over ``ranks``."""

    part: str
    checks: tuple[str, ...]
    size: str
    precision: str
    group: int | str | None
    numerics: str
    compiled: bool = False
    ranks: int = 1

    @property
    def name(self) -> str:
        return (f"{self.size} {variant_name(self.precision, self.group)} {self.numerics} "
                f"{'compiled' if self.compiled else 'eager'}")


@dataclass(frozen=True)
class Plan:
    """What the section trains: ``paper`` is the config of the mfu, ddp and memory parts, ``small`` that of delta
    and resume (config.yaml's recipe), on ``device``, with the steps of each part; ``compile``: mfu also compiled,
    ddp compiled; ``gpus``: those torch sees (0 in the smoke mode)."""

    smoke: bool
    paper: dict
    small: dict
    device: str
    compile: bool
    gpus: int
    mfu_sizes: tuple[str, ...]
    memory_size: str
    small_size: str
    warmup: int
    timed: int
    delta_steps: int
    val_windows: int
    resume_steps: int
    resume_at: int

    @property
    def ddp_skipped(self) -> str:
        """Why the ddp part does not run here ("" when it does)."""
        if self.gpus >= 2:
            return ""
        return "DDP needs 2 or more GPUs: the smoke mode runs on the CPU" if self.smoke else \
            f"DDP needs 2 or more GPUs; torch sees {self.gpus}"

    def cases(self) -> list[Case]:
        """Every case, part by part in :data:`PART_SHARES` order."""
        numerics = self.paper["training"]["numerics"]
        modes = (False, True) if self.compile else (False,)
        out = [Case("mfu", ("mfu",), size, p, g, numerics, compiled) for compiled in modes
               for size in self.mfu_sizes for p, g in MFU_VARIANTS]
        out.append(Case("ddp", ("ddp",), self.mfu_sizes[0], *DDP_VARIANT, numerics, self.compile, self.gpus))
        out += [Case("memory", ("memory", "eval"), self.memory_size, p, g, numerics) for p, g in MEMORY_VARIANTS]
        out += [Case("delta", ("delta",), self.small_size, "W4A4", 32, n) for n in ("fp32", "bf16")]
        out.append(Case("delta", ("numerics_effect",), self.small_size, "W4A4", 32, "bf16-fp32"))
        out.append(Case("resume", ("resume",), self.small_size, "W4A4", 32, numerics))
        return out


def make_plan(config: str | Path, paper_config: str | Path, *, smoke: bool, vocab: int = PAPER_VOCAB,
              compile: bool = True, gpus: int = 0) -> Plan:
    """The section's plan from config.yaml and the paper overlay (smoke: config.yaml alone, tiny shapes) for a
    machine of ``gpus`` GPUs; a ConfigError in one line when a config does not load."""
    from qatlaw.config import load
    from qatlaw.builtin_sources import BUILTIN_SOURCES

    if smoke:
        small, paper = load(config, {"training": SMOKE_SMALL}), load(config, {"training": SMOKE_TRAINING})
        return Plan(True, paper, small, "cpu", compile, gpus, SMOKE_SIZES["mfu"], SMOKE_SIZES["memory"],
                    SMOKE_SIZES["small"], warmup=1, timed=2, delta_steps=6, val_windows=32, resume_steps=6,
                    resume_at=3)
    small = load(config)
    # the section reads no corpus: a built-in source name stands in for the paper's OLMo-mix directory, --vocab for
    # its tokenizer file
    stand_in = {"data": {"sources": [next(iter(BUILTIN_SOURCES))], "tokenizer": None, "vocab_size": vocab}}
    paper = load(config, paper_config, stand_in)
    return Plan(False, paper, small, "cuda", compile, gpus, MFU_SIZES, MEMORY_SIZE, SMALL_SIZE, warmup=2, timed=3,
                delta_steps=300, val_windows=512, resume_steps=40, resume_at=20)


def part_caps(plan: Plan, budget_s: float) -> dict[str, float]:
    """Each part's time cap in seconds, in the order they run: its share of the budget (:data:`PART_SHARES`), the
    shares of the parts that run taken to sum to one (ddp does not run on fewer than 2 GPUs)."""
    parts = [p for p in PART_SHARES if p != "ddp" or not plan.ddp_skipped]
    total = sum(PART_SHARES[p] for p in parts)
    return {p: budget_s * PART_SHARES[p] / total for p in parts}


def within_noise(diffs: tuple[float, ...], noise: tuple[float, ...]) -> bool:
    """Whether each difference of a resumed run is at most max(:data:`NOISE_FACTOR` × its noise floor,
    :data:`NOISE_EPS`)."""
    return all(d <= max(NOISE_FACTOR * n, NOISE_EPS) for d, n in zip(diffs, noise, strict=True))


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


@dataclass(frozen=True)
class Store:
    """Token stores on disk, open for reading, and their data manifest: what the train rule trains from."""

    train: TokenStore
    val: TokenStore
    manifest: dict[str, Any]


def write_store(folder: Path, vocab: int, train: np.ndarray, val: np.ndarray) -> Store:
    """Write the two splits as ``train.npy`` and ``val.npy`` in ``folder`` with the data stage's writer, with a
    manifest as the data stage's (vocabulary, id type, each split's count and checksum), and open them as the train
    rule does: checked against it."""
    from qatlaw.tokens import open_tokens, token_dtype, write_tokens

    splits = {name: write_tokens(ids, folder / f"{name}.npy", vocab) for name, ids in (("train", train), ("val", val))}
    digest = hashlib.sha256("".join(split["sha256"] for split in splits.values()).encode()).hexdigest()
    manifest = {"vocab_size": vocab, "token_dtype": token_dtype(vocab).name, "splits": splits,
                "corpus_sha256": digest, "tokenizer_sha256": digest}
    return Store(open_tokens(folder / "train.npy", manifest, "train"), open_tokens(folder / "val.npy", manifest, "val"),
                 manifest)


def _row(case: Case, check: str, metric: str, value: float, context: Mapping[str, int] | None = None, *,
         status: str = "ok", error: str = "", note: str = "") -> dict[str, Any]:
    return {"check": check, "case": case.name, "size": case.size, "precision": case.precision,
            "group": "none" if case.group is None else str(case.group), "numerics": case.numerics,
            "compiled": case.compiled, "ranks": case.ranks, **{k: (context or {}).get(k) for k in CONTEXT},
            "metric": metric, "value": float(value), "unit": METRICS[check][metric], "status": status, "error": error,
            "seconds": float("nan"), "note": note}


def _failed(case: Case, error: str) -> list[dict[str, Any]]:
    return [_row(case, check, metric, float("nan"), status="failed", error=error)
            for check in case.checks for metric in METRICS[check]]


def _skipped(case: Case, reason: str) -> list[dict[str, Any]]:
    return [_row(case, check, metric, float("nan"), status="skipped", note=reason)
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


class DeviceUse:
    """The most memory in use on this process's CUDA device while the block runs, in GiB (``peak``): total − free of
    torch.cuda.mem_get_info (what nvidia-smi shows: every process's memory on the device, the CUDA context and
    NCCL's buffers included), read on entry, every :data:`SAMPLE_S` and on exit; NaN on a CPU."""

    def __init__(self, device: str):
        self.device = device
        self.peak = float("nan")
        self._index = 0
        self._done = threading.Event()
        self._poller = threading.Thread(target=self._poll, daemon=True)

    def _sample(self) -> None:
        import torch

        free, total = torch.cuda.mem_get_info(self._index)  # by index: a thread's current device is its own
        self.peak = max(self.peak, (total - free) / GIB)

    def _poll(self) -> None:
        while not self._done.wait(SAMPLE_S):
            self._sample()

    def __enter__(self) -> DeviceUse:
        if self.device == "cuda":
            import torch

            self._index, self.peak = torch.cuda.current_device(), 0.0
            self._sample()
            self._poller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._poller.is_alive():
            self._done.set()
            self._poller.join()
            self._sample()


def _settings(cfg: Mapping[str, Any], size: str, precision: str, group: int | str | None, numerics: str,
              steps: int) -> RunSettings:
    """The grid's settings of a run of ``steps`` optimizer steps in ``numerics`` (seed 0)."""
    s = run_settings(cfg, size, 1, precision, group, 0)
    return dataclasses.replace(s, tokens=steps * s.tokens_per_step, numerics=numerics)


def _execution(plan: Plan, cfg: Mapping[str, Any], micro_batch: int | None, steps: int, *, compiled: bool = False,
               checkpointing: bool = False) -> Execution:
    """How the section's runs execute: the config's threads and loss chunk, the plan's device, eager or compiled,
    the memory model's activation checkpointing, no checkpoint but the ones asked for."""
    from qatlaw.train import Execution

    training = cfg["training"]
    return Execution(threads=training["threads"], checkpoint_every=steps + 1, checkpoint_minutes=math.inf,
                     compile=compiled, device=plan.device, micro_batch_size=micro_batch,
                     loss_chunk_tokens=training["loss_chunk_tokens"], activation_checkpointing=checkpointing)


def _train(s: RunSettings, execution: Execution, store: Store, folder: Path,
           stop: StopAfter | None = None) -> tuple[dict[str, Any], pd.DataFrame | None]:
    """One :func:`qatlaw.train.train_run` from the token stores into ``folder``: its summary, and its per-step
    metrics on the rank that writes them (None on the others)."""
    from qatlaw.train import Parallel, train_run

    summary = train_run(s, train_tokens=store.train, val_tokens=store.val, manifest=store.manifest,
                        summary_path=folder / "summary.parquet", metrics_path=folder / "metrics.parquet",
                        model_path=folder / "model.pt", checkpoint_path=folder / "checkpoint.pt",
                        execution=execution, stop=stop)
    return summary, pd.read_parquet(folder / "metrics.parquet") if Parallel.from_env().is_main else None


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
    """The mfu and ddp parts: one rank of a paper run, or ``case.ranks`` of them under torchrun (only rank 0 has
    rows)."""
    from qatlaw.grid import run_gpus
    from qatlaw.memory import peak_bytes, plan_run
    from qatlaw.model import non_embedding_params
    from qatlaw.train import Parallel, model_config

    cfg, steps = plan.paper, plan.warmup + plan.timed
    training, vocab = cfg["training"], int(cfg["data"]["vocab_size"])
    par = Parallel.from_env()

    def measure(case: Case) -> list[dict[str, Any]]:
        if par.world != case.ranks:
            raise RuntimeError(f"{case.ranks} ranks planned, {par.world} running")
        s = _settings(cfg, case.size, case.precision, case.group, case.numerics, steps)
        run = plan_run(s, vocab, training)  # the workflow's, for the paper's GPUs per run
        micro, ranks = run.micro_batch, case.ranks
        per_gpu = s.batch_size // max(1, run_gpus(training, s.size))
        s = dataclasses.replace(s, batch_size=per_gpu * ranks, eval_tokens=ranks * micro * s.seq_len)
        s = dataclasses.replace(s, tokens=steps * s.tokens_per_step)
        execution = _execution(plan, cfg, micro, s.steps, compiled=case.compiled, checkpointing=run.checkpointing)
        with tempfile.TemporaryDirectory(prefix="qatlaw-gpu-") as folder:
            store = write_store(Path(folder), vocab, uniform_tokens(vocab, s.tokens + 1, 1),
                                uniform_tokens(vocab, s.eval_tokens + 1, 2))
            with DeviceUse(plan.device) as used:
                _, metrics = _train(s, execution, store, Path(folder))
        if metrics is None:  # another rank than 0: rank 0 reports
            return []
        allocated, _ = _peaks(plan.device)
        step_s = float((s.tokens_per_step / metrics["tokens_per_s"].iloc[plan.warmup:]).mean())
        mc = model_config(s, vocab)
        n_params = non_embedding_params(mc)
        tokens_per_s = s.tokens_per_step / step_s
        per_gpu_peak = tokens_per_s / ranks / peak
        values = {
            "mfu": flops_per_token(mc.n_layers, mc.hidden, vocab, 0, n_params) * per_gpu_peak,
            "mfu_attention": flops_per_token(mc.n_layers, mc.hidden, vocab, mc.seq_len, n_params) * per_gpu_peak,
            "tokens_per_s": tokens_per_s, "step_s": step_s, "max_allocated_gib": allocated,
            "device_used_gib": used.peak,
            "predicted_gib": peak_bytes(s, vocab, micro, ranks, training["loss_chunk_tokens"], run.checkpointing) / GIB,
        }
        skipped = {"mfu": peak_note, "mfu_attention": peak_note} if not math.isfinite(peak) else {}
        if plan.device != "cuda":
            skipped |= {"max_allocated_gib": "no CUDA", "device_used_gib": "no CUDA"}
        rank0 = f"; rank 0 of {ranks}" if ranks > 1 else ""
        context = {"micro_batch": micro, "batch": s.batch_size, "seq_len": s.seq_len, "steps": plan.timed}
        return _rows(case, case.checks[0], values, context, skipped=skipped,
                     notes={"mfu": peak_note + (" per GPU" if ranks > 1 else ""),
                            "tokens_per_s": f"mean of {plan.timed} steps after {plan.warmup}"
                                            + (f", all {ranks} ranks" if ranks > 1 else ""),
                            "max_allocated_gib": f"training and its final evaluation{rank0}",
                            "device_used_gib": DEVICE_NOTE + rank0})

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
        with tempfile.TemporaryDirectory(prefix="qatlaw-gpu-") as folder:
            store = write_store(Path(folder), vocab, uniform_tokens(vocab, s.tokens + 1, 3),
                                uniform_tokens(vocab, windows * s.seq_len + 1, 4))
            with DeviceUse(plan.device) as used:
                summary, _ = _train(s, _execution(plan, cfg, micro, s.steps, checkpointing=run.checkpointing), store,
                                    Path(folder))
        allocated, reserved = _peaks(plan.device)
        predicted = peak_bytes(s, vocab, micro, 1, training["loss_chunk_tokens"], run.checkpointing)  # one process
        tensors = (predicted - CUDA_CONTEXT_BYTES) / GIB  # what torch's allocator can see of the prediction
        memory = {"max_allocated_gib": allocated, "max_reserved_gib": reserved, "device_used_gib": used.peak,
                  "predicted_gib": predicted / GIB, "ratio_allocated": allocated / tensors,
                  "ratio_reserved": reserved / tensors, "ratio_device": used.peak * GIB / predicted}
        context = {"micro_batch": micro, "batch": s.batch_size, "seq_len": s.seq_len, "steps": steps}
        no_cuda = {k: "no CUDA" for k in memory if k != "predicted_gib"} if plan.device != "cuda" else {}
        forwards = math.ceil(training["eval_tokens"] / s.seq_len / micro)
        return [*_rows(case, "memory", memory, context, skipped=no_cuda,
                       notes={"max_allocated_gib": "training and its final evaluation", "device_used_gib": DEVICE_NOTE,
                              "ratio_device": "over the whole prediction, CUDA context included"}),
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
        s = _settings(cfg, case.size, case.precision, case.group, case.numerics, steps)
        with tempfile.TemporaryDirectory(prefix="qatlaw-gpu-") as folder:
            store = write_store(Path(folder), vocab, *_split_walk(vocab, steps * s.tokens_per_step + 1,
                                                                  plan.val_windows * s.seq_len + 1, 5))
            for precision, group in (("BF16", None), (case.precision, case.group)):
                s = _settings(cfg, case.size, precision, group, case.numerics, steps)
                runs[precision], _ = _train(s, _execution(plan, cfg, None, steps), store, Path(folder) / precision)
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
        with tempfile.TemporaryDirectory(prefix="qatlaw-gpu-") as tmp:
            folder = Path(tmp)
            store = write_store(folder, vocab, *_split_walk(vocab, s.tokens + 1, plan.val_windows * s.seq_len + 1, 6))
            runs = [_train(s, execution, store, folder / name) for name in ("uninterrupted", "again")]
            try:
                _train(s, execution, store, folder / "resumed", stop=StopAfter(plan.resume_at))
                raise RuntimeError("train_run did not stop when asked to")
            except Stopped:
                pass
            step = torch.load(folder / "resumed" / "checkpoint.pt", map_location="cpu", weights_only=False)["step"]
            resumed = _train(s, execution, store, folder / "resumed")
        if not resumed[0]["resumed"]:
            raise RuntimeError("the second run did not resume from the checkpoint")
        (reference, ref_metrics), (again, again_metrics) = runs

        def differences(summary: Mapping[str, Any], metrics: pd.DataFrame) -> tuple[float, float]:
            """Largest step loss difference from the first uninterrupted run, and that of the validation loss."""
            loss = np.abs(ref_metrics["loss"].to_numpy() - metrics["loss"].to_numpy())
            return float(loss.max()), abs(summary["val_loss"] - reference["val_loss"])

        diff, noise = differences(*resumed), differences(again, again_metrics)
        context = {"batch": s.batch_size, "seq_len": s.seq_len, "steps": s.steps}
        values = {"max_abs_loss_diff": diff[0], "val_loss_abs_diff": diff[1], "noise_max_abs_loss_diff": noise[0],
                  "noise_val_loss_abs_diff": noise[1], "within_noise": float(within_noise(diff, noise)),
                  "bitwise": float(max(diff) == 0), "resume_step": step}
        return _rows(case, "resume", values, context, notes={
            "max_abs_loss_diff": f"resumed vs uninterrupted, over all {s.steps} steps' training losses",
            "noise_max_abs_loss_diff": "uninterrupted vs uninterrupted: the noise floor",
            "within_noise": f"each resumed difference ≤ max({NOISE_FACTOR:g} × its noise floor, {NOISE_EPS:g})"})

    for case in cases:
        yield _guard(case, plan.device, lambda case=case: measure(case))


PartRunner = Callable[[Plan, list[Case], float, str], Iterator[list[dict[str, Any]]]]
PARTS: dict[str, PartRunner] = {"mfu": _mfu_part, "ddp": _mfu_part, "memory": _memory_part, "delta": _delta_part,
                                "resume": _resume_part}
ROW_PREFIX = "ROW "


def gpu_worker(payload: Mapping[str, Any]) -> None:
    """One part of the section in this process (``--gpu-part``), or in each rank of a torchrun: rank 0 prints each
    case's rows as JSON lines (prefixed :data:`ROW_PREFIX`) as soon as the case ends; train_run's log goes to
    stderr."""
    from qatlaw.train import Parallel

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    plan = make_plan(payload["config"], payload["paper_config"], smoke=payload["smoke"], vocab=payload["vocab"],
                     compile=payload["compile"], gpus=payload["gpus"])
    par = Parallel.from_env()
    if plan.device == "cuda":
        import torch

        torch.cuda.set_device(par.local_rank)  # before any CUDA call: each rank's context on its own GPU only
    cases = [c for c in plan.cases() if c.part == payload["part"]]
    for rows in PARTS[payload["part"]](plan, cases, payload["peak"], payload["peak_note"]):
        for row in rows if par.is_main else []:
            print(ROW_PREFIX + json.dumps(row), flush=True)


# ----------------------------------------------------------------------------------------------- in the parent


def _stop(proc: subprocess.Popen) -> None:
    """End a worker and what it started: SIGTERM to its process group (torchrun passes it on to its ranks, each in a
    session of its own, and waits for them), SIGKILL after :data:`STOP_GRACE_S`."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _run_worker(payload: Mapping[str, Any], timeout: float, ranks: int = 1) -> tuple[list[dict[str, Any]], str]:
    """Run one part in a worker process, or under torchrun as ``ranks`` processes (``ranks`` > 1), for at most
    ``timeout`` seconds: the rows it reported, and what ended it early ("" when it finished). Its log and other
    output pass through."""
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc-per-node={ranks}"]
    cmd = [*launcher, "-m", "qatlaw.bench", "--gpu-part", json.dumps(payload)]
    # its own session, so that a timeout also ends the compile workers it started
    # under torchrun the ranks share the machine's CPUs as a training job's do (qatlaw.launch.worker_env)
    env = None if ranks == 1 else launch.worker_env(launch.node_cpus(os.cpu_count() or 1), ranks)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=env)
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
            _stop(proc)
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


def worker_payload(plan: Plan, config: str | Path, paper_config: str | Path, peak: float,
                   peak_note: str) -> dict[str, Any]:
    """What a worker needs to make the same plan and run a part of it (add ``part``)."""
    return {"config": str(config), "paper_config": str(paper_config), "smoke": plan.smoke,
            "vocab": int(plan.paper["data"]["vocab_size"]), "compile": plan.compile, "gpus": plan.gpus,
            "peak": peak, "peak_note": peak_note}


def measure_gpu(config: str | Path, paper_config: str | Path, *, smoke: bool, vocab: int = PAPER_VOCAB,
                compile: bool = True, peak: float | None = None, budget_s: float = BUDGET_S,
                commit: str | None = None, echo: Callable[[str], None] = print,
                save: Callable[[pd.DataFrame], None] | None = None) -> pd.DataFrame:
    """Every part of the section, each in its worker under its cap (see the module docstring), mfu also compiled
    unless not ``compile``, ddp on every GPU torch sees; one row per measurement, a failed row for each one a part
    did not report. ``save`` gets the table so far after each part (a machine lent for minutes may go before the
    end). A config that does not load is a ConfigError before any work."""
    import torch

    plan = make_plan(config, paper_config, smoke=smoke, vocab=vocab, compile=compile,
                     gpus=0 if smoke else torch.cuda.device_count())
    env = environment(smoke, commit)
    payload = worker_payload(plan, config, paper_config, *peak_flops(env["device"], peak))
    caps = part_caps(plan, budget_s)
    deadline = time.perf_counter() + budget_s
    rows: list[dict[str, Any]] = []
    # SIGTERM (a time limit around the check) stops the running worker too (see _run_worker)
    previous = signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        for part in PART_SHARES:
            if part in caps:
                rows += _part_rows(part, caps[part], plan, payload, deadline, budget_s, echo)
            else:  # ddp on fewer than 2 GPUs
                rows += [r for case in plan.cases() if case.part == part for r in _skipped(case, plan.ddp_skipped)]
            table = (pd.DataFrame(rows, columns=list(COLUMNS)).astype({k: "Int64" for k in ("ranks", *CONTEXT)})
                     .assign(**env))
            if save is not None:
                save(table)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return table


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _part_rows(part: str, cap: float, plan: Plan, payload: Mapping[str, Any], deadline: float, budget_s: float,
               echo: Callable[[str], None]) -> list[dict[str, Any]]:
    """A part's rows from its worker (a torchrun of all GPUs for ddp), and a failed row for every measurement of its
    cases it did not report."""
    cases = [c for c in plan.cases() if c.part == part]
    ranks = plan.gpus if part == "ddp" else 1
    left = deadline - time.perf_counter()
    if min(cap, left) < MIN_PART_S:
        got, error = [], f"not started: {left:.0f} s of the {budget_s:.0f} s budget left"
    else:
        where = f" on {ranks} ranks" if ranks > 1 else ""
        echo(f"gpu {part}: {', '.join(c.name for c in cases)}{where} (at most {min(cap, left):.0f} s)")
        got, error = _run_worker({**payload, "part": part}, min(cap, left), ranks)
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
        "check": shown["check"], "case": shown["case"], "ranks": shown["ranks"],
        "micro-batch": [("" if pd.isna(m) else int(m)) for m in shown["micro_batch"]],
        "metric": shown["metric"], "value": shown["value"], "unit": shown["unit"], "status": shown["status"],
        "note": [e or n for e, n in zip(shown["error"], shown["note"])],
    })
    return f"{head}\n\n{markdown(lines)}"
