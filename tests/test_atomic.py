"""Atomic writes: readers never see half a file, and killed writers' temp files are swept."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from qgate.atomic import atomic_path, remove_stale_temps, write_json


def test_a_failed_write_leaves_neither_file_nor_temp(tmp_path):
    """Guards against a writer that raises leaving a half file or its temp behind."""
    target = tmp_path / "a.json"
    with pytest.raises(RuntimeError), atomic_path(str(target)) as tmp:
        Path(tmp).write_text("{half")
        raise RuntimeError("disk full")
    assert os.listdir(tmp_path) == []
    write_json(str(target), {"ok": 1})
    assert os.listdir(tmp_path) == ["a.json"]


def test_only_old_temps_of_atomic_writes_are_removed(tmp_path):
    """Guards against the sweep deleting a live writer's temp file, a user's own file that
    merely ends in .tmp, or failing on a directory that does not exist."""
    now = time.time()
    names = {
        "part-1.parquet.0badcafe.tmp": now - 120,  # a killed writer's: removed
        "part-2.parquet.1234abcd.tmp": now + 5,  # written after the cut-off: kept
        "notes.tmp": now - 120,  # not an atomic_path temp: kept
        "part-3.parquet": now - 120,  # a finished file: kept
    }
    for name, mtime in names.items():
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (mtime, mtime))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.json.0badcafe.tmp").write_bytes(b"x")  # not recursive: kept
    os.utime(tmp_path / "sub" / "x.json.0badcafe.tmp", (now - 120, now - 120))
    assert remove_stale_temps(str(tmp_path), now) == 1
    assert sorted(os.listdir(tmp_path)) == [
        "notes.tmp",
        "part-2.parquet.1234abcd.tmp",
        "part-3.parquet",
        "sub",
    ]
    assert remove_stale_temps(str(tmp_path / "missing"), now) == 0
