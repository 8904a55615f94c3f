"""Data stage: the tokenizer, a seeded split by document, tokenization shard by shard, and the gather.

A corpus is a list of shards, each one input file (a built-in source's package archive, or one of the user's
files) read as a stream. Stages:

1. tokenizer: a byte-level BPE trained on a bounded, seeded sample of the training documents (``data.
   tokenizer_sample_mb``), or the user's HF ``tokenizers`` file (``data.tokenizer``);
2. one tokenize job per shard (or per ``data.shards_per_job`` shards): every cleaned document's ids and
   end-of-text, in order, into a token file, and one row per document (source, id, characters, tokens and its
   split draw) into a document table;
3. gather: the split by document (a seeded hash of (source, doc_id), stratified by source), then the training
   and validation token stores (:mod:`qatlaw.tokens`) in corpus order, the document table and the manifest.

The split and every token depend only on the documents, never on how they are grouped into jobs, so any
``shards_per_job`` gives the same stores.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import shutil
import time
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from qatlaw import builtin_sources, corpus
from qatlaw.corpus import Document
from qatlaw.errors import QatlawError
from qatlaw.io import atomic_path, write_json
from qatlaw.tokens import DataError, TokenWriter, open_tokens, token_dtype, token_writer

EOS = "<|endoftext|>"
# End-of-text tokens looked for in a user's tokenizer (data.eos_token: null): GPT-2/OLMo, Llama-3, SentencePiece.
EOS_CANDIDATES = (EOS, "<|end_of_text|>", "</s>", "<eos>")
DOC_COLUMNS = ("source", "doc_id", "chars", "tokens", "u")
_DOC_SCHEMA = pa.schema([("source", pa.string()), ("doc_id", pa.string()), ("chars", pa.int64()),
                         ("tokens", pa.int64()), ("u", pa.float64())])
_ENCODE_CHUNK = 512
_COPY_TOKENS = 1 << 24
_BATCH_CHARS = 1 << 21


# ------------------------------------------------------------------------------------------------ shards
@dataclass(frozen=True)
class Shard:
    """One input file of the corpus and the source it belongs to (a built-in name, or user1, user2, ...)."""

    source: str
    path: str

    @classmethod
    def parse(cls, spec: str) -> Shard:
        """A shard from ``SOURCE=PATH``."""
        source, sep, path = spec.partition("=")
        if not sep or not source or not path:
            raise QatlawError(f"shard {spec!r}: expected SOURCE=PATH")
        return cls(source, path)

    def spec(self) -> str:
        """The shard as ``SOURCE=PATH`` (the command-line form)."""
        return f"{self.source}={self.path}"

    def documents(self, text_field: str, min_chars: int) -> Iterator[Document]:
        """The shard's cleaned documents of at least ``min_chars`` characters, streamed, labelled with its source."""
        if self.source in builtin_sources.BUILTIN_SOURCES:
            docs = builtin_sources.read_builtin(self.source, Path(self.path))
        else:
            docs = (Document(self.source, d.doc_id, d.text) for d in corpus.read_user_file(Path(self.path), text_field))
        return corpus.clean_documents(docs, min_chars, self.path)


def corpus_documents(shards: Sequence[Shard], text_field: str, min_chars: int) -> Iterator[Document]:
    """Every shard's documents, in corpus order."""
    for shard in shards:
        yield from shard.documents(text_field, min_chars)


# ------------------------------------------------------------------------------------------------- split
def split_draw(seed: int, source: str, doc_id: str) -> float:
    """A document's uniform draw in [0, 1): it is held out for validation when below ``val_fraction``."""
    digest = hashlib.blake2b(f"{seed}\0{source}\0{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def finalize_split(sources: Sequence[str] | np.ndarray, u: np.ndarray, val_fraction: float) -> np.ndarray:
    """Boolean mask of validation documents from their draws, stratified by source.

    A document is held out when its draw falls below ``val_fraction``; every source with at least two
    documents keeps at least one document on each side (its lowest draw held out, its highest kept).
    """
    u = np.asarray(u, dtype=np.float64)
    if len(u) < 2:
        raise DataError(f"need at least 2 documents to split into train and validation, got {len(u)}")
    is_val = u < val_fraction
    codes = pd.Categorical(np.asarray(sources)).codes
    order = np.lexsort((u, codes))  # by source, then draw: each source's lowest and highest draws at its ends
    first = np.r_[True, codes[order][1:] != codes[order][:-1]]
    starts, ends = np.flatnonzero(first), np.r_[np.flatnonzero(first)[1:], len(order)] - 1
    for a, b in zip(starts, ends, strict=True):
        if a == b:
            continue
        rows = order[a : b + 1]
        if not is_val[rows].any():
            is_val[order[a]] = True
        if is_val[rows].all():
            is_val[order[b]] = False
    if not is_val.any():
        is_val[np.argmin(u)] = True
    return is_val


# --------------------------------------------------------------------------------------------- tokenizer
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


def vocab_size_of(tok: Tokenizer) -> int:
    """Ids a model needs for this tokenizer: its largest id (added tokens included) plus one."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def eos_id(tok: Tokenizer, eos_token: str | None, where: str) -> int:
    """Id of the end-of-text token (``eos_token``, or the first of EOS_CANDIDATES the tokenizer has)."""
    names = [eos_token] if eos_token else list(EOS_CANDIDATES)
    for name in names:
        token = tok.token_to_id(name)
        if token is not None:
            return token
    hint = "" if eos_token else "; set data.eos_token to its end-of-text token"
    raise DataError(f"{where}: the tokenizer has no end-of-text token {' or '.join(map(repr, names))}{hint}")


def load_tokenizer(path: str | Path, vocab_size: int | None = None, eos_token: str | None = None) -> Tokenizer:
    """A user's HF ``tokenizers`` JSON file, checked: readable, with an end-of-text token and, when
    ``vocab_size`` is given, exactly that vocabulary size."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: tokenizer file not found (expected an HF tokenizers JSON file, tokenizer.json)")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust library raises plain Exception for every parse error
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"{path}: not a readable HF tokenizers file ({reason})") from None
    eos_id(tok, eos_token, str(path))
    if vocab_size is not None and vocab_size != vocab_size_of(tok):
        raise DataError(f"{path}: the tokenizer has {vocab_size_of(tok):,} ids but data.vocab_size is {vocab_size:,}; "
                        "remove data.vocab_size (a tokenizer file sets it)")
    return tok


def tokenizer_sample(docs: Iterable[Document], budget_bytes: int, val_fraction: float,
                     seed: int) -> tuple[list[str], dict]:
    """Texts of a seeded sample of the training documents of at most ``budget_bytes`` UTF-8 bytes, in corpus
    order, and what was sampled.

    Each training document gets a seeded priority; the sample is the documents of lowest priority up to the first
    that would exceed the budget (all of them when the corpus is smaller), so it does not depend on the order
    shards are read in.
    The split is the final one of :func:`finalize_split`.
    """
    heap: list[tuple[float, int, str, int]] = []  # (-priority, index, text, bytes): the worst kept on top
    total, cutoff = 0, math.inf  # the lowest priority evicted: nothing at or above it is kept
    codes: dict[str, int] = {}
    sources, draws = array("q"), array("d")  # every document's source and draw: 16 bytes a document
    top_val: dict[str, tuple[float, int, Document]] = {}  # each source's held-out document of highest draw

    def offer(index: int, text: str, size: int, priority: float) -> None:
        nonlocal total, cutoff
        if priority >= cutoff:
            return
        heapq.heappush(heap, (-priority, index, text, size))
        total += size
        while total > budget_bytes:
            worst, _, _, freed = heapq.heappop(heap)
            total -= freed
            cutoff = -worst

    def priority(doc: Document) -> float:
        return split_draw(seed, f"tokenizer\0{doc.source}", doc.doc_id)

    seen = 0
    for index, doc in enumerate(docs):
        u = split_draw(seed, doc.source, doc.doc_id)
        sources.append(codes.setdefault(doc.source, len(codes)))
        draws.append(u)
        size = len(doc.text.encode("utf-8"))
        seen += size
        if u >= val_fraction:
            offer(index, doc.text, size, priority(doc))
        elif doc.source not in top_val or u > top_val[doc.source][0]:
            top_val[doc.source] = (u, index, doc)
    is_val = finalize_split(np.frombuffer(sources, dtype=np.int64) if sources else np.zeros(0, np.int64),
                            np.frombuffer(draws) if draws else np.zeros(0), val_fraction)
    for _, index, doc in top_val.values():  # a source all held out gives its highest draw to training
        if not is_val[index]:
            offer(index, doc.text, len(doc.text.encode("utf-8")), priority(doc))
    kept = sorted((index, text, size) for _, index, text, size in heap if not is_val[index])
    info = {"documents": len(kept), "bytes": sum(size for _, _, size in kept),
            "corpus_documents": len(draws), "corpus_bytes": seen}
    return [text for _, text, _ in kept], info


def build_tokenizer(
    shards: Sequence[Shard], out_path: str | Path, *, vocab_size: int, min_frequency: int, sample_bytes: int,
    val_fraction: float, seed: int, text_field: str, min_chars: int,
) -> dict[str, Any]:
    """Train the BPE on a sample of the training documents and save it atomically; return what was sampled."""
    texts, info = tokenizer_sample(corpus_documents(shards, text_field, min_chars), sample_bytes, val_fraction, seed)
    tok = train_tokenizer(texts, vocab_size, min_frequency)
    if tok.get_vocab_size() != vocab_size:
        raise DataError(f"data.vocab_size: the corpus supports only {tok.get_vocab_size()} BPE tokens, fewer than "
                        f"the {vocab_size} asked for")
    with atomic_path(out_path) as tmp:
        tok.save(str(tmp))
    return info


def copy_tokenizer(src: str | Path, out_path: str | Path, vocab_size: int | None,
                   eos_token: str | None) -> dict[str, Any]:
    """Check a user's tokenizer file and copy it, byte for byte, as the workflow's tokenizer; return its
    vocabulary size and end-of-text id."""
    tok = load_tokenizer(src, vocab_size, eos_token)
    with atomic_path(out_path) as tmp:
        shutil.copyfile(src, tmp)
    return {"vocab_size": vocab_size_of(tok), "eos_id": eos_id(tok, eos_token, str(src))}


# ------------------------------------------------------------------------------------------------ encode
def encode(tok: Tokenizer, texts: Sequence[str], eos: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of all texts, each followed by end-of-text, and the per-text token counts (EOS included)."""
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


def _batches(docs: Iterable[Document], max_docs: int, max_chars: int) -> Iterator[list[Document]]:
    """Documents in batches of at most ``max_docs`` documents or about ``max_chars`` characters (encodings of
    a batch take ~200 bytes per token while they live)."""
    batch: list[Document] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc.text)
        if len(batch) == max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _update_corpus_hash(h: Any, doc: Document) -> None:
    for field in (doc.source, doc.doc_id, doc.text):
        b = field.encode()
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)


def tokenize_shards(
    shards: Sequence[Shard], *, tokenizer_path: str | Path, tokens_path: str | Path, docs_path: str | Path,
    text_field: str, min_chars: int, seed: int, eos_token: str | None = None,
) -> dict[str, Any]:
    """Tokenize shards (one job's worth) into a token file and a document table, both written atomically.

    The token file holds every document's ids and end-of-text in order; the table (columns DOC_COLUMNS) has one
    row per document, and its Parquet metadata the job's counts and checksums. Returns that summary.
    """
    started = time.perf_counter()
    tok = Tokenizer.from_file(str(tokenizer_path))
    eos, vocab = eos_id(tok, eos_token, str(tokenizer_path)), vocab_size_of(tok)
    corpus_hash = hashlib.sha256()
    chars = 0
    with token_writer(tokens_path, vocab) as writer, atomic_path(docs_path) as tmp_docs:
        with pq.ParquetWriter(tmp_docs, _DOC_SCHEMA) as table_writer:
            for batch in _batches(corpus_documents(shards, text_field, min_chars), _ENCODE_CHUNK * 8, _BATCH_CHARS):
                ids, counts = encode(tok, [d.text for d in batch], eos)
                writer.write(ids)
                for doc in batch:
                    _update_corpus_hash(corpus_hash, doc)
                lengths = [len(d.text) for d in batch]
                chars += sum(lengths)
                table_writer.write_table(pa.table({
                    "source": [d.source for d in batch], "doc_id": [d.doc_id for d in batch],
                    "chars": pa.array(lengths, pa.int64()), "tokens": pa.array(counts, pa.int64()),
                    "u": pa.array([split_draw(seed, d.source, d.doc_id) for d in batch], pa.float64()),
                }, schema=_DOC_SCHEMA))
            summary = {"shards": [s.spec() for s in shards], "corpus_sha256": corpus_hash.hexdigest(),
                       "chars": chars, "encode_s": round(time.perf_counter() - started, 3), **writer.summary()}
            table_writer.add_key_value_metadata({"qatlaw": json.dumps(summary)})
    return summary


# ------------------------------------------------------------------------------------------------ gather
def _doc_table(path: Path, columns: Sequence[str] = DOC_COLUMNS) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Some columns of a tokenize job's document table, and the job's summary from its metadata."""
    expected = ", ".join(DOC_COLUMNS)
    try:
        pf = pq.ParquetFile(path, read_dictionary=["source"])
        names = tuple(pf.schema_arrow.names)
        summary = json.loads((pf.metadata.metadata or {})[b"qatlaw"])
        if names != DOC_COLUMNS:
            raise DataError(f"{path}: expected columns {expected}; got {', '.join(names)}")
        table = pf.read(columns=list(columns)).to_pandas()
    except (OSError, pa.ArrowException, KeyError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"{path}: not a document table of a tokenize job ({reason}); "
                        f"expected columns {expected}") from None
    return table, summary


def _copy_runs(tokens: np.ndarray, counts: np.ndarray, is_val: np.ndarray, writers: Mapping[bool, TokenWriter]) -> None:
    """Append each maximal run of consecutive same-split documents' tokens to that split's store."""
    offsets = np.r_[0, np.cumsum(counts)]
    change = np.flatnonzero(np.r_[True, is_val[1:] != is_val[:-1]])
    for a, b in zip(change, np.r_[change[1:], len(counts)], strict=True):
        lo, hi = int(offsets[a]), int(offsets[b])
        for start in range(lo, hi, _COPY_TOKENS):
            writers[bool(is_val[a])].write(np.asarray(tokens[start : min(hi, start + _COPY_TOKENS)]))


# gather's memory: Python, pyarrow and one job's document table, plus the split's arrays per document of the corpus
# (its source code, draw and split flag, and their concatenations): peak RSS grew by 55-56 bytes a document from 80K
# to 4M and 10M documents in 80 jobs (measured on CPU); 64 allowed
GATHER_BASE_MB = 2000
GATHER_BYTES_PER_DOCUMENT = 64


def gather_memory_mb(doc_tables: Sequence[str | Path]) -> int:
    """Memory (MB) that gather needs for the corpus of these tokenize jobs' document tables, from their row counts
    (Parquet metadata: nothing else is read); while some are not written yet (a dry run), the base alone."""
    paths = [Path(p) for p in doc_tables]
    if not paths or not all(p.is_file() for p in paths):
        return GATHER_BASE_MB
    documents = sum(pq.ParquetFile(p).metadata.num_rows for p in paths)
    return GATHER_BASE_MB + math.ceil(GATHER_BYTES_PER_DOCUMENT * documents / 1e6)


def gather(
    jobs: Sequence[tuple[str | Path, str | Path]], *, tokenizer_path: str | Path, train_path: str | Path,
    val_path: str | Path, documents_path: str | Path, manifest_path: str | Path, val_fraction: float, seed: int,
    eos_token: str | None = None,
) -> dict[str, Any]:
    """Split the tokenized corpus by document and write the two token stores, the document table and the manifest.

    ``jobs`` are the (token file, document table) pairs of the tokenize jobs in corpus order. The manifest is
    written last, so its presence means every other output is complete.
    """
    tok = Tokenizer.from_file(str(tokenizer_path))
    vocab = vocab_size_of(tok)
    # the split needs every document's source and draw (9 bytes a document); the rest is read job by job
    draws = [_doc_table(Path(docs), ("source", "u")) for _, docs in jobs]
    summaries = [summary for _, summary in draws]
    sizes = [len(table) for table, _ in draws]
    names: dict[str, int] = {}
    codes = [np.array([names.setdefault(str(c), len(names)) for c in t["source"].cat.categories], dtype=np.int64)
             [t["source"].cat.codes.to_numpy()] for t, _ in draws]
    is_val = finalize_split(np.concatenate(codes), np.concatenate([t["u"].to_numpy() for t, _ in draws]), val_fraction)
    del draws
    sources: dict[str, dict[str, int]] = {}
    chars = {"train": 0, "val": 0}
    table_schema = pa.schema([("doc", pa.int64()), ("source", pa.string()), ("doc_id", pa.string()),
                              ("split", pa.string()), ("chars", pa.int64()), ("tokens", pa.int64())])
    with token_writer(train_path, vocab) as train_w, token_writer(val_path, vocab) as val_w, \
            atomic_path(documents_path) as tmp_docs, pq.ParquetWriter(tmp_docs, table_schema) as doc_writer:
        start = 0
        for (tokens_path, docs_path), size in zip(jobs, sizes, strict=True):
            table, summary = _doc_table(Path(docs_path))
            tokens = open_tokens(tokens_path)
            counts = table["tokens"].to_numpy()
            if len(table) != size or len(tokens) != counts.sum() or len(tokens) != summary["tokens"]:
                raise DataError(f"{tokens_path}: {len(tokens):,} tokens, but {docs_path} lists {int(counts.sum()):,}; "
                                "rerun that tokenize job")
            job_val = is_val[start : start + size]
            _copy_runs(tokens, counts, job_val, {False: train_w, True: val_w})
            split = np.where(job_val, "val", "train")
            doc_writer.write_table(pa.table({
                "doc": np.arange(start, start + size, dtype=np.int64), "source": table["source"].to_numpy(dtype=object),
                "doc_id": table["doc_id"].to_numpy(dtype=object), "split": split, "chars": table["chars"].to_numpy(),
                "tokens": counts}, schema=table_schema))
            for (src, part), g in table.assign(split=split).groupby(["source", "split"], sort=True):
                entry = sources.setdefault(str(src), {"documents": 0, "chars": 0, "train_tokens": 0, "val_tokens": 0})
                entry["documents"] += len(g)
                entry["chars"] += int(g["chars"].sum())
                entry[f"{part}_tokens"] += int(g["tokens"].sum())
                chars[part] += int(g["chars"].sum())
            start += size

    def split_stats(mask: np.ndarray, part: str, writer: TokenWriter) -> dict[str, Any]:
        return {"documents": int(mask.sum()), "chars": chars[part], **writer.summary()}

    corpus_hash = hashlib.sha256("".join(s["corpus_sha256"] for s in summaries).encode()).hexdigest()
    manifest = {
        "vocab_size": vocab,
        "eos_id": eos_id(tok, eos_token, str(tokenizer_path)),
        "token_dtype": token_dtype(vocab).name,
        "split_seed": seed,
        "val_fraction": val_fraction,
        "corpus_sha256": corpus_hash,
        "tokenizer_sha256": hashlib.sha256(Path(tokenizer_path).read_bytes()).hexdigest(),
        "splits": {"train": split_stats(~is_val, "train", train_w), "val": split_stats(is_val, "val", val_w)},
        "stores": {"train": Path(train_path).name, "val": Path(val_path).name},
        "sources": dict(sorted(sources.items())),
        "jobs": [{"shards": s["shards"], "documents": n, "tokens": s["tokens"], "sha256": s["sha256"],
                  "corpus_sha256": s["corpus_sha256"], "encode_s": s["encode_s"]}
                 for s, n in zip(summaries, sizes, strict=True)],
        "chars_per_token": round((chars["train"] + chars["val"]) / max(1, train_w.count + val_w.count), 4),
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


def tokenize_jobs(sources: Mapping[str, str], shards_per_job: int = 1) -> dict[str, list[Shard]]:
    """The tokenize jobs of a corpus, in corpus order: job name -> its shards.

    ``sources`` maps each source id to its spec (see :func:`qatlaw.config.source_ids`). A built-in source is one
    shard, its package archive (job named after the source); a user source is one shard per file, grouped
    ``shards_per_job`` consecutive files to a job named ``<source>-<first file's index, 5 digits>``.
    """
    jobs: dict[str, list[Shard]] = {}
    for source, spec in sources.items():
        if spec in builtin_sources.BUILTIN_SOURCES:
            jobs[source] = [Shard(source, f"resources/corpus/{source}.pkg")]
            continue
        files = [Shard(source, str(p)) for p in corpus.resolve_user_files(spec)]
        for i in range(0, len(files), shards_per_job):
            jobs[f"{source}-{i:05d}"] = files[i : i + shards_per_job]
    return jobs
