"""The ``data`` section of the benchmark.

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

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

DATA_CORPUS_TOKENS = (20_000_000, 200_000_000)
DATA_SHARD_TOKENS = 10_000_000


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
