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


def test_a_durable_output_is_on_disk_before_its_name_and_its_name_before_return(tmp_path, monkeypatch):
    """durable=True (checkpoints): fsync of the file before the rename, then of its folder; plain outputs skip both."""
    import qatlaw.io

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(qatlaw.io.os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(qatlaw.io.os, "replace", lambda a, b: events.append("rename") or real_replace(a, b))
    with atomic_path(tmp_path / "plain.pt") as tmp:
        tmp.write_text("x")
    assert events == ["rename"]
    events.clear()
    with atomic_path(tmp_path / "ckpt.pt", durable=True) as tmp:
        tmp.write_text("x")
    assert events == ["fsync", "rename", "fsync"] and (tmp_path / "ckpt.pt").read_text() == "x"
