"""The selection log: an append-only JSONL file of samples committed to a growing selection.

One line per committed sample, in corpus row shape (``id``, ``source``, ``messages``) plus
the decision (score, margin, method, reference digest, time) and the text identity
(``text_key``, ``minhash``), so the file feeds ``qgate finetune`` as it is and later commits
can be checked against it. Both writers, the batch path (``qgate extend``) and the online
path (``POST /v1/select`` with ``commit``), go through :meth:`SelectionLog.commit`:

- under an exclusive ``fcntl.flock`` on ``<log>.lock``, so processes and Serve replicas on
  one file system take turns;
- idempotent by sample_id: a retried request, or the same sample sent to two replicas,
  appends once (the second answer is ``already_committed``); a pool row's sample_id is
  refused (``duplicate_id``);
- checked for copies: a sample whose text equals (``duplicate_text``) or is MinHash-similar
  to (``near_duplicate``) a pool row or a logged sample is not appended;
- with an optional quota (``max_commits``): past it, ``budget_exhausted``;
- crash-safe: lines are flushed and fsynced before the lock is released, and a torn last
  line (a crash mid-write) is cut off by the next writer, so every line reads whole.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterable, Sequence

import numpy as np

from qgate.config import MinHash
from qgate.data import DUPLICATE_ID, DUPLICATE_TEXT, NEAR_DUPLICATE
from qgate.minhash import NearDuplicateIndex

COMMITTED = "committed"
ALREADY_COMMITTED = "already_committed"
BUDGET_EXHAUSTED = "budget_exhausted"
NOT_SELECTED = "not_selected"


def pool_identity(scores_dirs: Sequence[str]) -> tuple[list[str], np.ndarray, list[bytes]]:
    """(sample_ids, minhash signatures, text keys) of scored pool rows, from the scores'
    ``minhash`` and ``text_key`` columns (empty when the scores were made without them)."""
    import pyarrow.parquet as pq

    from qgate import data

    ids, sigs, keys = [], [], []
    for d in scores_dirs:
        for p in data.expand_paths(os.path.join(d, "part-*.parquet")):
            pf = pq.ParquetFile(p)
            if "minhash" not in pf.schema_arrow.names:
                continue
            t = pf.read(columns=["sample_id", "text_key", "minhash"])
            ids += t.column("sample_id").to_pylist()
            keys += t.column("text_key").to_pylist()
            mh = t.column("minhash").combine_chunks()
            sigs.append(mh.flatten().to_numpy().reshape(len(mh), -1))
    sig = np.concatenate(sigs) if sigs else None
    return ids, sig, keys


class SelectionLog:
    """Commit samples to the log at ``path`` (see the module docstring for the guarantees).

    ``minhash`` are the signature settings of the pool (the reference's scoring block);
    ``pool`` its ``(ids, signatures, text keys)``; ``max_commits`` caps the log's length.
    """

    def __init__(
        self,
        path: str,
        minhash: MinHash | None = None,
        pool: tuple[list[str], np.ndarray | None, list[bytes]] | None = None,
        max_commits: int | None = None,
    ):
        self.path, self.minhash, self.max_commits = path, minhash, max_commits
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        ids, sig, keys = pool or ([], None, [])
        self.index = NearDuplicateIndex(minhash, ids, sig) if minhash else None
        self.keys: dict[bytes, str] = dict(zip(keys, ids, strict=True)) if keys else {}
        self.pool_ids = set(ids)
        self.committed: dict[str, dict] = {}
        self._offset = 0

    # -- reading

    def _refresh(self, f) -> None:
        """Read the lines appended since the last call (by any writer); cut a torn tail."""
        f.seek(self._offset)
        chunk = f.read()
        end = chunk.rfind(b"\n") + 1
        for line in chunk[:end].splitlines():
            if line.strip():
                self._learn(json.loads(line))
        if end < len(chunk):  # a writer died mid-line: that line was never committed
            f.truncate(self._offset + end)
        self._offset += end

    def _learn(self, entry: dict) -> None:
        sid = entry["id"]
        self.committed[sid] = entry
        if entry.get("text_key"):
            self.keys.setdefault(bytes.fromhex(entry["text_key"]), sid)
        if self.index is not None and entry.get("minhash") is not None:
            self.index.add(sid, np.asarray(entry["minhash"], dtype=np.uint32))

    # -- writing

    def commit(self, entries: Iterable[dict]) -> list[dict]:
        """Append the entries that are new, not copies and within the quota; returns, per
        entry, ``{status, kept_id, similarity}``: committed, already_committed, duplicate_id,
        duplicate_text, near_duplicate or budget_exhausted.

        An entry is ``{id, source, messages, ...decision fields}`` plus optional
        ``text_key`` (hex) and ``minhash`` (list of ints) for the copy checks.
        """
        entries = list(entries)
        out = []
        lock = open(f"{self.path}.lock", "a")  # noqa: SIM115 - held across the block below
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            with open(self.path, "a+b") as f:
                self._refresh(f)
                lines = []
                for e in entries:
                    res = self._check(e)
                    if res["status"] == COMMITTED:
                        e = {
                            **e,
                            "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        }
                        lines.append(json.dumps(e, ensure_ascii=False) + "\n")
                        self._learn(e)
                    out.append(res)
                if lines:
                    f.seek(0, os.SEEK_END)
                    f.write("".join(lines).encode("utf-8"))
                    f.flush()
                    os.fsync(f.fileno())
                    self._offset = f.tell()
        finally:
            lock.close()  # releases the flock
        return out

    def _check(self, e: dict) -> dict:
        sid = e["id"]
        if sid in self.committed:
            return {"status": ALREADY_COMMITTED, "kept_id": sid, "similarity": None}
        if sid in self.pool_ids:
            return {"status": DUPLICATE_ID, "kept_id": sid, "similarity": None}
        key = e.get("text_key")
        if key and bytes.fromhex(key) in self.keys:
            return {
                "status": DUPLICATE_TEXT,
                "kept_id": self.keys[bytes.fromhex(key)],
                "similarity": 1.0,
            }
        if self.index is not None and e.get("minhash") is not None:
            hit = self.index.match(np.asarray(e["minhash"], dtype=np.uint32))
            if hit is not None:
                return {"status": NEAR_DUPLICATE, "kept_id": hit[0], "similarity": hit[1]}
        if self.max_commits is not None and len(self.committed) >= self.max_commits:
            return {"status": BUDGET_EXHAUSTED, "kept_id": None, "similarity": None}
        return {"status": COMMITTED, "kept_id": None, "similarity": None}


def read_log(path: str) -> list[dict]:
    """The log's whole lines (a torn last line is skipped), without taking the lock."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        chunk = f.read()
    end = chunk.rfind(b"\n") + 1
    return [json.loads(line) for line in chunk[:end].splitlines() if line.strip()]
