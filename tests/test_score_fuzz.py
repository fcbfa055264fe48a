"""Property-based fuzzing of the real scoring job: whatever the lines hold, the job finishes
and every input line comes out exactly once, scored or rejected with a documented reason.

The lines come from the reusable strategies in tests/test_data_fuzz.py (random bytes,
truncated JSON, deep nesting, lone surrogates, NULs, huge strings and integers, every row
shape with random field types), mixed with the synthetic pool's real rows so that every
shard also scores for real, and written as JSONL or JSONL.gz with or without a BOM.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import random
import tempfile
from collections import Counter

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from test_data_fuzz import corpus_cases
from test_scoring import _score_cfg

from qgate import data as D
from qgate.batch_scoring import MANIFEST_FILE, REJECTS_DIR, run_scoring


def read_outputs(out: str) -> tuple[list[dict], list[dict]]:
    """(scored rows, reject rows) of a scores directory, every part file, in file order."""
    scored = [
        row
        for p in sorted(os.listdir(out))
        if p.startswith("part-") and p.endswith(".parquet")
        for row in pq.read_table(os.path.join(out, p)).to_pylist()
    ]
    rej_dir = os.path.join(out, REJECTS_DIR)
    rejects = [
        row
        for p in sorted(os.listdir(rej_dir))
        if p.endswith(".parquet")
        for row in pq.read_table(os.path.join(rej_dir, p)).to_pylist()
    ]
    return scored, rejects


def _write(path: str, lines: list[bytes], bom: bool) -> None:
    blob = (b"\xef\xbb\xbf" if bom else b"") + b"\n".join(lines) + b"\n"
    with open(path, "wb") as f:
        f.write(gzip.compress(blob, compresslevel=1) if path.endswith(".gz") else blob)


def _line(row: dict) -> bytes:
    return json.dumps(row).encode()


def _chat(q, a, sid: str) -> bytes:
    return _line({"id": sid, "messages": [_turn("user", q), _turn("assistant", a)]})


def _turn(role, content) -> dict:
    return {"role": role, "content": content}


# One line per reason the reader and tokenizer can give with the shipped template (the
# README's "Bad input" table shows the same rows), and lines that must be scored.
CRAFTED: dict[str, bytes] = {
    D.MALFORMED_JSON: b"[" * 50000 + b"]" * 50000,
    D.INVALID_UTF8: _chat("hi", "ok \ud83d", "c-utf8"),
    D.UNKNOWN_SHAPE: _line({"id": "c-shape", "text": "just text"}),
    D.MISSING_ASSISTANT: _chat("hi", "   ", "c-blank"),
    D.NON_STRING_CONTENT: _chat(42, "a", "c-int"),
    D.NON_TEXT_CONTENT: _chat([{"type": "image_url", "image_url": {"url": "x.png"}}], "a", "c-img"),
    D.UNKNOWN_ROLE: _line(
        {"id": "c-role", "messages": [_turn("bot", "q"), _turn("assistant", "a")]}
    ),
    D.NO_ANSWER_AFTER_TRUNCATION: _chat("word " * 400, "a", "c-long"),
}
MUST_SCORE: list[bytes] = [
    _chat("Is it b?", "b", "c-one-char"),
    _chat([{"type": "text", "text": "Say"}, {"type": "text", "text": "yes"}], "yes", "c-parts"),
    _line({"id": "c-alpaca", "instruction": "Add 2 and 3.", "input": "", "output": "5"}),
    _line(
        {
            "id": "c-sharegpt",
            "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
        }
    ),
]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
@settings(
    max_examples=2,
    deadline=None,
    phases=(Phase.explicit, Phase.reuse, Phase.generate),  # no shrinking: each try is a job
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
@given(
    chunks=st.lists(corpus_cases(), min_size=10, max_size=25),
    bom=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_scoring_job_accounts_for_every_line(
    tiny_model, corpus, ray_session, tmp_path, suffix, chunks, bom, seed
):
    """Guards against a fuzzed line crashing the scoring job (reader, validation, tokenizer
    or model), a line lost or written twice across shards, a reject whose reason is not in
    qgate.data.REJECT_REASONS or not the one its row calls for, a short or content-parts
    answer not scored, and a manifest whose counts disagree with the files."""
    with open(corpus["pool"], "rb") as f:
        pool = [line.rstrip(b"\n") for line in f]
    # Each case's expected outcome: "scored", a reason, or None (anything documented).
    cases = [(line, "scored") for line in pool] + [(line, r) for r, line in CRAFTED.items()]
    cases += [(line, "scored") for line in MUST_SCORE] + [(pool[3], D.DUPLICATE_ID)]
    for line, expected in (c for chunk in chunks for c in chunk):
        cases.append((line, "scored" if isinstance(expected, list) else expected))
    random.Random(seed).shuffle(cases)
    lines = [line for line, _ in cases]
    work = tempfile.mkdtemp(dir=tmp_path)  # one folder per example: tmp_path is shared
    path = os.path.join(work, "fuzz" + suffix)
    _write(path, lines, bom)
    src = D.source_name(path)

    # What reading alone says about each line: its sample_id, and its reason if rejected.
    local = [D.validate(raw, src, i) for i, raw in D.iter_raw(path)]
    assert len(local) == len(lines)
    ids = [x.sample_id if isinstance(x, D.Reject) else x["sample_id"] for x in local]
    counts = Counter(ids)

    out = os.path.join(work, "scores")
    m = run_scoring(_score_cfg(tiny_model, [path], out, "rows_per_shard=60"))
    scored, rejects = read_outputs(out)
    outcomes: dict[str, list[str]] = {}
    for r in scored + rejects:
        outcomes.setdefault(r["sample_id"], []).append(r.get("reason") or "scored")

    # Exactly once: the job's ids (scored + rejected) are the input's ids, with multiplicity.
    assert Counter({sid: len(v) for sid, v in outcomes.items()}) == counts
    assert len(scored) == len({r["sample_id"] for r in scored})  # no id scored twice
    assert m["rows_in"] == len(lines) == m["scored"] + m["rejected"]
    assert (m["scored"], m["rejected"]) == (len(scored), len(rejects))
    assert m["rejects_by_reason"] == dict(sorted(Counter(r["reason"] for r in rejects).items()))
    assert os.path.isfile(os.path.join(out, MANIFEST_FILE))

    # Every reject has a documented reason and says why; read-time reasons survive the job.
    source = {i: x.source if isinstance(x, D.Reject) else x["source"] for i, x in zip(ids, local)}
    for r in rejects:
        assert r["reason"] in D.REJECT_REASONS, r
        assert r["detail"].startswith(r["reason"] + ": "), r
        assert counts[r["sample_id"]] > 1 or r["source"] == source[r["sample_id"]], r
    local_rejects = Counter((x.sample_id, x.reason) for x in local if isinstance(x, D.Reject))
    assert not local_rejects - Counter((r["sample_id"], r["reason"]) for r in rejects)

    # Lines with a known outcome get exactly it (ids given twice are checked as a pair).
    known = [(sid, exp, line) for sid, (line, exp) in zip(ids, cases, strict=True) if exp]
    for sid, expected, line in known:
        if counts[sid] == 1:
            assert outcomes[sid] == [expected], (line[:100], outcomes[sid])
    dup = ids[lines.index(pool[3])]
    assert sorted(outcomes[dup]) == [D.DUPLICATE_ID, "scored"]  # one copy each
    assert sum(exp == "scored" and counts[sid] == 1 for sid, exp, _ in known) >= len(pool) + 3

    # Scored rows hold real statistics.
    for r in scored:
        assert counts[r["sample_id"]] > 1 or r["source"] == source[r["sample_id"]], r
        assert 1 <= r["n_loss_tokens"] <= r["n_tokens"] <= 128, r
        assert math.isfinite(r["nll"]) and r["nll"] > 0
        assert len(r["gate"]) == len(r["gate_mean"]) == 2
        assert all(0.0 <= g <= 1.0 for g in r["gate"] + r["gate_mean"])
        assert abs(math.sqrt(sum(v * v for v in r["embedding"])) - 1.0) < 1e-4
