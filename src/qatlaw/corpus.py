"""Text corpora: documents, the user's corpus files (text, JSON lines, Parquet) and the cleaning of every
document; the built-in sources are in qatlaw.builtin_sources."""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import unicodedata
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from qatlaw.errors import QatlawError


class CorpusError(QatlawError):
    """A corpus source, archive or document file is missing or malformed."""


@dataclass(frozen=True)
class Document:
    """One document of a corpus."""

    source: str
    doc_id: str
    text: str


USER_SOURCE = "user"
# A user file's format, by its suffix: text (one document per file), JSON lines (one per line) or Parquet (one
# per row); JSON lines may be gzip- or zstd-compressed, as Dolma and OLMo-mix shards ship.
_FORMATS = {".txt": "text", ".md": "text", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
_COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}
_USER_SUFFIXES = sorted([*_FORMATS, *(f"{j}{c}" for j in (".jsonl", ".json") for c in _COMPRESSIONS)])


def decode_text(data: bytes, where: str) -> str:
    """UTF-8 bytes (with or without a byte-order mark) as text; CorpusError naming ``where`` for other bytes."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{where}: not UTF-8 text ({e})") from None


# ---------------------------------------------------------------------------
# User sources


def user_file_format(path: Path) -> tuple[str, str | None] | None:
    """(format, compression) of a user corpus file from its suffixes, or None for an unsupported file."""
    suffixes = [x.lower() for x in path.suffixes[-2:]]
    compression = _COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    if compression:
        fmt = _FORMATS.get(suffixes[0]) if len(suffixes) == 2 else None
        return (fmt, compression) if fmt == "jsonl" else None
    fmt = _FORMATS.get(suffixes[-1]) if suffixes else None
    return (fmt, None) if fmt else None


def resolve_user_files(pattern: str) -> list[Path]:
    """The files a user path, glob or directory (relative to the working directory) names, sorted.

    A directory stands for every supported file under it (other files there are skipped); a path or glob must
    name supported files only.
    """
    pattern = os.path.expanduser(pattern)
    if Path(pattern).is_dir():
        files = sorted(p for p in Path(pattern).rglob("*") if p.is_file() and user_file_format(p))
        if not files:
            raise CorpusError(f"corpus directory {pattern!r} holds no supported file ({', '.join(_USER_SUFFIXES)})")
        return files
    files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not files:
        raise CorpusError(f"corpus path {pattern!r} matches no files (relative to {Path.cwd()})")
    bad = [str(f) for f in files if user_file_format(f) is None]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise CorpusError(
            f"corpus path {pattern!r} matches unsupported file {bad[0]}{more}; "
            f"supported: {', '.join(_USER_SUFFIXES)}"
        )
    return files


def _read_text_file(path: Path) -> Iterator[Document]:
    yield Document(USER_SOURCE, str(path), decode_text(path.read_bytes(), str(path)))


def _zstd_blocks(raw: BinaryIO) -> Iterator[bytes]:
    """Decompressed blocks of a zstd file of one or more frames; ZstdError if the last frame is cut short."""
    block = 1 << 20
    dobj = zstandard.ZstdDecompressor().decompressobj()
    started = False
    while chunk := raw.read(block):
        while chunk:
            started = True
            out = dobj.decompress(chunk)
            if out:
                yield out
            chunk = b""
            if dobj.eof:  # a frame ended: the next one starts in its unused data
                chunk, dobj, started = dobj.unused_data, zstandard.ZstdDecompressor().decompressobj(), False
    if started and not dobj.eof:
        raise zstandard.ZstdError("the file ends inside a zstd frame")


def _lines(blocks: Iterable[bytes]) -> Iterator[bytes]:
    rest = b""
    for block in blocks:
        lines = (rest + block).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def _iter_lines(path: Path, compression: str | None) -> Iterator[bytes]:
    """The lines of a file, decompressed on the fly as a stream."""
    with path.open("rb") as raw:
        if compression == "gzip":
            with gzip.GzipFile(fileobj=raw) as stream:
                yield from stream
        elif compression == "zstd":
            yield from _lines(_zstd_blocks(raw))
        else:
            yield from raw


def _read_jsonl(path: Path, text_field: str, compression: str | None = None) -> Iterator[Document]:
    try:
        for lineno, raw in enumerate(_iter_lines(path, compression), start=1):
            line = decode_text(raw, f"{path}:{lineno}").strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise CorpusError(f"{path}:{lineno}: no field {text_field!r} (JSON lines expected)")
            text = record[text_field]
            if not isinstance(text, str):
                raise CorpusError(f"{path}:{lineno}: field {text_field!r} is not a string")
            yield Document(USER_SOURCE, f"{path}:{lineno}", text)
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as exc:
        if compression is None:
            raise CorpusError(f"{path}: unreadable ({exc})") from None
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CorpusError(f"{path}: corrupt or truncated {compression} file ({reason}); download it again") from None


def _read_parquet(path: Path, text_field: str) -> Iterator[Document]:
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise CorpusError(f"{path}: not a readable Parquet file ({e})") from None
    schema = pf.schema_arrow
    if text_field not in schema.names:
        raise CorpusError(
            f"{path}: no column {text_field!r}; columns are {', '.join(schema.names)}"
        )
    if not (pa.types.is_string(schema.field(text_field).type)
            or pa.types.is_large_string(schema.field(text_field).type)):
        raise CorpusError(f"{path}: column {text_field!r} is {schema.field(text_field).type}, not string")
    row = 0
    try:
        for batch in pf.iter_batches(columns=[text_field]):
            for text in batch.column(0).to_pylist():
                if text is None:
                    raise CorpusError(f"{path}: row {row} of column {text_field!r} is null")
                yield Document(USER_SOURCE, f"{path}:{row}", text)
                row += 1
    except (OSError, pa.ArrowException) as e:
        raise CorpusError(f"{path}: corrupt Parquet file after row {row} ({e})") from None


def read_user_file(path: Path, text_field: str = "text") -> Iterator[Document]:
    """Documents of one user file, streamed: .txt/.md (one per file), JSON lines (.jsonl/.json, also .gz or
    .zst compressed; one per record) and .parquet (one per row)."""
    path = Path(path)
    kind = user_file_format(path)
    if kind is None:
        raise CorpusError(f"{path}: unsupported corpus file; supported: {', '.join(_USER_SUFFIXES)}")
    if not path.is_file():
        raise CorpusError(f"{path}: corpus file not found")
    fmt, compression = kind
    if fmt == "text":
        return _read_text_file(path)
    if fmt == "jsonl":
        return _read_jsonl(path, text_field, compression)
    return _read_parquet(path, text_field)


# ---------------------------------------------------------------------------
# Cleaning and Parquet I/O

_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\ufeff]")
_TRAILING_SPACE = re.compile(r"[^\S\n]+$", re.M)
_MANY_BLANK_LINES = re.compile(r"\n{4,}")


def clean_text(text: str) -> str:
    """Text with \\n newlines, no control characters or trailing spaces, at most two blank lines in a row, NFC."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize("NFC", _CONTROL.sub("", text))
    text = _TRAILING_SPACE.sub("", text)
    return _MANY_BLANK_LINES.sub("\n\n\n", text).strip("\n")


def clean_documents(docs: Iterable[Document], min_chars: int, where: str) -> Iterator[Document]:
    """Cleaned documents of at least min_chars characters; CorpusError for a doc_id seen twice in ``where``."""
    seen: set[str] = set()
    for doc in docs:
        if doc.doc_id in seen:
            raise CorpusError(f"{where}: duplicate doc_id {doc.doc_id!r} (source {doc.source!r})")
        seen.add(doc.doc_id)
        text = clean_text(doc.text)
        if len(text) >= min_chars:
            yield Document(doc.source, doc.doc_id, text)
