"""A run's persistent state: its resumable checkpoints, the weight average, and a BF16 baseline's trunk checkpoints.

A resumable checkpoint (model, AdamW state, weight average, step, loss EMA, per-step rows, wall time) is identified
by the run's settings and token data (:func:`settings_hash`), written durably with the one before it kept
(:func:`write_checkpoint`), read back falling back to that one (:func:`read_checkpoint`), and removed with its
leftovers when the run is done. A run stopped by a signal leaves :func:`stop_marker` beside it. A baseline whose
cell has branches stages a trunk checkpoint at each branch step (by parameter name: a QAT model has more) while it
trains and publishes it at the end; a branch starts from it (:func:`read_trunk`, :func:`start_from_trunk`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from qatlaw.errors import TrainError
from qatlaw.grid import RunSettings
from qatlaw.io import atomic_path, stale_temporaries
from qatlaw.model import Model
from qatlaw.quant import LAC

log = logging.getLogger("qatlaw.train")  # the training log: a run's checkpoints are part of it


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


def read_checkpoint(path: Path, device: torch.device) -> dict | None:
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


def remove_stale_temporaries(checkpoint_path: Path) -> None:
    """Delete what writers of this run's checkpoints killed mid-write left behind (a 973M checkpoint is 16.6 GB)."""
    for stale in stale_temporaries(checkpoint_path):
        log.warning("removing %s, a checkpoint write cut short", stale)
        stale.unlink(missing_ok=True)


def trunk_staging(checkpoint_path: str | Path, step: int) -> Path:
    """Where a baseline stages its trunk checkpoint at ``step`` while it trains: beside its resumable checkpoint,
    outside the outputs that Snakemake deletes when a job fails."""
    return Path(checkpoint_path).parent / "trunk" / f"step{step}.pt"


def remove_checkpoint(checkpoint_path: str | Path) -> None:
    """Delete a run's resumable checkpoints (the last and the previous) and the trunk checkpoints it staged."""
    for path in (Path(checkpoint_path), previous_checkpoint(checkpoint_path), stop_marker(checkpoint_path)):
        path.unlink(missing_ok=True)
    shutil.rmtree(trunk_staging(checkpoint_path, 0).parent, ignore_errors=True)


def publish(staged: Path, out: Path) -> None:
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


def load_baseline_weights(model: Model, weights: Mapping[str, torch.Tensor], source: str) -> None:
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


def trunk_state(identity: str, step: int, ema: float, rows: Sequence[tuple], diverged: bool, model: Model,
                 opt: torch.optim.Optimizer, average: WeightAverage | None) -> dict:
    """A baseline's training state at ``step`` for its branches, by parameter name (a QAT model has more)."""
    params = [p for group in opt.param_groups for p in group["params"]]
    names = _names(model, list(model.parameters()))
    return {"identity": identity, "step": step, "ema": ema, "rows": list(rows), "diverged": diverged,
            "model": model.state_dict(),
            "optimizer": {name: opt.state[p] for name, p in zip(_names(model, params), params) if p in opt.state},
            "weight_average": None if average is None else dict(zip(names, average.state_dict()))}


def start_from_trunk(state: Mapping[str, Any], path: Path, model: Model, opt: torch.optim.Optimizer,
                      average: WeightAverage | None) -> None:
    """Put a branch's model, optimizer and weight average in its trunk's state. The quantizer parameters a BF16
    model lacks (LAC γ) start from their fresh init: empty AdamW state, and their init in the weight average."""
    load_baseline_weights(model, state["model"], f"trunk checkpoint {path}")
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
