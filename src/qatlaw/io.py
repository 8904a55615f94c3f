"""Atomic file outputs and checked Parquet inputs.

Every output is written to a temporary name beside it (``.<name>.<random>.tmp``) and renamed when complete, so a
reader never sees a half-written file and a failed or killed writer leaves nothing under the output's name (a
killed one may leave its hidden ``.tmp`` file, which no stage reads). Every Parquet input is read through
:func:`read_parquet`, which turns a missing, truncated or schema-mismatched file into a one-line error naming the
file and the columns the stage expects.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qatlaw.errors import QatlawError

if TYPE_CHECKING:
    import pandas as pd


class InputError(QatlawError):
    """An input file is missing, is not a readable Parquet file, or lacks the columns a stage needs."""


@contextmanager
def atomic_path(path: str | Path, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds. ``durable``: the
    file's bytes reach the disk before the rename, and the rename before the return (fsync of the file and of its
    folder), so that a node crash right after never leaves a checkpoint's name on missing or partial bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual permissions
        if durable:
            _fsync(tmp_path)
        os.replace(tmp_path, path)
        if durable:
            _fsync(path.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stale_temporaries(path: str | Path) -> list[Path]:
    """The temporary files that writers of ``path`` killed mid-write left beside it (``.<name>.<random>.tmp``)."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(data: Any, path: str | Path) -> None:
    """Write JSON atomically, pretty-printed with sorted keys."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_parquet(table: pd.DataFrame, path: str | Path) -> None:
    """Write a DataFrame to Parquet atomically, without its index."""
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, index=False)


_KINDS = {"number": "numeric", "bool": "boolean"}


def read_parquet(path: str | Path, columns: Sequence[str], what: str = "table", *,
                 kinds: Mapping[str, str] | None = None, error: type[QatlawError] = InputError) -> pd.DataFrame:
    """Read a Parquet input after checking that it is whole and has the columns a stage needs.

    ``columns`` must all be present (others may be too); ``kinds`` maps some of them to ``"number"`` or
    ``"bool"``. A missing file, a file that is not readable Parquet (truncated, or not Parquet at all) or a
    missing or wrongly typed column raises ``error`` with one line: ``<path>: <what> ...; expected columns a, b,
    c`` (and what the file has instead).
    """
    import pandas as pd
    import pyarrow as pa

    path = Path(path)
    expected = ", ".join(columns)
    if not path.is_file():
        raise error(f"{path}: {what} not found (expected a Parquet file with columns {expected})")
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError, pa.ArrowException) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise error(f"{path}: not a readable Parquet {what} ({reason}); expected columns {expected}") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        got = ", ".join(map(str, frame.columns)) or "no columns"
        lacks = f"not a {what}" if len(missing) == len(columns) else f"{what} lacks columns {', '.join(missing)}"
        raise error(f"{path}: {lacks}; expected columns {expected}; got {got}")
    for column, kind in (kinds or {}).items():
        dtype = frame[column].dtype
        ok = pd.api.types.is_bool_dtype(dtype) if kind == "bool" else (
            pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype))
        if not ok:
            raise error(f"{path}: {what} column {column} is {dtype}, not {_KINDS[kind]}; expected columns {expected}")
    return frame
