"""Atomic artifact writes: a unique temp file beside the target, then one rename.

Readers never see half a file, and two writers of the same artifact (a retried shard and
its ghost) never share a temp file. Every stage writes its artifacts through these.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid

_TEMP = re.compile(r"\.[0-9a-f]{8}\.tmp$")  # what atomic_path names its temp files


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temp path beside ``path``; on success it is renamed onto ``path``."""
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_parquet(table, path: str) -> None:
    """Write a pyarrow table as parquet, atomically."""
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_json(path: str, obj, indent: int | None = 1) -> None:
    """Write JSON, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)


def write_text(path: str, text: str) -> None:
    """Write a text file, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def remove_stale_temps(directory: str, older_than: float) -> int:
    """Delete the temp files ``atomic_path`` left in ``directory`` (not recursive) that were
    last written before ``older_than`` (a ``time.time()``): a writer killed mid-write
    (SIGKILL, a lost node) never reaches its cleanup. Newer ones may be a live writer's
    and stay. Returns how many were removed."""
    removed = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            if entry.is_file() and _TEMP.search(entry.name):
                with contextlib.suppress(FileNotFoundError):
                    if entry.stat().st_mtime < older_than:
                        os.unlink(entry.path)
                        removed += 1
    return removed
