"""Data layer: the three row shapes, every reject reason, formats, label masks."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from qgate import data as D

GOOD = {
    "id": "m1",
    "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
}
SHAREGPT = {
    "conversations": [
        {"from": "system", "value": "be brief"},
        {"from": "human", "value": "2+2?"},
        {"from": "gpt", "value": "4"},
    ]
}
ALPACA = {"instruction": "Add", "input": "1 and 2", "output": "3", "source": "alp"}


def _write_lines(path, lines):
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else (json.dumps(line) + "\n").encode())
            if isinstance(line, bytes):
                f.write(b"\n")


def test_three_shapes_map_to_canonical(tmp_path):
    """Guards against a shape being mis-mapped (roles, alpaca input join, ids, sources)."""
    p = tmp_path / "mixed.jsonl"
    _write_lines(p, [GOOD, SHAREGPT, ALPACA])
    rows, rejects = D.read_corpus(str(p))
    assert rejects == []
    assert rows[0] == {"sample_id": "m1", "source": "mixed", "messages": GOOD["messages"]}
    assert [m["role"] for m in rows[1]["messages"]] == ["system", "user", "assistant"]
    assert rows[1]["sample_id"] == D.content_hash(rows[1]["messages"])
    assert rows[2]["messages"] == [
        {"role": "user", "content": "Add\n\n1 and 2"},
        {"role": "assistant", "content": "3"},
    ]
    assert rows[2]["source"] == "alp"


def test_every_reject_reason(tmp_path):
    """Guards against bad rows crashing the reader or being dropped without a reason."""
    p = tmp_path / "bad.jsonl"
    lines = [
        GOOD,
        b'{"messages": [',  # malformed JSON
        b'{"instruction": "x", "output": "\xff\xfe"}',  # invalid UTF-8
        {"text": "no known shape"},
        {"messages": [{"role": "user", "content": "q"}]},  # no assistant turn
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
        {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "wizard", "content": "q"}, {"role": "assistant", "content": "a"}]},
        GOOD,  # duplicate id
    ]
    _write_lines(p, lines)
    rows, rejects = D.read_corpus(str(p))
    reasons = [r.reason for r in rejects]
    assert reasons == [
        D.MALFORMED_JSON,
        D.INVALID_UTF8,
        D.UNKNOWN_SHAPE,
        D.MISSING_ASSISTANT,
        D.MISSING_ASSISTANT,
        D.NON_STRING_CONTENT,
        D.UNKNOWN_ROLE,
        D.DUPLICATE_ID,
    ]
    assert len(rows) + len(rejects) == len(lines)
    assert rejects[-1].sample_id == "m1" and rejects[0].sample_id == "bad#row1"
    assert all(r.excerpt and r.detail for r in rejects)


def test_json_and_parquet_equal_jsonl(tmp_path):
    """Guards against format-dependent parsing: one corpus in three formats reads the same."""
    rows = [GOOD, SHAREGPT, ALPACA]
    _write_lines(tmp_path / "c.jsonl", rows)
    (tmp_path / "c.json").write_text(json.dumps(rows))
    canon = D.read_corpus(str(tmp_path / "c.jsonl"))[0]
    pq.write_table(
        pa.Table.from_pylist(
            [
                {"id": r["sample_id"], "source": r["source"], "messages": r["messages"]}
                for r in canon
            ]
        ),
        tmp_path / "c.parquet",
    )
    assert D.read_corpus(str(tmp_path / "c.json"))[0] == canon
    assert D.read_corpus(str(tmp_path / "c.parquet"))[0] == canon
    assert D.count_rows(str(tmp_path / "c.jsonl")) == 3
    assert D.count_rows(str(tmp_path / "c.parquet")) == 3


def test_globs_and_missing_paths(tmp_path):
    """Guards against a typo in a corpus path silently reading nothing."""
    _write_lines(tmp_path / "a.jsonl", [GOOD])
    assert D.expand_paths(str(tmp_path / "*.jsonl")) == [str(tmp_path / "a.jsonl")]
    with pytest.raises(FileNotFoundError, match="matched no files"):
        D.expand_paths(str(tmp_path / "nope*.jsonl"))
    with pytest.raises(FileNotFoundError, match="not found"):
        D.expand_paths(str(tmp_path / "missing.jsonl"))


def test_label_mask_covers_exactly_assistant_tokens(tiny_model):
    """Guards against loss on prompt tokens or a missing end-of-turn token in the labels."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    msgs = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "reverse abc"},
        {"role": "assistant", "content": "cba"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "cba too"},
    ]
    enc = D.tokenize_messages(tok, msgs, max_length=256)
    labelled = [t for t in enc["labels"] if t != -100]
    assert tok.decode(labelled) == f"cba{tok.eos_token}cba too{tok.eos_token}"
    full = D.tokenize_messages(tok, msgs, max_length=256, loss_on="all")
    assert full["labels"] == full["input_ids"]
    short = D.tokenize_messages(tok, msgs, max_length=10)
    assert short["truncated"] and len(short["input_ids"]) == 10
    assert short["n_tokens_full"] == len(enc["input_ids"])


def test_fallback_template_without_chat_template(tiny_model):
    """Guards against tokenizers with no chat template crashing formatting."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = None
    text = D.render_chat(tok, GOOD["messages"])
    assert text == f"### User:\nhi\n\n### Assistant:\nhello{tok.eos_token}\n\n"
    enc = D.tokenize_messages(tok, GOOD["messages"], max_length=64)
    assert tok.decode([t for t in enc["labels"] if t != -100]) == f"hello{tok.eos_token}"
