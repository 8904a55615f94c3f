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
import hashlib
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from qatlaw import memory
from qatlaw.config import schema_default, schema_key
from qatlaw.errors import QatlawError
from qatlaw.grid import RunSettings, effective_group
from qatlaw.io import atomic_path, read_parquet, stale_temporaries, write_parquet
from qatlaw.model import Model, ModelConfig, non_embedding_params
from qatlaw.quant import LAC, QuantOptions
from qatlaw.runtable import with_qat_fraction
from qatlaw.stopping import Stopped, StopSignals
from qatlaw.tokens import Tokens, read_windows

log = logging.getLogger("qatlaw.train")

SUMMARY_COLUMNS = (
    "run_id", "size", "N", "D", "tokens_requested", "group", "G", "precision", "seed", "loss", "val_loss",
    "val_loss_last", "final_step_loss", "steps", "tokens_per_step", "epochs", "lr", "wall_s", "tokens_per_s", "diverged",
    "resumed", "vocab_size", "seq_len", "clip", "format", "lac", "device", "numerics", "qat_fraction",
)
# The columns every run summary has: those written before the QAT fraction was recorded lack it (QAT from scratch).
SUMMARY_REQUIRED = SUMMARY_COLUMNS[:-1]
# The per-step metrics file of a run (runs/<run_id>/metrics.parquet).
STEP_COLUMNS = ("step", "tokens", "loss", "loss_ema", "lr", "grad_norm", "tokens_per_s")
# the slowest write rate of a shared filesystem that the process-group timeout allows for, bytes per second
CHECKPOINT_WRITE_BYTES_PER_S = 20e6


class TrainError(QatlawError):
    """A run cannot start: bad settings or data."""


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
    lac = {"paper": None, "always": True, "never": False}[s.lac]
    return QuantOptions(group_size=s.group, clip=s.clip, fmt=s.format, lac=lac)


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


class WeightAverage:
    """Exponential moving average of a model's parameters, updated after every optimizer step."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.params = [p for p in model.parameters()]
        self.average = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - self.decay)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the model's parameters and the average (twice restores the model)."""
        for p, a in zip(self.params, self.average):
            tmp = p.detach().clone()
            p.copy_(a)
            a.copy_(tmp)

    def state_dict(self) -> list[torch.Tensor]:
        return self.average

    def load_state_dict(self, state: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for a, saved in zip(self.average, state):
                a.copy_(saved)


def settings_hash(s: RunSettings, manifest: Mapping[str, Any]) -> str:
    """Identity of a run for resuming: its settings and the exact token data."""
    key = s.to_json() + manifest["corpus_sha256"] + manifest["tokenizer_sha256"]
    return hashlib.sha256(key.encode()).hexdigest()


def previous_checkpoint(checkpoint_path: str | Path) -> Path:
    """Where a run keeps its checkpoint before the last (``ckpt.prev.pt`` beside ``ckpt.pt``)."""
    path = Path(checkpoint_path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def stop_marker(checkpoint_path: str | Path) -> Path:
    """The file a run stopped by a signal leaves beside its checkpoint (the signal's name in it), so that the
    process that launched its workers knows it stopped rather than failed."""
    path = Path(checkpoint_path)
    return path.with_name(f"{path.name}.stopped")


def write_checkpoint(state: Mapping[str, Any], checkpoint_path: str | Path) -> None:
    """Write a resumable checkpoint durably (on disk before its name is), keeping the one it replaces as the
    previous checkpoint, so that a write cut short or a file damaged later costs one interval, not the run."""
    path = Path(checkpoint_path)
    with atomic_path(path, durable=True) as tmp:
        torch.save(state, tmp)
        if path.is_file():
            os.replace(path, previous_checkpoint(path))


def _read_checkpoint(path: Path, device: torch.device) -> dict | None:
    """A run's checkpoint, else its previous one when the last is missing or unreadable, else None (then the run
    starts over, with a warning naming every file that could not be read)."""
    unreadable = []
    for candidate in (path, previous_checkpoint(path)):
        if not candidate.is_file():
            continue
        try:
            state = torch.load(candidate, map_location=device, weights_only=False)
        except Exception as exc:  # a damaged file of any kind must not block the run forever
            unreadable.append(f"{candidate} ({type(exc).__name__}: {str(exc).strip()[:200]})")
            continue
        if unreadable:
            log.warning("unreadable checkpoint %s; resuming from the previous one, %s", unreadable[0], candidate)
        return state
    if unreadable:
        log.warning("ignoring unreadable checkpoint %s; starting from step 0", " and its previous one, ".join(unreadable))
    return None


def _remove_stale_temporaries(checkpoint_path: Path) -> None:
    """Delete what writers of this run's checkpoints killed mid-write left behind (a 973M checkpoint is 16.6 GB)."""
    for stale in stale_temporaries(checkpoint_path):
        log.warning("removing %s, a checkpoint write cut short", stale)
        stale.unlink(missing_ok=True)


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


def trunk_staging(checkpoint_path: str | Path, step: int) -> Path:
    """Where a baseline stages its trunk checkpoint at ``step`` while it trains: beside its resumable checkpoint,
    outside the outputs that Snakemake deletes when a job fails."""
    return Path(checkpoint_path).parent / "trunk" / f"step{step}.pt"


def remove_checkpoint(checkpoint_path: str | Path) -> None:
    """Delete a run's resumable checkpoints (the last and the previous) and the trunk checkpoints it staged."""
    for path in (Path(checkpoint_path), previous_checkpoint(checkpoint_path), stop_marker(checkpoint_path)):
        path.unlink(missing_ok=True)
    shutil.rmtree(trunk_staging(checkpoint_path, 0).parent, ignore_errors=True)


def _publish(staged: Path, out: Path) -> None:
    """Put a staged file at ``out`` atomically: a hard link (no copy of the bytes) where the filesystem allows."""
    with atomic_path(out) as tmp:
        tmp.unlink()
        try:
            os.link(staged, tmp)
        except OSError:
            shutil.copyfile(staged, tmp)


def _fresh_parameters(model: Model) -> set[str]:
    """Names of the quantizer parameters a BF16 model lacks (LAC γ)."""
    return {f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, LAC) for p, _ in m.named_parameters()}


def _load_baseline_weights(model: Model, weights: Mapping[str, torch.Tensor], source: str) -> None:
    """Load a BF16 model's weights into ``model`` (of any precision of the cell); its quantizer parameters that the
    baseline lacks keep their fresh init. TrainError naming ``source`` when the weights are of another shape."""
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError:
        raise TrainError(f"{source}: weights of another model shape") from None
    if unexpected or set(missing) - _fresh_parameters(model):
        raise TrainError(f"{source}: weights of another model (missing {sorted(set(missing))[:1]}, unexpected "
                         f"{sorted(unexpected)[:1]})")


def read_trunk(path: str | Path, s: RunSettings, manifest: Mapping[str, Any], device: torch.device) -> dict:
    """The trunk checkpoint branch ``s`` starts from, checked before any step: TrainError, one line naming the
    file, when it is missing, unreadable, or not its baseline's (settings and data) at step K."""
    path, base = Path(path), s.baseline.run_id
    if not path.is_file():
        raise TrainError(f"{s.run_id}: trunk checkpoint {path} is missing; its baseline {base} writes it")
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as exc:  # any damage: the trunk must be rewritten by its baseline, never guessed
        raise TrainError(f"{s.run_id}: trunk checkpoint {path} is unreadable ({type(exc).__name__}); rerun its "
                         f"baseline {base}") from None
    if not isinstance(state, dict) or state.get("identity") != settings_hash(s.baseline, manifest):
        raise TrainError(f"{s.run_id}: trunk checkpoint {path} is not that of baseline {base} with these settings "
                         "and data; rerun the baseline")
    if state.get("step") != s.branch_step:
        raise TrainError(f"{s.run_id}: trunk checkpoint {path} is at step {state.get('step')}, not the branch step "
                         f"{s.branch_step}")
    return state


def _trunk_state(identity: str, step: int, ema: float, rows: Sequence[tuple], diverged: bool, model: Model,
                 opt: torch.optim.Optimizer, average: WeightAverage | None) -> dict:
    """A baseline's training state at ``step`` for its branches, by parameter name (a QAT model has more)."""
    params = [p for group in opt.param_groups for p in group["params"]]
    names = _names(model, list(model.parameters()))
    return {"identity": identity, "step": step, "ema": ema, "rows": list(rows), "diverged": diverged,
            "model": model.state_dict(),
            "optimizer": {name: opt.state[p] for name, p in zip(_names(model, params), params) if p in opt.state},
            "weight_average": None if average is None else dict(zip(names, average.state_dict()))}


def _start_from_trunk(state: Mapping[str, Any], path: Path, model: Model, opt: torch.optim.Optimizer,
                      average: WeightAverage | None) -> None:
    """Put a branch's model, optimizer and weight average in its trunk's state. The quantizer parameters a BF16
    model lacks (LAC γ) start from their fresh init: empty AdamW state, and their init in the weight average."""
    _load_baseline_weights(model, state["model"], f"trunk checkpoint {path}")
    order = [name for group in opt.param_groups for name in _names(model, group["params"])]
    saved = opt.state_dict()
    saved["state"] = {i: state["optimizer"][name] for i, name in enumerate(order) if name in state["optimizer"]}
    opt.load_state_dict(saved)
    if average is not None:
        trunk_average = state["weight_average"]
        average.load_state_dict([trunk_average.get(name, a) for (name, _), a
                                 in zip(model.named_parameters(), average.state_dict())])


def _names(model: Model, params: Sequence[torch.Tensor]) -> list[str]:
    by_id = {id(p): name for name, p in model.named_parameters()}
    return [by_id[id(p)] for p in params]


def _device_name(device: torch.device, par: Parallel) -> str:
    name = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device)
    return name if par.world == 1 else f"{par.world}x {name}"


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
    ``trunk``: the trunk checkpoint a branch starts from (:func:`read_trunk`; required for a branch, and for a QAT
    run from scratch a trunk at step 0 gives the same run). ``keep_trunks``: for a BF16 baseline, where to write
    its trunk checkpoint at each of these steps (published when the run ends).
    """
    if s.is_ptq:
        raise TrainError(f"{s.run_id}: post-training quantization trains nothing (qatlaw ptq)")
    if s.is_branch and trunk is None:
        raise TrainError(f"{s.run_id}: a branch at QAT fraction {s.qat_fraction} needs its baseline's trunk checkpoint")
    keep_trunks = {int(k): Path(v) for k, v in (keep_trunks or {}).items()}
    if keep_trunks and not s.is_baseline:
        raise TrainError(f"{s.run_id}: only a BF16 baseline keeps trunk checkpoints")
    if any(not 0 <= k < s.steps for k in keep_trunks):
        raise TrainError(f"{s.run_id}: trunk steps {sorted(keep_trunks)} are not all within its {s.steps} steps")
    par = Parallel.from_env()
    torch.set_num_threads(execution.threads)
    vocab = int(manifest["vocab_size"])
    if s.steps < 1:
        raise TrainError(f"{s.run_id}: {s.tokens} tokens is less than one step of {s.tokens_per_step}")
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
    opt = make_optimizer(model, s, fused=device.type == "cuda")
    average = WeightAverage(model, s.weight_ema_decay) if s.weight_ema > 0 else None
    batches = TokenBatches(train_tokens, s.seq_len, s.batch_size, s.seed, par.rank, par.world)
    warmup = s.warmup
    identity = settings_hash(s, manifest)
    checkpoint_path = Path(checkpoint_path)
    if par.is_main:
        _remove_stale_temporaries(checkpoint_path)
        stop_marker(checkpoint_path).unlink(missing_ok=True)

    step, ema, rows, diverged, resumed, wall_before = 0, 0.0, [], False, False, 0.0
    state = _read_checkpoint(checkpoint_path, device)
    if state is not None:
        unstaged = [k for k in keep_trunks if k <= state.get("step", 0) and not trunk_staging(checkpoint_path, k).is_file()]
        if state.get("identity") == identity and unstaged:
            log.warning("%s: ignoring checkpoint %s: the trunk checkpoint of step %d was not kept; starting from "
                        "step 0", s.run_id, checkpoint_path, unstaged[0])
        elif state.get("identity") == identity:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            if average is not None:
                average.load_state_dict(state["weight_average"])
            step, ema, rows, wall_before = state["step"], state["ema"], state["rows"], state["wall_s"]
            diverged, resumed = state.get("diverged", False), True
            log.info("%s: resuming from checkpoint %s at step %d/%d", s.run_id, checkpoint_path, step, s.steps)
        else:
            log.warning("%s: ignoring checkpoint %s written for other settings or data", s.run_id, checkpoint_path)
    if trunk is not None and not resumed:
        start = read_trunk(trunk, s, manifest, device)
        _start_from_trunk(start, Path(trunk), model, opt, average)
        step, ema, rows, diverged = start["step"], start["ema"], list(start["rows"]), start["diverged"]
        log.info("%s: starting from trunk checkpoint %s of %s at step %d/%d", s.run_id, trunk, s.baseline.run_id,
                 step, s.steps)
    if execution.compile:
        # a fresh compile per run: dynamo's cache of graphs per code object is bounded (8 by default), and a job
        # of several runs (each precision and G its own graph) would otherwise fall back to eager unannounced
        torch._dynamo.reset()
    step_fn = torch.compile(model) if execution.compile else model
    if par.world > 1:
        step_fn = data_parallel(step_fn, device)

    log.info("%s: N=%d, %d steps of %d tokens, lr %.2e, warm-up %d, QAT fraction %s (from step %d), on %s%s",
             s.run_id, non_embedding_params(model.cfg), s.steps, s.tokens_per_step, s.lr, warmup, s.qat_fraction,
             s.branch_step, _device_name(device, par), ", activation checkpointing" if model.activation_checkpointing
             else "")
    t0, first_step = time.perf_counter(), step
    saved_at = t0
    log_every = max(1, s.steps // 20)

    def save_checkpoint() -> None:
        nonlocal saved_at
        write_checkpoint({"identity": identity, "step": step, "ema": ema, "rows": rows, "diverged": diverged,
                          "wall_s": wall_before + time.perf_counter() - t0,
                          "model": model.state_dict(), "optimizer": opt.state_dict(),
                          "weight_average": None if average is None else average.state_dict()}, checkpoint_path)
        saved_at = time.perf_counter()

    def stage_trunk() -> None:
        if par.is_main and step in keep_trunks:
            with atomic_path(trunk_staging(checkpoint_path, step)) as tmp:
                torch.save(_trunk_state(identity, step, ema, rows, diverged, model, opt, average), tmp)

    stage_trunk()
    with Prefetch(batches, s.steps) as loader:
        while step < s.steps and not diverged:
            t_step = time.perf_counter()
            lr = lr_at(step, s.steps, s.lr, warmup, s.min_lr_ratio)
            for group in opt.param_groups:
                group["lr"] = lr
            x, y = (t.to(device) for t in loader.get(step))
            opt.zero_grad(set_to_none=True)
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
                diverged = True
                log.warning("%s: loss is %s at step %d; stopping (diverged)", s.run_id, loss_value, step)
                break
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip).item()
            opt.step()
            if average is not None:
                average.update()
            ema = s.loss_ema * ema + (1 - s.loss_ema) * loss_value
            step += 1
            ema_debiased = ema / (1 - s.loss_ema**step)
            tps = s.tokens_per_step / (time.perf_counter() - t_step)
            rows.append((step, step * s.tokens_per_step, loss_value, ema_debiased, lr, grad_norm, tps))
            stage_trunk()
            if step % log_every == 0 or step == s.steps:
                eta = (time.perf_counter() - t0) / (step - first_step) * (s.steps - step)
                log.info("%s: step %d/%d loss %.4f ema %.4f lr %.2e %.0f tok/s ETA %.0f s", s.run_id, step, s.steps,
                         loss_value, ema_debiased, lr, tps, eta)
            received = stop.received if stop is not None else None
            minutes = (time.perf_counter() - saved_at) / 60
            stopping, timed = _on_any_rank(par, device, received is not None,
                                           par.is_main and minutes >= execution.checkpoint_minutes)
            if par.is_main and (stopping or step < s.steps and (timed or step % execution.checkpoint_every == 0)):
                if timed:
                    log.info("%s: checkpoint at step %d/%d, %.1f min after the last", s.run_id, step, s.steps, minutes)
                save_checkpoint()
            if stopping:
                signal_name = received.name if received else "a signal to another rank"
                log.warning("%s: %s: stopping after step %d/%d, checkpoint %s", s.run_id, signal_name, step, s.steps,
                            checkpoint_path)
                if par.is_main:
                    with atomic_path(stop_marker(checkpoint_path)) as tmp:
                        tmp.write_text(f"{signal_name}\n")
                _leave_process_group(par)
                raise Stopped(f"{s.run_id}: stopped on {signal_name} after step {step}/{s.steps}; rerun to resume")

    if par.is_main:  # a baseline that diverged leaves its later branches its last state, marked diverged
        for k in sorted(k for k in keep_trunks if k > step):
            with atomic_path(trunk_staging(checkpoint_path, k)) as tmp:
                torch.save(_trunk_state(identity, k, ema, rows, diverged, model, opt, average), tmp)
    wall = wall_before + time.perf_counter() - t0
    val_loss_last = val_loss = float("nan")
    if not diverged:
        per_forward = execution.micro_batch_size or s.batch_size // par.world  # windows per forward, as in training
        scoring = (val_tokens, s.seq_len, s.eval_tokens, per_forward, device, s.numerics,
                   execution.loss_chunk_tokens, par)
        val_loss_last = val_loss = evaluate(model, *scoring)
        if average is not None:
            average.swap()  # the averaged weights are the run's model from here on
            val_loss = evaluate(model, *scoring)
    trained = len(rows) * s.tokens_per_step
    own = max(0, len(rows) - (s.branch_step if trunk is not None else 0)) * s.tokens_per_step  # the trunk aside
    summary = {
        "run_id": s.run_id, "size": s.size, "N": non_embedding_params(model.cfg), "D": trained,
        "tokens_requested": s.tokens, "group": "none" if s.group is None else str(s.group),
        "G": effective_group(s), "precision": s.precision, "seed": s.seed,
        "loss": float("nan") if diverged or not rows else rows[-1][3], "val_loss": val_loss,
        "val_loss_last": val_loss_last,
        "final_step_loss": rows[-1][2] if rows else float("nan"), "steps": len(rows),
        "tokens_per_step": s.tokens_per_step, "epochs": trained / max(1, len(train_tokens)), "lr": s.lr,
        "wall_s": wall, "tokens_per_s": own / wall if wall > 0 else float("nan"), "diverged": diverged,
        "resumed": resumed, "vocab_size": vocab, "seq_len": s.seq_len, "clip": s.clip, "format": s.format,
        "lac": s.lac, "device": _device_name(device, par), "numerics": s.numerics, "qat_fraction": s.qat_fraction,
    }
    if par.is_main:
        if keep_checkpoint and not (resumed and first_step == step):
            if average is not None:
                average.swap()  # the checkpoint holds the training state: final weights, their average aside
            save_checkpoint()
            if average is not None:
                average.swap()
        for k, out in keep_trunks.items():
            _publish(trunk_staging(checkpoint_path, k), out)
        _write_outputs(s, model, rows, summary, model_path, metrics_path, summary_path)
        if not keep_checkpoint:
            remove_checkpoint(checkpoint_path)
        log.info("%s: done: loss %.4f val_loss %.4f (final weights %.4f) in %.1f s (%.0f tok/s)%s", s.run_id,
                 summary["loss"], val_loss, val_loss_last, wall, summary["tokens_per_s"], " DIVERGED" if diverged else "")
    _leave_process_group(par)
    return summary


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
    _load_baseline_weights(model, saved["model"], f"baseline model {baseline_model}")
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
        "resumed": False, "clip": s.clip, "format": s.format, "lac": s.lac, "device": _device_name(device, Parallel()),
        "qat_fraction": s.qat_fraction,
    }
    _write_outputs(s, model, rows, summary, model_path, metrics_path, summary_path)
    log.info("%s: post-training quantization of %s: val_loss %.4f (baseline %.4f)", s.run_id, s.baseline.run_id,
             val_loss, base["val_loss"])
    return summary


def collect_runs(summary_paths: list[str | Path], out_path: str | Path) -> pd.DataFrame:
    """Concatenate run summaries into one table (one row per run), checking each file's columns (a summary
    written before the QAT fraction was recorded is of a run from scratch)."""
    frames = []
    for path in summary_paths:
        frame = with_qat_fraction(read_parquet(path, SUMMARY_REQUIRED, "run summary", error=TrainError))
        if tuple(frame.columns) != SUMMARY_COLUMNS or len(frame) != 1:
            raise TrainError(f"{path}: expected one run summary row with columns {', '.join(SUMMARY_COLUMNS)}")
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True).sort_values("run_id", ignore_index=True)
    write_parquet(table, out_path)
    return table
