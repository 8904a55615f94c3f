"""The ``input`` section of the benchmark.

``input``
    The training loop's input on a token store of the paper's shape: a uint32 store of ``tokens`` generated ids
    (default 500M: 2 GB, under ``--data-dir``), batches of ``batch`` windows of ``seq_len + 1`` tokens (512 × 2,049,
    config/paper.yaml at 595M). For each world size (1 and 8 ranks), rank 0's wall time per step with the page cache
    emptied before every read (``posix_fadvise(DONTNEED)``: a cold read, as a shared filesystem gives at first
    touch), median of ``steps`` steps: ``whole_ms`` reads the whole batch and keeps the rank's share (how the loop
    read before each rank read only its windows), ``own_ms`` reads the share only (:class:`qatlaw.train.TokenBatches`
    of the rank), and ``prefetch_wait_ms`` is how long :class:`qatlaw.train.Prefetch` leaves the loop waiting for a
    batch while each step computes for ``step_ms``. ``windows_read`` is what rank 0 reads per step, after.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from qatlaw.bench.gpu import PAPER_VOCAB

WORLDS = (1, 8)
_CHUNK = 10_000_000


def _evict(path: Path) -> None:
    """Drop the file's pages from the page cache (clean pages: no privileges needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _store(path: Path, tokens: int) -> Path:
    """A token store of ``tokens`` random ids of the paper's vocabulary at ``path`` (kept when it has that length)."""
    from qatlaw.tokens import open_tokens, token_writer

    if path.is_file() and len(open_tokens(path)) == tokens:
        return path
    rng = np.random.default_rng(0)
    with token_writer(path, PAPER_VOCAB) as writer:
        for start in range(0, tokens, _CHUNK):
            writer.write(rng.integers(0, PAPER_VOCAB, min(_CHUNK, tokens - start)).astype(np.uint32))
    return path


def measure_input(directory: Path, tokens: int = 500_000_000, batch: int = 512, seq_len: int = 2048,
                  steps: int = 20, step_ms: float = 50.0) -> pd.DataFrame:
    """One row per world size (see the module docstring)."""
    from qatlaw.tokens import open_tokens
    from qatlaw.train import Prefetch, TokenBatches

    directory.mkdir(parents=True, exist_ok=True)
    path = _store(directory / "input.npy", tokens)
    store = open_tokens(path)
    rows = []
    for world in WORLDS:
        whole, own = TokenBatches(store, seq_len, batch, 0), TokenBatches(store, seq_len, batch, 0, 0, world)
        before, after, waits = [], [], []
        for step in range(steps):
            _evict(path)
            t0 = time.perf_counter()
            x, y = whole.batch(step)
            x, y = x[0::world], y[0::world]
            before.append(time.perf_counter() - t0)
            _evict(path)
            t0 = time.perf_counter()
            own.batch(steps + step)
            after.append(time.perf_counter() - t0)
        with Prefetch(own, 10**9) as loader:
            for step in range(2 * steps, 3 * steps + 1):
                _evict(path)
                t0 = time.perf_counter()
                loader.get(step)
                waits.append(time.perf_counter() - t0)
                time.sleep(step_ms / 1e3)
        rows.append({"world": world, "batch": batch, "seq_len": seq_len, "windows_read": batch // world,
                     "store_gb": path.stat().st_size / 1e9, "steps": steps, "step_ms": step_ms,
                     "whole_ms": 1e3 * float(np.median(before)), "own_ms": 1e3 * float(np.median(after)),
                     "prefetch_wait_ms": 1e3 * float(np.median(waits[1:]))})
    return pd.DataFrame(rows)
