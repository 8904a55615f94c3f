"""Atomic outputs: complete or absent, with the permissions of an ordinary file."""

from __future__ import annotations

import os
import stat

import pandas as pd
import pytest

from qatlaw.io import atomic_path, write_json, write_parquet


def test_outputs_get_umask_permissions_not_mkstemp_0600(tmp_path):
    old = os.umask(0o022)
    try:
        write_json({"a": 1}, tmp_path / "x.json")
        write_parquet(pd.DataFrame({"a": [1]}), tmp_path / "x.parquet")
    finally:
        os.umask(old)
    for name in ("x.json", "x.parquet"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644


def test_a_failed_writer_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "out.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_replaced_whole(tmp_path):
    target = tmp_path / "out.json"
    write_json({"v": 1}, target)
    write_json({"v": 2}, target)
    assert target.read_text().strip().endswith("}") and '"v": 2' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
