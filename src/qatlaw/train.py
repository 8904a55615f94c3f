"""One training run per grid cell: QAT (or the BF16 baseline) from scratch or from the baseline's trunk,
resumable, with metrics; and post-training quantization of a baseline.

Paired design: every run of a (size, tokens, seed) cell starts from the same initial weights (the model is
built right after ``torch.manual_seed(seed)``, and quantizer parameters are constant-initialized) and sees the
same batches in the same order (batch ``s`` is a pure function of ``seed`` and ``s``), so
δ = loss(QAT) − loss(BF16) measures quantization, not seed noise.

Recipe (paper §4.1, App. F): AdamW β = (beta1, beta2), weight decay on the matrices of the linear layers only
(not on norms, embeddings or LAC γ), gradient-norm clipping, linear warm-up then cosine decay to
``min_lr_ratio`` × peak. ``numerics`` (part of the run's identity) is fp32, or bf16 autocast on CPU or CUDA (the
"BF16" precision name is the paper's: the baseline without fake quantization, in the run's numerics). The
reported ``loss`` is the bias-corrected EMA of the training loss (the paper's "smoothed training loss");
``val_loss`` is the mean loss on the first ``eval_tokens`` held-out tokens, scored with the
exponential moving average of the weights when ``weight_ema`` > 0 (else with the final weights, which
``val_loss_last`` always scores).

How a run executes (:class:`Execution`: device, threads, micro-batching, the loss's token chunks, activation
checkpointing, ``torch.compile``, checkpoint intervals) is not part of its identity: changing it neither retrains
finished runs nor invalidates checkpoints; the device never changes the numerics. On CUDA AdamW is fused (and bf16
runs use TF32 for what stays fp32); launched by ``torchrun`` with several processes, one run is trained data-parallel
(each rank reads only its equal share of every batch, one step ahead, and scores its share of the validation
windows; rank 0 writes). A checkpoint is written every ``checkpoint_every`` steps and every ``checkpoint_minutes``
of wall time, durably, keeping the one before it; on SIGTERM or SIGUSR1 (:mod:`qatlaw.stopping`) the run ends its
step, writes one, leaves its stop marker and stops.

The FP→QAT split (:attr:`~qatlaw.grid.RunSettings.qat_fraction` f, "fused": QAT takes over the LR schedule's
cooldown). A BF16 baseline whose cell has branches keeps a trunk checkpoint at each branch step K (model, AdamW
state and weight average by parameter name, loss EMA, per-step rows; the data position is the step), staged beside
its resumable checkpoint while it trains and published as an output at the end. A branch (0 < f < 1) starts from
its trunk at step K = :attr:`~qatlaw.grid.RunSettings.branch_step` instead of training it again, so its first K
steps are its baseline's, rows included, and trains the rest with fake quantization on the same schedule. f = 0
(:func:`quantize_run`) scores the baseline's final model under the precision, without training.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from qatlaw import memory
from qatlaw import precision as prec
from qatlaw.config import schema_default, schema_key
from qatlaw.errors import TrainError
from qatlaw.grid import RunSettings, effective_group
from qatlaw.io import atomic_path, read_parquet, write_parquet
from qatlaw.model import Model, ModelConfig, non_embedding_params
from qatlaw.quant import BLOCK_SCALED, QuantOptions
from qatlaw.runstate import (WeightAverage, load_baseline_weights, publish, read_checkpoint, read_trunk,
                             remove_checkpoint, remove_stale_temporaries, settings_hash, start_from_trunk,
                             stop_marker, trunk_staging, trunk_state, write_checkpoint)
from qatlaw.runtable import STEP_COLUMNS, SUMMARY_COLUMNS
from qatlaw.stopping import Stopped, StopSignals
from qatlaw.tokens import Tokens, read_windows

log = logging.getLogger("qatlaw.train")

# the slowest write rate of a shared filesystem that the process-group timeout allows for, bytes per second
CHECKPOINT_WRITE_BYTES_PER_S = 20e6


@dataclass(frozen=True)
class Execution:
    """How a run is executed (not what is trained): the same run on another device, thread count or
    micro-batch size gives the same model up to floating-point rounding."""

    threads: int = schema_default("training", "threads")
    checkpoint_every: int = schema_default("training", "checkpoint_every")
    checkpoint_minutes: float = schema_default("training", "checkpoint_minutes")
    compile: bool = schema_default("training", "compile")
    device: str = schema_default("training", "device")
    micro_batch_size: int | None = schema_default("training", "micro_batch_size")
    loss_chunk_tokens: int | None = schema_default("training", "loss_chunk_tokens")
    activation_checkpointing: bool | str = schema_default("training", "activation_checkpointing")

    def torch_device(self, local_rank: int = 0) -> torch.device:
        """'auto' is CUDA when available, else CPU; each data-parallel rank gets its own GPU."""
        devices = schema_key("training", "device")["enum"]
        if self.device not in devices:
            raise TrainError(f"device must be {', '.join(devices[:-1])} or {devices[-1]}, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise TrainError("device is cuda but torch sees no CUDA GPU")
        if self.device == "cpu" or not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", local_rank)

    def checkpointing(self, s: RunSettings, vocab_size: int, device: torch.device, gpus: int = 1) -> bool:
        """Whether the blocks recompute their activations in the backward pass: ``activation_checkpointing``, where
        "auto" is off on CPU and on a GPU on only when one sequence per micro-batch does not fit its memory
        (:func:`qatlaw.memory.needs_checkpointing`)."""
        choices = schema_key("training", "activation_checkpointing")["enum"]
        if self.activation_checkpointing not in choices:
            raise TrainError(f"activation_checkpointing must be one of {', '.join(map(str, choices))}, "
                             f"got {self.activation_checkpointing!r}")
        if self.activation_checkpointing != "auto":
            return bool(self.activation_checkpointing)
        if device.type != "cuda":
            return False
        gpu_memory_gb = torch.cuda.get_device_properties(device).total_memory / 2**30
        return memory.needs_checkpointing(s, vocab_size, gpu_memory_gb, gpus, self.loss_chunk_tokens)


@dataclass(frozen=True)
class Parallel:
    """This process's place in a data-parallel run (world size 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Parallel:
        """Rank and world size set by torchrun (WORLD_SIZE, RANK, LOCAL_RANK)."""
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def model_config(s: RunSettings, vocab_size: int) -> ModelConfig:
    """Architecture of a run."""
    return ModelConfig(vocab_size=vocab_size, n_layers=s.layers, hidden=s.hidden, ffn=s.ffn, n_heads=s.heads,
                       n_kv_heads=s.kv_heads, seq_len=s.seq_len)


def quant_options(s: RunSettings) -> QuantOptions | None:
    """Quantizer options of a run (None for the baseline)."""
    if s.is_baseline:
        return None
    fmt = s.element_format
    lac = s.uses_lac and not (fmt in BLOCK_SCALED and s.lac == "paper")  # block-scaled formats keep their scales
    return QuantOptions(group_size=s.group, clip=s.clip, fmt=fmt, lac=lac,
                        rotation=prec.parse(s.precision).rotation)


def build_model(s: RunSettings, vocab_size: int) -> Model:
    """The run's model with its paired initialization (seeded by the run's seed only)."""
    torch.manual_seed(s.seed)
    return Model(model_config(s, vocab_size), s.precision, quant_options(s))


class TokenBatches:
    """Batches of (input, target) windows, a pure function of (seed, step); with several data-parallel ranks, each
    reads only its share of every batch (every ``world``-th window from ``rank``).

    The token stream is cut into non-overlapping windows of ``seq_len + 1`` tokens (targets shifted by one);
    each epoch visits every window once in an order drawn from (seed, epoch), so a budget below one epoch
    never repeats a token.
    """

    def __init__(self, tokens: Tokens, seq_len: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.tokens = tokens
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world = rank, world
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < batch_size:
            raise TrainError(f"{len(tokens)} tokens give {self.n_windows} windows of {seq_len}, fewer than a batch of {batch_size}")
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            # the order of np.random.Generator.permutation(n_windows), held in 4 bytes a window instead of 8
            index = np.arange(self.n_windows, dtype=np.uint32 if self.n_windows < 2**32 else np.int64)
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(index)}
        return self._orders[epoch]

    def windows(self, step: int) -> np.ndarray:
        """Indices of the windows that make up batch ``step`` (all ranks' shares)."""
        idx = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        return np.array([self._order(int(i // self.n_windows))[i % self.n_windows] for i in idx], dtype=np.int64)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's inputs and next-token targets of batch ``step``, each (batch_size / world, seq_len)."""
        starts = self.windows(step)[self.rank::self.world] * self.seq_len
        rows = torch.from_numpy(read_windows(self.tokens, starts, self.seq_len + 1).astype(np.int64))
        return rows[:, :-1], rows[:, 1:]


class Prefetch:
    """Batches read one step ahead in a background thread, so that the read of step ``s + 1`` overlaps the compute
    of step ``s`` (file reads release the GIL). An error of a read (a kill included) is raised by :meth:`get` of
    that step, as a read in the loop would."""

    def __init__(self, batches: TokenBatches, last_step: int):
        self.batches, self.last_step = batches, last_step
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="qatlaw-prefetch")
        self._next: tuple[int, concurrent.futures.Future] | None = None

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``step``; starts the read of ``step + 1``."""
        if self._next is not None and self._next[0] == step:
            batch = self._next[1].result()
        else:
            batch = self.batches.batch(step)
        self._next = (step + 1, self._pool.submit(self.batches.batch, step + 1)) if step + 1 < self.last_step else None
        return batch

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio`` × peak at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - 1 - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model: Model, s: RunSettings, fused: bool = False) -> torch.optim.AdamW:
    """AdamW with weight decay on the linear layers' matrices only (``fused``: one CUDA kernel per step)."""
    decay = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    decay_ids = {id(p) for p in decay}
    no_decay = [p for p in model.parameters() if id(p) not in decay_ids]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=s.lr, betas=(s.beta1, s.beta2), fused=fused or None,
    )


NUMERICS = tuple(schema_key("training", "numerics")["enum"])


def autocast(device: torch.device, numerics: str) -> contextlib.AbstractContextManager:
    """The run's compute numerics on any device: bf16 autocast (the paper's BF16 training) or plain fp32."""
    if numerics not in NUMERICS:
        raise TrainError(f"numerics must be one of {', '.join(NUMERICS)}, got {numerics!r}")
    if numerics == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: Model, tokens: Tokens, seq_len: int, max_tokens: int, batch_size: int,
             device: torch.device = torch.device("cpu"), numerics: str = "fp32", chunk_tokens: int | None = None,
             par: Parallel = Parallel()) -> float:
    """Mean next-token loss over the first ``max_tokens`` tokens, in non-overlapping windows scored ``batch_size``
    at a time (the loss ``chunk_tokens`` tokens at a time); with several ranks each scores every ``par.world``-th
    window and all get the mean of all."""
    n_windows = min(len(tokens) - 1, max_tokens) // seq_len
    if n_windows < 1:
        raise TrainError(f"the validation split has {len(tokens)} tokens, less than one window of {seq_len}")
    data = torch.from_numpy(tokens[: n_windows * seq_len + 1].astype(np.int64))
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for w in torch.arange(par.rank, n_windows, par.world).split(batch_size):
        rows = data[(w * seq_len)[:, None] + torch.arange(seq_len + 1)].to(device)
        with autocast(device, numerics):
            loss = model(rows[:, :-1], rows[:, 1:], chunk_tokens)
        total += loss.item() * len(w)  # windows are of equal length: their mean is the mean over tokens
        count += len(w)
    model.train(was_training)
    if par.world > 1:
        sums = torch.tensor([total, count], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(sums)
        total, count = sums.tolist()
    return total / count


def process_group_timeout(s: RunSettings, vocab_size: int) -> datetime.timedelta:
    """How long a collective waits for the other ranks: while rank 0 writes a checkpoint the others wait in the
    next step's all-reduce, so torch's 10 minutes plus the write of the checkpoint at
    :data:`CHECKPOINT_WRITE_BYTES_PER_S` (a slow shared filesystem)."""
    seconds = 600 + memory.checkpoint_bytes(s, vocab_size) / CHECKPOINT_WRITE_BYTES_PER_S
    return datetime.timedelta(seconds=math.ceil(seconds))


def micro_batches(x: torch.Tensor, y: torch.Tensor, size: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor, float]]:
    """Slices of a batch of at most ``size`` rows, each with its share of the batch's rows."""
    size = size or len(x)
    for start in range(0, len(x), size):
        yield x[start:start + size], y[start:start + size], min(size, len(x) - start) / len(x)


def _on_any_rank(par: Parallel, device: torch.device, *flags: bool) -> list[bool]:
    """Each flag, true on every rank when it is true on any (one all_reduce), so that all ranks act alike."""
    if par.world == 1:
        return list(flags)
    reduced = torch.tensor(flags, dtype=torch.int32, device=device)
    torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in reduced.tolist()]


def data_parallel(module: torch.nn.Module, device: torch.device) -> torch.nn.parallel.DistributedDataParallel:
    """``module`` under DDP in the current process group, its gradients held in DDP's buckets instead of beside
    them (one copy of the gradients, not two)."""
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None,
                                                     gradient_as_bucket_view=True)


def _leave_process_group(par: Parallel) -> None:
    """Under torchrun: wait for every rank (rank 0 may still be writing), then leave the process group."""
    if par.world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _device_name(device: torch.device, par: Parallel) -> str:
    name = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device)
    return name if par.world == 1 else f"{par.world}x {name}"


@dataclass
class Progress:
    """Where a run stands: its steps done, the loss EMA, one row per step (``STEP_COLUMNS``), whether it diverged,
    whether this segment resumed from a checkpoint, and the wall seconds of the segments before it."""

    step: int = 0
    ema: float = 0.0
    rows: list[tuple] = field(default_factory=list)
    diverged: bool = False
    resumed: bool = False
    wall_before: float = 0.0


@dataclass
class Run:
    """One run being trained on this rank: its model, optimizer and weight average, where it is, and the files of
    its persistent state (:mod:`qatlaw.runstate`: rank 0 writes them)."""

    s: RunSettings
    model: Model
    opt: torch.optim.AdamW
    average: WeightAverage | None
    device: torch.device
    par: Parallel
    identity: str
    checkpoint: Path
    keep_trunks: dict[int, Path]

    def checkpoint_now(self, progress: Progress, wall_s: float) -> None:
        """Write the resumable checkpoint of ``progress``."""
        write_checkpoint({"identity": self.identity, "step": progress.step, "ema": progress.ema, "rows": progress.rows,
                          "diverged": progress.diverged, "wall_s": wall_s, "model": self.model.state_dict(),
                          "optimizer": self.opt.state_dict(),
                          "weight_average": None if self.average is None else self.average.state_dict()},
                         self.checkpoint)

    def stage_trunk(self, progress: Progress, steps: Sequence[int] | None = None) -> None:
        """Stage the trunk checkpoint of the current state at its step when a branch starts there (or at each of
        ``steps``: a diverged baseline leaves its later branches its last state)."""
        for k in [progress.step] if steps is None else steps:
            if self.par.is_main and k in self.keep_trunks:
                with atomic_path(trunk_staging(self.checkpoint, k)) as tmp:
                    torch.save(trunk_state(self.identity, k, progress.ema, progress.rows, progress.diverged,
                                           self.model, self.opt, self.average), tmp)


def train_run(
    s: RunSettings,
    *,
    train_tokens: Tokens,
    val_tokens: Tokens,
    manifest: Mapping[str, Any],
    summary_path: str | Path,
    metrics_path: str | Path,
    model_path: str | Path,
    checkpoint_path: str | Path,
    execution: Execution = Execution(),
    keep_checkpoint: bool = False,
    stop: StopSignals | None = None,
    trunk: str | Path | None = None,
    keep_trunks: Mapping[int, str | Path] | None = None,
) -> dict[str, Any]:
    """Train one run to its token budget (resuming from ``checkpoint_path`` if it matches) and write its outputs.

    The summary row is written last. A run whose loss becomes non-finite stops early and is recorded with
    ``diverged = True`` instead of failing. Under ``torchrun`` every rank calls this; rank 0 writes.
    ``keep_checkpoint``: leave a checkpoint of the finished run (the caller deletes it), so that a job of several
    runs that dies later redoes a finished run's outputs without training it again.
    ``stop``: signal handlers the caller installed; once one fired (on any rank), the run ends its step, writes its
    checkpoint and raises :class:`~qatlaw.stopping.Stopped`.
    ``trunk``: the trunk checkpoint a branch starts from (:func:`~qatlaw.runstate.read_trunk`; required for a branch,
    and for a QAT run from scratch a trunk at step 0 gives the same run). ``keep_trunks``: for a BF16 baseline, where
    to write its trunk checkpoint at each of these steps (published when the run ends).
    """
    run = _start(s, manifest, execution, checkpoint_path, _trunk_steps(s, trunk, keep_trunks))
    progress = _resume(run, manifest, trunk)
    step_fn = _step_function(run, execution)
    log.info("%s: N=%d, %d steps of %d tokens, lr %.2e, warm-up %d, QAT fraction %s (from step %d), on %s%s",
             s.run_id, non_embedding_params(run.model.cfg), s.steps, s.tokens_per_step, s.lr, s.warmup,
             s.qat_fraction, s.branch_step, _device_name(run.device, run.par),
             ", activation checkpointing" if run.model.activation_checkpointing else "")
    batches = TokenBatches(train_tokens, s.seq_len, s.batch_size, s.seed, run.par.rank, run.par.world)
    t0, first_step = time.perf_counter(), progress.step
    saved_at, log_every = t0, max(1, s.steps // 20)
    run.stage_trunk(progress)
    with Prefetch(batches, s.steps) as loader:
        while progress.step < s.steps and not progress.diverged:
            train_step(run, step_fn, loader, progress, execution)
            if progress.diverged:
                break
            run.stage_trunk(progress)
            if progress.step % log_every == 0 or progress.step == s.steps:
                step, _, loss, ema, lr, _, tps = progress.rows[-1]
                eta = (time.perf_counter() - t0) / (step - first_step) * (s.steps - step)
                log.info("%s: step %d/%d loss %.4f ema %.4f lr %.2e %.0f tok/s ETA %.0f s", s.run_id, step, s.steps,
                         loss, ema, lr, tps, eta)
            saved_at = _checkpoint_or_stop(run, progress, execution, stop, saved_at, t0)
    run.stage_trunk(progress, sorted(k for k in run.keep_trunks if k > progress.step))
    wall = progress.wall_before + time.perf_counter() - t0
    val_loss, val_loss_last = _final_losses(run, progress, val_tokens, execution)
    summary = _summary(run, progress, trunk is not None, wall, (val_loss, val_loss_last), len(train_tokens),
                       int(manifest["vocab_size"]))
    if run.par.is_main:
        if keep_checkpoint and not (progress.resumed and first_step == progress.step):
            with _training_weights(run):  # the checkpoint holds the final weights, their average aside
                run.checkpoint_now(progress, progress.wall_before + time.perf_counter() - t0)
        for k, out in run.keep_trunks.items():
            publish(trunk_staging(run.checkpoint, k), out)
        _write_outputs(s, run.model, progress.rows, summary, model_path, metrics_path, summary_path)
        if not keep_checkpoint:
            remove_checkpoint(run.checkpoint)
        log.info("%s: done: loss %.4f val_loss %.4f (final weights %.4f) in %.1f s (%.0f tok/s)%s", s.run_id,
                 summary["loss"], val_loss, val_loss_last, wall, summary["tokens_per_s"],
                 " DIVERGED" if progress.diverged else "")
    _leave_process_group(run.par)
    return summary


def _trunk_steps(s: RunSettings, trunk: str | Path | None, keep_trunks: Mapping[int, str | Path] | None
                 ) -> dict[int, Path]:
    """The trunk checkpoints a run keeps, checked with the rest of what it is asked to do (TrainError)."""
    if s.is_ptq:
        raise TrainError(f"{s.run_id}: post-training quantization trains nothing (qatlaw ptq)")
    if s.is_branch and trunk is None:
        raise TrainError(f"{s.run_id}: a branch at QAT fraction {s.qat_fraction} needs its baseline's trunk checkpoint")
    keep = {int(k): Path(v) for k, v in (keep_trunks or {}).items()}
    if keep and not s.is_baseline:
        raise TrainError(f"{s.run_id}: only a BF16 baseline keeps trunk checkpoints")
    if any(not 0 <= k < s.steps for k in keep):
        raise TrainError(f"{s.run_id}: trunk steps {sorted(keep)} are not all within its {s.steps} steps")
    if s.steps < 1:
        raise TrainError(f"{s.run_id}: {s.tokens} tokens is less than one step of {s.tokens_per_step}")
    return keep


def _start(s: RunSettings, manifest: Mapping[str, Any], execution: Execution, checkpoint_path: str | Path,
           keep_trunks: dict[int, Path]) -> Run:
    """This rank's device, threads and process group, and the run's fresh model, optimizer and weight average;
    what a killed checkpoint write left behind is removed."""
    par = Parallel.from_env()
    torch.set_num_threads(execution.threads)
    vocab = int(manifest["vocab_size"])
    if s.batch_size % par.world:
        raise TrainError(f"{s.run_id}: batch of {s.batch_size} sequences does not split over {par.world} processes")
    device = execution.torch_device(par.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # TF32 for what bf16 autocast leaves in fp32; an fp32 run stays true fp32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = s.numerics == "bf16"
    if par.world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             timeout=process_group_timeout(s, vocab))
    model = build_model(s, vocab).to(device)
    model.activation_checkpointing = execution.checkpointing(s, vocab, device, par.world)
    average = WeightAverage(model, s.weight_ema_decay) if s.weight_ema > 0 else None
    run = Run(s, model, make_optimizer(model, s, fused=device.type == "cuda"), average, device, par,
              settings_hash(s, manifest), Path(checkpoint_path), keep_trunks)
    if par.is_main:
        remove_stale_temporaries(run.checkpoint)
        stop_marker(run.checkpoint).unlink(missing_ok=True)
    return run


def _resume(run: Run, manifest: Mapping[str, Any], trunk: str | Path | None) -> Progress:
    """Where the run starts: its checkpoint when it matches the run (settings and data, and its staged trunks), else
    its trunk checkpoint (a branch), else step 0."""
    s, path = run.s, run.checkpoint
    state = read_checkpoint(path, run.device)
    if state is not None:
        unstaged = [k for k in run.keep_trunks if k <= state.get("step", 0) and not trunk_staging(path, k).is_file()]
        if state.get("identity") == run.identity and unstaged:
            log.warning("%s: ignoring checkpoint %s: the trunk checkpoint of step %d was not kept; starting from "
                        "step 0", s.run_id, path, unstaged[0])
        elif state.get("identity") == run.identity:
            run.model.load_state_dict(state["model"])
            run.opt.load_state_dict(state["optimizer"])
            if run.average is not None:
                run.average.load_state_dict(state["weight_average"])
            log.info("%s: resuming from checkpoint %s at step %d/%d", s.run_id, path, state["step"], s.steps)
            return Progress(state["step"], state["ema"], state["rows"], state.get("diverged", False), True,
                            state["wall_s"])
        else:
            log.warning("%s: ignoring checkpoint %s written for other settings or data", s.run_id, path)
    if trunk is None:
        return Progress()
    start = read_trunk(trunk, s, manifest, run.device)
    start_from_trunk(start, Path(trunk), run.model, run.opt, run.average)
    log.info("%s: starting from trunk checkpoint %s of %s at step %d/%d", s.run_id, trunk, s.baseline.run_id,
             start["step"], s.steps)
    return Progress(start["step"], start["ema"], list(start["rows"]), start["diverged"])


def _step_function(run: Run, execution: Execution) -> torch.nn.Module:
    """The module a training step calls: the model, compiled afresh (dynamo's cache of graphs per code object is
    bounded, 8 by default, and a job of several runs, each precision and G its own graph, would otherwise fall back
    to eager unannounced), under DDP with several ranks."""
    if execution.compile:
        torch._dynamo.reset()
    step_fn = torch.compile(run.model) if execution.compile else run.model
    return data_parallel(step_fn, run.device) if run.par.world > 1 else step_fn


def train_step(run: Run, step_fn: torch.nn.Module, loader: Prefetch, progress: Progress, execution: Execution) -> None:
    """One optimizer step: the LR of the schedule, the batch in micro-batches (DDP synchronizing on the last), the
    mean loss over every rank, clipping, AdamW and the weight average; its row appended to ``progress`` (or the run
    marked diverged when the loss is not finite)."""
    s, device, par = run.s, run.device, run.par
    t_step = time.perf_counter()
    lr = lr_at(progress.step, s.steps, s.lr, s.warmup, s.min_lr_ratio)
    for group in run.opt.param_groups:
        group["lr"] = lr
    x, y = (t.to(device) for t in loader.get(progress.step))
    run.opt.zero_grad(set_to_none=True)
    parts = list(micro_batches(x, y, execution.micro_batch_size))
    loss_sum = torch.zeros((), device=device)
    for i, (xm, ym, share) in enumerate(parts):
        sync = i == len(parts) - 1 or par.world == 1
        with (contextlib.nullcontext() if sync else step_fn.no_sync()), autocast(device, s.numerics):
            loss = step_fn(xm, ym, execution.loss_chunk_tokens)
        (loss if len(parts) == 1 else loss * share).backward()
        loss_sum += loss.detach() * share
    if par.world > 1:
        torch.distributed.all_reduce(loss_sum, op=torch.distributed.ReduceOp.AVG)
    loss_value = loss_sum.item()
    if not math.isfinite(loss_value):
        progress.diverged = True
        log.warning("%s: loss is %s at step %d; stopping (diverged)", s.run_id, loss_value, progress.step)
        return
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), s.grad_clip).item()
    run.opt.step()
    if run.average is not None:
        run.average.update()
    progress.ema = s.loss_ema * progress.ema + (1 - s.loss_ema) * loss_value
    progress.step += 1
    ema_debiased = progress.ema / (1 - s.loss_ema**progress.step)
    tps = s.tokens_per_step / (time.perf_counter() - t_step)
    progress.rows.append((progress.step, progress.step * s.tokens_per_step, loss_value, ema_debiased, lr, grad_norm,
                          tps))


def _checkpoint_or_stop(run: Run, progress: Progress, execution: Execution, stop: StopSignals | None,
                        saved_at: float, t0: float) -> float:
    """After a step: a checkpoint every ``checkpoint_every`` steps and every ``checkpoint_minutes``; on a stop
    signal (to any rank) a checkpoint, the stop marker and :class:`~qatlaw.stopping.Stopped`. When the last
    checkpoint was written."""
    s, par = run.s, run.par
    received = stop.received if stop is not None else None
    minutes = (time.perf_counter() - saved_at) / 60
    stopping, timed = _on_any_rank(par, run.device, received is not None,
                                   par.is_main and minutes >= execution.checkpoint_minutes)
    step = progress.step
    if par.is_main and (stopping or step < s.steps and (timed or step % execution.checkpoint_every == 0)):
        if timed:
            log.info("%s: checkpoint at step %d/%d, %.1f min after the last", s.run_id, step, s.steps, minutes)
        run.checkpoint_now(progress, progress.wall_before + time.perf_counter() - t0)
        saved_at = time.perf_counter()
    if stopping:
        signal_name = received.name if received else "a signal to another rank"
        log.warning("%s: %s: stopping after step %d/%d, checkpoint %s", s.run_id, signal_name, step, s.steps,
                    run.checkpoint)
        if par.is_main:
            with atomic_path(stop_marker(run.checkpoint)) as tmp:
                tmp.write_text(f"{signal_name}\n")
        _leave_process_group(par)
        raise Stopped(f"{s.run_id}: stopped on {signal_name} after step {step}/{s.steps}; rerun to resume")
    return saved_at


def _final_losses(run: Run, progress: Progress, val_tokens: Tokens, execution: Execution) -> tuple[float, float]:
    """``val_loss`` (of the weight average when the run keeps one; it is the run's model from here on) and
    ``val_loss_last`` (of the final weights), scored as many windows per forward as training took; NaN when the run
    diverged."""
    if progress.diverged:
        return float("nan"), float("nan")
    s = run.s
    per_forward = execution.micro_batch_size or s.batch_size // run.par.world
    scoring = (val_tokens, s.seq_len, s.eval_tokens, per_forward, run.device, s.numerics, execution.loss_chunk_tokens,
               run.par)
    val_loss_last = val_loss = evaluate(run.model, *scoring)
    if run.average is not None:
        run.average.swap()
        val_loss = evaluate(run.model, *scoring)
    return val_loss, val_loss_last


@contextlib.contextmanager
def _training_weights(run: Run) -> Iterator[None]:
    """The final weights in the model while the block runs, where the weight average replaced them."""
    if run.average is not None:
        run.average.swap()
    try:
        yield
    finally:
        if run.average is not None:
            run.average.swap()


def _summary(run: Run, progress: Progress, from_trunk: bool, wall: float, val_losses: tuple[float, float],
             train_tokens: int, vocab: int) -> dict[str, Any]:
    """The run's summary row (``SUMMARY_COLUMNS``); its throughput counts the tokens it trained itself, not its
    trunk's."""
    s, rows = run.s, progress.rows
    trained = len(rows) * s.tokens_per_step
    own = max(0, len(rows) - (s.branch_step if from_trunk else 0)) * s.tokens_per_step
    return {
        "run_id": s.run_id, "size": s.size, "N": non_embedding_params(run.model.cfg), "D": trained,
        "tokens_requested": s.tokens, "group": "none" if s.group is None else str(s.group),
        "G": effective_group(s), "precision": s.precision, "seed": s.seed,
        "loss": float("nan") if progress.diverged or not rows else rows[-1][3], "val_loss": val_losses[0],
        "val_loss_last": val_losses[1],
        "final_step_loss": rows[-1][2] if rows else float("nan"), "steps": len(rows),
        "tokens_per_step": s.tokens_per_step, "epochs": trained / max(1, train_tokens), "lr": s.lr,
        "wall_s": wall, "tokens_per_s": own / wall if wall > 0 else float("nan"), "diverged": progress.diverged,
        "resumed": progress.resumed, "vocab_size": vocab, "seq_len": s.seq_len, "clip": s.clip, "format": s.element_format,
        "lac": s.lac, "device": _device_name(run.device, run.par), "numerics": s.numerics,
        "qat_fraction": s.qat_fraction,
    }


def _write_outputs(s: RunSettings, model: Model, rows: Sequence[tuple], summary: Mapping[str, Any],
                   model_path: str | Path, metrics_path: str | Path, summary_path: str | Path) -> None:
    """A run's model (with its settings), per-step metrics and summary row; the summary last."""
    with atomic_path(model_path) as tmp:
        torch.save({"settings": asdict(s), "model_config": asdict(model.cfg), "model": model.cpu().state_dict()}, tmp)
    write_parquet(pd.DataFrame(rows, columns=list(STEP_COLUMNS)), metrics_path)
    frame = pd.DataFrame([summary], columns=list(SUMMARY_COLUMNS)).astype({"G": "Int64"})
    write_parquet(frame, summary_path)


def quantize_run(
    s: RunSettings,
    *,
    baseline_summary: str | Path,
    baseline_metrics: str | Path,
    baseline_model: str | Path,
    val_tokens: Tokens,
    manifest: Mapping[str, Any],
    summary_path: str | Path,
    metrics_path: str | Path,
    model_path: str | Path,
    execution: Execution = Execution(),
) -> dict[str, Any]:
    """Post-training quantization (QAT fraction 0): the baseline's final model (its weight average when it keeps
    one) scored under ``s``'s precision, without a step of training; its quantizer parameters the baseline lacks
    (LAC γ) at their fresh init. Writes a run's three files. Its metrics are the baseline's (every step was trunk);
    its summary row is the baseline's (N, D, steps, epochs: the training its weights saw) with this run's id,
    precision and group, ``val_loss`` of the quantized model (``val_loss_last`` the same, NaN when the baseline
    scores a weight average: the final weights are not kept), ``loss`` and ``final_step_loss`` NaN (no training step
    ran quantized), ``wall_s`` the scoring's, ``tokens_per_s`` NaN, and ``diverged`` the baseline's."""
    if not s.is_ptq:
        raise TrainError(f"{s.run_id}: QAT fraction {s.qat_fraction} is trained (qatlaw train), not only quantized")
    torch.set_num_threads(execution.threads)
    device = execution.torch_device()
    base = read_parquet(baseline_summary, SUMMARY_COLUMNS, "run summary", error=TrainError).iloc[0].to_dict()
    rows = list(read_parquet(baseline_metrics, STEP_COLUMNS, "run metrics", error=TrainError)
                .itertuples(index=False, name=None))
    try:
        saved = torch.load(baseline_model, map_location="cpu", weights_only=False)
        matches = RunSettings(**saved["settings"]) == s.baseline
    except Exception as exc:  # any damage: one line naming the file
        raise TrainError(f"{s.run_id}: baseline model {baseline_model} is unreadable ({type(exc).__name__})") from None
    if not matches or base["run_id"] != s.baseline.run_id:
        raise TrainError(f"{s.run_id}: {baseline_model} or {baseline_summary} is not the model of baseline "
                         f"{s.baseline.run_id} with these settings")
    model = build_model(s, int(manifest["vocab_size"]))
    load_baseline_weights(model, saved["model"], f"baseline model {baseline_model}")
    model.to(device)
    t0 = time.perf_counter()
    val_loss = float("nan")
    if not base["diverged"]:
        val_loss = evaluate(model, val_tokens, s.seq_len, s.eval_tokens, execution.micro_batch_size or s.batch_size,
                            device, s.numerics, execution.loss_chunk_tokens)
    summary = base | {
        "run_id": s.run_id, "group": str(s.group), "G": effective_group(s), "precision": s.precision,
        "loss": float("nan"), "val_loss": val_loss, "val_loss_last": val_loss if s.weight_ema == 0 else float("nan"),
        "final_step_loss": float("nan"), "wall_s": time.perf_counter() - t0, "tokens_per_s": float("nan"),
        "resumed": False, "clip": s.clip, "format": s.element_format, "lac": s.lac, "device": _device_name(device, Parallel()),
        "qat_fraction": s.qat_fraction,
    }
    _write_outputs(s, model, rows, summary, model_path, metrics_path, summary_path)
    log.info("%s: post-training quantization of %s: val_loss %.4f (baseline %.4f)", s.run_id, s.baseline.run_id,
             val_loss, base["val_loss"])
    return summary


