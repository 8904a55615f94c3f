"""How a training or PTQ job runs: the options of ``qatlaw train`` and ``qatlaw ptq`` that make its
:class:`qatlaw.train.Execution` (threads, device, batching; for training also its GPUs, nodes, checkpoints and
compilation), declared once for both."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from qatlaw.cli.argtypes import positive
from qatlaw.config import schema_default, schema_key

if TYPE_CHECKING:
    from qatlaw.train import Execution

# `qatlaw train --activation-checkpointing` values and the training.activation_checkpointing each stands for
CHECKPOINTING_FLAG = {"auto": "auto", "0": False, "1": True}


def add_execution_options(s: argparse.ArgumentParser, training: bool) -> None:
    """The execution options of ``qatlaw train`` (``training``) or ``qatlaw ptq``, in the order of their help."""
    s.add_argument("--threads", type=int, default=schema_default("training", "threads"),
                   help="CPUs of the job (per node): torch threads, shared by the torchrun workers of a node"
                   if training else "torch CPU threads")
    if training:
        s.add_argument("--gpus", type=int, default=schema_default("training", "gpus_per_run"),
                       help="GPUs; above 1, rerun under torchrun, data parallel")
        s.add_argument("--stop-seconds", type=int, default=schema_default("training", "stop_seconds"),
                       help="seconds torchrun gives its workers after a stop signal to write their checkpoint")
        s.add_argument("--nodes", type=int, default=1,
                       help="nodes the GPUs span; above 1, one torchrun per node under srun (in a SLURM job)")
    s.add_argument("--device", choices=schema_key("training", "device")["enum"],
                   default=schema_default("training", "device"))
    if training:
        s.add_argument("--checkpoint-every", type=int, default=schema_default("training", "checkpoint_every"),
                       help="optimizer steps between checkpoints")
        s.add_argument("--checkpoint-minutes", type=positive, default=schema_default("training", "checkpoint_minutes"),
                       help="minutes of wall time between checkpoints")
        s.add_argument("--compile", type=int, choices=[0, 1], default=int(schema_default("training", "compile")),
                       help="1: torch.compile the model")
    s.add_argument("--micro-batch-size", type=int, default=schema_default("training", "micro_batch_size") or 0,
                   help="sequences per forward/backward pass (gradient accumulation); 0: the whole batch"
                   if training else "validation windows per forward pass; 0: the batch size")
    s.add_argument("--loss-chunk-tokens", type=int, default=schema_default("training", "loss_chunk_tokens") or 0,
                   help="tokens whose logits and loss are computed at a time; 0: all at once")
    if training:
        s.add_argument("--activation-checkpointing", choices=list(CHECKPOINTING_FLAG),
                       default=next(k for k, v in CHECKPOINTING_FLAG.items()
                                    if v == schema_default("training", "activation_checkpointing")),
                       help="1: recompute each block's activations in the backward pass; auto: only on a GPU that "
                            "does not fit one sequence per micro-batch without it")


def execution_of(args: argparse.Namespace, threads: int) -> Execution:
    """The Execution of the options :func:`add_execution_options` gave ``args``, with ``threads`` torch threads."""
    from qatlaw import train

    options = {"threads": threads, "device": args.device, "micro_batch_size": args.micro_batch_size or None,
               "loss_chunk_tokens": args.loss_chunk_tokens or None}
    if "compile" in args:  # the training options
        options.update(checkpoint_every=args.checkpoint_every, checkpoint_minutes=args.checkpoint_minutes,
                       compile=bool(args.compile),
                       activation_checkpointing=CHECKPOINTING_FLAG[args.activation_checkpointing])
    return train.Execution(**options)
