"""How the analyses of trained models (:mod:`qatlaw.layer_error`, :mod:`qatlaw.outliers`) are cut into pieces,
the memory and time one analysis job needs, and the gathering of the jobs' tables (torch-free: the Snakefile
and the gather job use it).

A model sees the first ``analysis.tokens`` validation tokens in windows of its ``seq_len``. Its blocks run one at a
time over micro-batches of :func:`micro_batch` windows (about ``CHUNK_TOKENS`` tokens), and the statistics of a
layer's input are taken over chunks of ``CHUNK_TOKENS`` rows: for all tokens only the residual stream and the
four layer inputs of one block are held, never the logits (the LM head is not run). The workflow analyses the
runs of each (size, tokens, seed) cell in one job (one process start-up, about 3 s, per cell rather than per
run) and gathers the cells' tables into one (:func:`gather_runs`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from qatlaw.errors import QatlawError
from qatlaw.grid import CPU_FLOPS_PER_THREAD, GPU_FLOPS_PER_GPU, RunSettings, non_embedding_count
from qatlaw.io import read_parquet, write_parquet

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("qatlaw.analysis_plan")

# where the models of an analysis run
DEVICES = ("cpu", "cuda")
# tokens per forward micro-batch and rows per chunk of a layer input's statistics
CHUNK_TOKENS = 4096
FP32 = 4
# the interpreter, torch and the token shard's pages
BASE_MB = 1000
# what a job costs besides its models (start-up, queueing margin), in minutes
BASE_MINUTES = 5
# statistics work per element of a layer input (fake quantization at every group size, or the kurtosis and the
# selection of the median and top 1%), in CPU FLOPs at CPU_FLOPS_PER_THREAD: up to 60 ns measured on one thread
STAT_FLOPS_PER_ELEMENT = 500
# of which the host's selection of the median and top 1% (numpy partition: 25 ns measured), all a GPU job leaves
# to the CPU
SELECT_FLOPS_PER_ELEMENT = 125
# bytes per element of a chunk's statistics temporaries (float64 moments, fake-quantized copies)
STAT_BYTES_PER_ELEMENT = 48


class AnalysisError(QatlawError):
    """A trained model, the validation tokens or an analysis table cannot be analysed."""


def micro_batch(seq_len: int) -> int:
    """Windows per forward micro-batch: ``CHUNK_TOKENS`` tokens, at least one window."""
    return max(1, CHUNK_TOKENS // seq_len)


def analysed_tokens(n_tokens: int, seq_len: int) -> int:
    """Tokens a model sees of ``n_tokens`` asked for: whole windows only (at most; the shard may be shorter)."""
    return n_tokens // seq_len * seq_len


def layer_input_width(s: RunSettings) -> int:
    """Summed row lengths of one block's four layer inputs (qkv, o, fc1: hidden; fc2: ffn)."""
    return 3 * s.hidden + s.ffn


def memory_bytes(s: RunSettings, vocab_size: int, n_tokens: int, gpu: bool = False) -> int:
    """Peak host memory of analysing one model of ``s`` on ``n_tokens`` tokens, on the CPU or (``gpu``) a GPU.

    Both: the saved weights and the model's copy of them, fp32, and the magnitudes of the widest layer input,
    which the outlier statistics select from on the host. On the CPU also the residual stream and one block's
    layer inputs for every token, the temporaries of one statistics chunk, and one micro-batch's forward
    (the block's activations and causal attention scores of ``heads × seq_len`` per token).
    """
    tokens = analysed_tokens(n_tokens, s.seq_len)
    widest = max(s.hidden, s.ffn)
    params = non_embedding_count(s.layers, s.hidden, s.ffn, s.heads, s.kv_heads) + 2 * vocab_size * s.hidden
    held = 2 * FP32 * params + FP32 * tokens * widest
    if not gpu:
        batch = micro_batch(s.seq_len) * s.seq_len
        forward = FP32 * batch * (8 * s.hidden + 5 * s.ffn + s.heads * s.seq_len)
        held += FP32 * tokens * (s.hidden + layer_input_width(s)) + STAT_BYTES_PER_ELEMENT * CHUNK_TOKENS * widest
        held += forward
    return BASE_MB * 2**20 + held


def seconds(s: RunSettings, n_tokens: int, threads: int = 1, gpu: bool = False) -> float:
    """Seconds to analyse one model of ``s``: the blocks' forward pass (2·N FLOPs per token and the causal
    attention) and ``STAT_FLOPS_PER_ELEMENT`` per layer-input element, on ``threads`` CPU threads; on a GPU the
    forward pass at ``GPU_FLOPS_PER_GPU`` and the host's selection at ``SELECT_FLOPS_PER_ELEMENT`` on one thread."""
    tokens = analysed_tokens(n_tokens, s.seq_len)
    n = non_embedding_count(s.layers, s.hidden, s.ffn, s.heads, s.kv_heads)
    forward = 2 * n * tokens + 2 * s.layers * tokens * s.seq_len * s.hidden
    elements = tokens * s.layers * layer_input_width(s)
    if gpu:
        return forward / GPU_FLOPS_PER_GPU + SELECT_FLOPS_PER_ELEMENT * elements / CPU_FLOPS_PER_THREAD
    return (forward + STAT_FLOPS_PER_ELEMENT * elements) / (CPU_FLOPS_PER_THREAD * threads)


def job_resources(runs: Sequence[RunSettings], vocab_size: int, n_tokens: int, threads: int = 1,
                  gpu: bool = False) -> dict[str, int]:
    """Memory (MB) and runtime (minutes) of one job analysing ``runs`` one after another: the largest model's
    memory, and ``BASE_MINUTES`` plus twice their summed :func:`seconds` (margin for loading the models)."""
    mem = max(memory_bytes(s, vocab_size, n_tokens, gpu) for s in runs)
    total = sum(seconds(s, n_tokens, threads, gpu) for s in runs)
    return {"mem_mb": math.ceil(mem / 2**20), "runtime": BASE_MINUTES + math.ceil(2 * total / 60)}


def gather_runs(part_paths: Sequence[str | Path], run_ids: Sequence[str], out_path: str | Path) -> pd.DataFrame:
    """Concatenate analysis tables of some runs each (one per cell) into one table with the rows of ``run_ids``
    in that order (each run's rows in their order), and write it; every run must be in exactly one part."""
    import numpy as np
    import pandas as pd

    parts = [read_parquet(path, ("run_id",), "analysis table", error=AnalysisError) for path in part_paths]
    if not parts:
        raise AnalysisError("no analysis tables given")
    found: dict[str, str] = {}
    for path, part in zip(part_paths, parts):
        if list(part.columns) != list(parts[0].columns):
            raise AnalysisError(f"{path}: columns {', '.join(part.columns)} differ from those of {part_paths[0]}")
        for run_id in part["run_id"].unique():
            if run_id in found:
                raise AnalysisError(f"{path}: run {run_id} is also in {found[run_id]}")
            found[run_id] = str(path)
    missing = [run_id for run_id in run_ids if run_id not in found]
    if missing:
        raise AnalysisError(f"no analysis table has run {missing[0]} ({len(missing)} of {len(run_ids)} runs missing)")
    order = {run_id: i for i, run_id in enumerate(run_ids)}
    extra = sorted(set(found) - set(order))
    if extra:
        raise AnalysisError(f"{found[extra[0]]}: run {extra[0]} is not one of the runs to gather")
    table = pd.concat(parts, ignore_index=True)
    table = table.iloc[np.argsort(table["run_id"].map(order).to_numpy(), kind="stable")].reset_index(drop=True)
    write_parquet(table, out_path)
    log.info("%d runs from %d tables (%d rows)", len(run_ids), len(parts), len(table))
    return table
