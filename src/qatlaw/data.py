"""Tokenization stage: byte-level BPE, a seeded split by document, token shards and their manifest.

Shard schema (``train.parquet``, ``val.parquet``): one row per token, in corpus order, with columns
``token`` (uint16, or uint32 when the vocabulary exceeds 65,536) and ``doc`` (uint32, the document's index
in ``documents.parquet``). Every document ends with the end-of-text token, so documents never run together.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from qatlaw.corpus import read_documents
from qatlaw.errors import QatlawError
from qatlaw.io import atomic_path, write_json, write_parquet

EOS = "<|endoftext|>"
SHARD_COLUMNS = ("token", "doc")
SHARD_SCHEMA = "token (uint16/uint32), doc (uint32)"
_ENCODE_CHUNK = 512


class DataError(QatlawError):
    """Token data is missing, corrupt or too small for what was asked."""


def split_documents(docs: pd.DataFrame, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation documents, stratified by source and stable under reordering.

    A document is held out when a seeded hash of (source, doc_id) falls below ``val_fraction``; every
    source with at least two documents keeps at least one document on each side.
    """
    if len(docs) < 2:
        raise DataError(f"need at least 2 documents to split into train and validation, got {len(docs)}")
    keys = (f"{seed}\0{s}\0{d}".encode() for s, d in zip(docs["source"], docs["doc_id"], strict=True))
    u = np.array([int.from_bytes(hashlib.blake2b(k, digest_size=8).digest(), "little") for k in keys], dtype=np.uint64)
    u = u / np.float64(2**64)
    is_val = u < val_fraction
    for rows in pd.Series(np.arange(len(docs))).groupby(docs["source"].to_numpy()).groups.values():
        rows = np.asarray(rows)
        if len(rows) < 2:
            continue
        if not is_val[rows].any():
            is_val[rows[np.argmin(u[rows])]] = True
        if is_val[rows].all():
            is_val[rows[np.argmax(u[rows])]] = False
    if not is_val.any():
        is_val[np.argmin(u)] = True
    return is_val


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE tokenizer whose id 0 is the end-of-text token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode(tok: Tokenizer, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of all texts, each followed by end-of-text, and the per-text token counts (EOS included)."""
    eos = tok.token_to_id(EOS)
    parts: list[np.ndarray] = []
    counts = np.zeros(len(texts), dtype=np.int64)
    for start in range(0, len(texts), _ENCODE_CHUNK):
        chunk = tok.encode_batch(list(texts[start : start + _ENCODE_CHUNK]), add_special_tokens=False)
        for j, enc in enumerate(chunk):
            ids = np.fromiter(enc.ids, dtype=np.int64, count=len(enc.ids))
            parts.append(np.append(ids, eos))
            counts[start + j] = len(ids) + 1
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return tokens, counts


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned integer type that holds every id of the vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def write_shard(tokens: np.ndarray, doc: np.ndarray, path: Path, vocab_size: int) -> None:
    """Write one token shard atomically."""
    table = pa.table(
        {
            "token": pa.array(tokens.astype(token_dtype(vocab_size), copy=False)),
            "doc": pa.array(doc.astype(np.uint32, copy=False)),
        }
    )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def load_tokens(path: str | Path, vocab_size: int | None = None) -> np.ndarray:
    """Token column of a shard as an array; clear DataError for a corrupt file, a wrong schema or bad ids."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: token shard not found (expected a Parquet file with columns {SHARD_SCHEMA})")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"{path}: not a readable Parquet token shard ({reason}); expected columns {SHARD_SCHEMA}") from None
    if tuple(table.column_names) != SHARD_COLUMNS or not pa.types.is_unsigned_integer(table.schema.field("token").type):
        got = ", ".join(f"{f.name} ({f.type})" for f in table.schema) or "no columns"
        raise DataError(f"{path}: expected columns {SHARD_SCHEMA}; got {got}")
    tokens = table.column("token").to_numpy()
    if vocab_size is not None and len(tokens) and int(tokens.max()) >= vocab_size:
        raise DataError(f"{path}: token id {int(tokens.max())} is out of range for vocabulary size {vocab_size} "
                        "(a shard from another tokenizer?)")
    return tokens


def corpus_checksum(docs: pd.DataFrame) -> str:
    """SHA-256 over every document's source, id and text, in order."""
    h = hashlib.sha256()
    for s, d, t in zip(docs["source"], docs["doc_id"], docs["text"], strict=True):
        for field in (s, d, t):
            b = field.encode()
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    return h.hexdigest()


def tokenize_corpus(
    document_files: Sequence[str | Path],
    *,
    tokenizer_path: str | Path,
    train_path: str | Path,
    val_path: str | Path,
    documents_path: str | Path,
    manifest_path: str | Path,
    vocab_size: int,
    min_frequency: int,
    val_fraction: float,
    seed: int,
) -> dict[str, Any]:
    """Train the tokenizer on the training documents, write both shards, the document table and the manifest.

    The manifest is written last, so its presence means every other output is complete.
    """
    docs = pd.concat([read_documents(Path(p)) for p in document_files], ignore_index=True)
    if docs.duplicated(["source", "doc_id"]).any():
        dup = docs[docs.duplicated(["source", "doc_id"])].iloc[0]
        raise DataError(f"document ({dup['source']}, {dup['doc_id']}) appears twice in the corpus")
    is_val = split_documents(docs, val_fraction, seed)
    tok = train_tokenizer((t for t in docs["text"][~is_val]), vocab_size, min_frequency)
    if tok.get_vocab_size() != vocab_size:
        raise DataError(
            f"data.vocab_size: the corpus supports only {tok.get_vocab_size()} BPE tokens, fewer than the {vocab_size} asked for"
        )
    tokens, counts = encode(tok, docs["text"].tolist())
    doc_index = np.repeat(np.arange(len(docs), dtype=np.uint32), counts)
    token_is_val = np.repeat(is_val, counts)
    write_shard(tokens[~token_is_val], doc_index[~token_is_val], Path(train_path), vocab_size)
    write_shard(tokens[token_is_val], doc_index[token_is_val], Path(val_path), vocab_size)

    table = pd.DataFrame(
        {
            "doc": np.arange(len(docs), dtype=np.uint32),
            "source": docs["source"],
            "doc_id": docs["doc_id"],
            "split": np.where(is_val, "val", "train"),
            "chars": docs["text"].str.len().astype(np.int64),
            "tokens": counts,
        }
    )
    write_parquet(table, documents_path)
    with atomic_path(tokenizer_path) as tmp:
        tok.save(str(tmp))

    def split_stats(mask: np.ndarray) -> dict[str, int]:
        return {"documents": int(mask.sum()), "tokens": int(counts[mask].sum()), "chars": int(table["chars"][mask].sum())}

    manifest = {
        "vocab_size": vocab_size,
        "eos_id": tok.token_to_id(EOS),
        "token_dtype": token_dtype(vocab_size).name,
        "split_seed": seed,
        "val_fraction": val_fraction,
        "corpus_sha256": corpus_checksum(docs),
        "tokenizer_sha256": hashlib.sha256(Path(tokenizer_path).read_bytes()).hexdigest(),
        "splits": {"train": split_stats(~is_val), "val": split_stats(is_val)},
        "sources": {
            str(src): {
                "documents": int(len(g)),
                "chars": int(g["chars"].sum()),
                "train_tokens": int(g["tokens"][g["split"] == "train"].sum()),
                "val_tokens": int(g["tokens"][g["split"] == "val"].sum()),
            }
            for src, g in table.groupby("source", sort=True)
        },
        "chars_per_token": round(float(table["chars"].sum() / max(1, counts.sum())), 4),
    }
    write_json(manifest, manifest_path)
    return manifest


def check_budgets(manifest: Mapping[str, Any], budgets: Iterable[int], allow_repeat: bool) -> dict[int, float]:
    """Epochs over the training split that each token budget needs; DataError if data would repeat unasked."""
    available = int(manifest["splits"]["train"]["tokens"])
    epochs = {int(b): b / available for b in sorted(set(budgets))}
    too_big = [b for b, e in epochs.items() if e > 1]
    if too_big and not allow_repeat:
        raise DataError(
            f"grid.tokens: budget {max(too_big):,} exceeds the {available:,} training tokens of the corpus "
            f"({math.ceil(max(too_big) / available)} epochs); add data.sources or set data.allow_repeat: true"
        )
    return epochs
