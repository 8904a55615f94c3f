"""The token store: one flat array of token ids per split, a NumPy ``.npy`` file that training reads lazily.

Every document's tokens are followed by the end-of-text token, in corpus order, so documents never run
together and no per-token document index is needed. Ids are ``uint16`` up to a vocabulary of 65,536 and
``uint32`` above. A store is written by streaming through :func:`token_writer` (ids checked against the
vocabulary once, here) and read with :func:`open_tokens`, which neither loads nor maps it: training reads only
the windows of each batch, one ``pread`` each.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from qatlaw.errors import QatlawError
from qatlaw.io import atomic_path

STORE_FORMAT = "a 1-D .npy array of uint16/uint32 token ids"


class DataError(QatlawError):
    """Token data is missing, corrupt or too small for what was asked."""


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned integer type that holds every id of the vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _header(dtype: np.dtype, n: int) -> dict[str, Any]:
    return {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n,)}


class TokenWriter:
    """Appends token ids to an open store file (see :func:`token_writer`), checking each against the vocabulary;
    tracks the count, the largest id and a SHA-256 of the ids' bytes."""

    def __init__(self, file: BinaryIO, path: Path, vocab_size: int):
        self.path = path
        self.vocab_size = vocab_size
        self.dtype = token_dtype(vocab_size).newbyteorder("<")
        self.count = 0
        self.max_token = -1
        self._file = file
        self._sha = hashlib.sha256()

    def write(self, ids: np.ndarray) -> None:
        """Append ids; DataError (one line naming the store) if one is outside the vocabulary."""
        if not len(ids):
            return
        top, low = int(ids.max()), int(ids.min())
        if top >= self.vocab_size or low < 0:
            raise DataError(f"{self.path}: token id {top if top >= self.vocab_size else low} is out of range for "
                            f"vocabulary size {self.vocab_size} (a tokenizer whose ids exceed its vocabulary?)")
        data = np.ascontiguousarray(ids, dtype=self.dtype).tobytes()
        self._file.write(data)
        self._sha.update(data)
        self.count += len(ids)
        self.max_token = max(self.max_token, top)

    def summary(self) -> dict[str, Any]:
        """Count, largest id and SHA-256 (of the little-endian ids) of what was written."""
        return {"tokens": self.count, "max_token": self.max_token, "sha256": self._sha.hexdigest()}


@contextmanager
def token_writer(path: str | Path, vocab_size: int) -> Iterator[TokenWriter]:
    """A writer of a new store that appears under its name only when the block ends cleanly.

    The ``.npy`` header is written first with length 0 and rewritten in place at the end (NumPy pads headers so
    that a 1-D shape can grow without moving the data).
    """
    path = Path(path)
    dtype = token_dtype(vocab_size).newbyteorder("<")
    with atomic_path(path) as tmp, tmp.open("wb") as file:
        np.lib.format.write_array_header_1_0(file, _header(dtype, 0))
        offset = file.tell()
        writer = TokenWriter(file, path, vocab_size)
        yield writer
        file.seek(0)
        np.lib.format.write_array_header_1_0(file, _header(dtype, writer.count))
        if file.tell() != offset:
            raise DataError(f"{path}: .npy header grew from {offset} to {file.tell()} bytes")


def write_tokens(ids: np.ndarray, path: str | Path, vocab_size: int) -> dict[str, Any]:
    """Write a whole array as a store; return its count, largest id and checksum."""
    with token_writer(path, vocab_size) as writer:
        writer.write(np.asarray(ids))
    return writer.summary()


class TokenStore:
    """A token store open for reading: its length and id type, and reads of slices and windows from the file.

    Nothing is loaded or mapped: each read is one ``pread`` into a new array, so a training job's memory does
    not grow with the store (a memory map's pages, which the kernel may map a large folio at a time, would
    count towards the job's RSS as it reads).
    """

    def __init__(self, path: Path, length: int, dtype: np.dtype, offset: int):
        self.path, self.dtype, self._offset, self._length = path, dtype, offset, length
        self._file = path.open("rb")

    def __len__(self) -> int:
        return self._length

    def _read(self, start: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=self.dtype)
        view, done = memoryview(out).cast("B"), 0
        while done < len(view):
            got = os.preadv(self._file.fileno(), [view[done:]], self._offset + start * self.dtype.itemsize + done)
            if got <= 0:
                raise DataError(f"{self.path}: the store ends before token {start + count:,} "
                                "(truncated since it was opened?)")
            done += got
        return out

    def __getitem__(self, key: slice) -> np.ndarray:
        """The ids of a slice (step 1), read from the file."""
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a token store is read by contiguous slices (and windows(); see read_windows)")
        start, stop, _ = key.indices(self._length)
        return self._read(start, max(0, stop - start))

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Rows of ``length`` ids from each start, shape (len(starts), length)."""
        if len(starts) and (int(np.min(starts)) < 0 or int(np.max(starts)) + length > self._length):
            raise IndexError(f"{self.path}: a window of {length} outside the store's {self._length:,} tokens")
        return np.stack([self._read(int(start), length) for start in starts]) if len(starts) else \
            np.empty((0, length), dtype=self.dtype)


Tokens = np.ndarray | TokenStore


def read_windows(tokens: Tokens, starts: np.ndarray, length: int) -> np.ndarray:
    """Rows of ``length`` ids from each start of an in-memory array or a store, shape (len(starts), length)."""
    if isinstance(tokens, TokenStore):
        return tokens.windows(starts, length)
    return tokens[np.asarray(starts)[:, None] + np.arange(length)]


def open_tokens(path: str | Path, manifest: Mapping[str, Any] | None = None, split: str = "train") -> TokenStore:
    """Open a store for reading; DataError (one line naming the file) for a missing or corrupt one.

    With the data ``manifest``, the file's length and id type must be those it lists for ``split``, so a store
    from another data stage or tokenizer is refused without reading its ids (they were checked when written).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: token store not found (expected {STORE_FORMAT})")
    try:
        with path.open("rb") as f:
            version = np.lib.format.read_magic(f)
            fmt = np.lib.format
            shape, _, dtype = (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(f)
            offset = f.tell()
    except (ValueError, OSError, EOFError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"{path}: not a readable token store ({reason}); expected {STORE_FORMAT}") from None
    if len(shape) != 1 or dtype.kind != "u" or dtype.itemsize not in (2, 4):
        raise DataError(f"{path}: expected {STORE_FORMAT}; got a {dtype} array of shape {shape}")
    size = offset + shape[0] * dtype.itemsize
    if path.stat().st_size < size:
        raise DataError(f"{path}: not a readable token store ({path.stat().st_size} bytes, fewer than the {size} its "
                        f"header announces); expected {STORE_FORMAT}")
    if manifest is not None:
        try:
            expected, name = int(manifest["splits"][split]["tokens"]), str(manifest["token_dtype"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{path}: the data manifest lists no {split} split; rerun the data stage") from None
        if shape[0] != expected or dtype.name != name:
            raise DataError(f"{path}: {shape[0]:,} {dtype.name} ids, but the data manifest lists {expected:,} {name} "
                            f"ids for the {split} split (a store from another data stage?); rerun the data stage")
    return TokenStore(path, shape[0], dtype, offset)
