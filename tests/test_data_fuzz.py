"""Property-based fuzzing of the corpus reader: no line can crash it, and none goes missing.

:func:`corpus_cases` / :func:`corpus_lines` are reusable strategies: they generate JSONL
lines mixing random bytes, truncated JSON, deep nesting, lone surrogates (escaped and as raw
bytes), NULs, huge strings and huge integers, and every accepted row shape with random field
types. Tests that run a whole stage on such a corpus can draw from them.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import tempfile

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qgate import chat
from qgate import data as D

# Strings that broke readers somewhere, mixed into generated text.
AWKWARD = [
    "",
    " ",
    "   ",
    "\n\t",
    "b",
    "\x00",
    "a\x00b",
    "\ud83d",  # lone high surrogate
    "ok \ud83d",
    "\udc00x",  # lone low surrogate
    "\ud83d\ude00",  # a valid pair
    "\ufeff",
    "\u200b",
    "\u2028line\u2029",
    "\U0001f600",
    '"quoted" \\ back',
]

_text = st.one_of(st.text(max_size=12), st.sampled_from(AWKWARD))
_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    _text,
)
_value = st.recursive(
    _scalar,
    lambda kids: st.one_of(st.lists(kids, max_size=3), st.dictionaries(_text, kids, max_size=3)),
    max_leaves=8,
)
_part = st.one_of(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "input_text", "image_url", "input_audio"]), "text": _text}
    ),
    st.fixed_dictionaries({"type": _value}),
    _value,
)
_content = st.one_of(_text, _text, st.lists(_part, max_size=3), _value)
_role = st.one_of(
    st.sampled_from(["user", "assistant", "system", "human", "gpt", "chatgpt", "wizard", ""]),
    _value,
)
_ids = {"id": st.one_of(_text, _value), "sample_id": _text, "source": st.one_of(_text, _value)}


def _turns(role_key: str, content_key: str):
    turn = st.fixed_dictionaries({role_key: _role, content_key: _content})
    return st.one_of(st.lists(st.one_of(turn, turn, _value), max_size=4), _value)


_shaped = st.one_of(
    st.fixed_dictionaries({"messages": _turns("role", "content")}, optional=_ids),
    st.fixed_dictionaries({"conversations": _turns("from", "value")}, optional=_ids),
    st.fixed_dictionaries(
        {"instruction": _content, "output": _content},
        optional={"input": _content, "system": _content, **_ids},
    ),
    st.dictionaries(_text, _value, max_size=4),
    _value,
)

# Rows that must be accepted, with the messages they must come out as.
_plain = st.text(min_size=1, max_size=40).map(lambda s: "A" + s)  # visible, valid Unicode
_good = st.builds(
    lambda q, a, sid: (
        {
            "id": sid,
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
        },
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
    ),
    st.text(max_size=40),
    _plain,
    _plain,
)


def _encode(row, ascii_only: bool) -> bytes:
    # ensure_ascii escapes a lone surrogate as \ud83d; without it the surrogate goes out as
    # raw (CESU-8) bytes, which are not valid UTF-8
    return json.dumps(row, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def _line(raw: bytes) -> bytes:
    """A non-blank line without a newline (and not starting with a BOM): one row."""
    raw = raw.replace(b"\n", b" ")
    if not raw.strip() or raw.startswith(b"\xef\xbb\xbf"):
        raw = b"x" + raw
    return raw


def _deep(n: int, kind: str) -> bytes:
    if kind == "list":
        return b"[" * n + b"]" * n
    if kind == "object":
        return b'{"a":' * n + b"1" + b"}" * n
    if kind == "messages":
        return b'{"messages": [' * n + b"]}" * n
    return b"[" * n  # unbalanced


def corpus_cases():
    """Strategy: a list of (line, expected) pairs; expected is the canonical messages for a
    row that must be accepted, a reason for a line whose reason is known, or None."""
    shaped = st.builds(lambda r, a: (_line(_encode(r, a)), None), _shaped, st.booleans())
    good = _good.map(lambda g: (_line(_encode(g[0], True)), g[1]))
    random_bytes = st.binary(min_size=1, max_size=120).map(lambda b: (_line(b), None))
    truncated = st.builds(
        lambda r, f: (_line(_encode(r, True)[: max(1, int(f * len(_encode(r, True))) - 1)]), None),
        st.one_of(_good.map(lambda g: g[0]), _shaped),
        st.floats(0, 1),
    )
    deep = st.builds(
        lambda n, k: (_deep(n, k), D.MALFORMED_JSON),
        st.integers(2000, 60000),
        st.sampled_from(["list", "object", "messages", "open"]),
    )
    surrogate = st.builds(
        lambda g, s, ascii_only: (
            _encode(
                {**g[0], "messages": [*g[0]["messages"][:1], {"role": "assistant", "content": s}]},
                ascii_only,
            ),
            D.INVALID_UTF8,
        ),
        _good,
        st.sampled_from(["ok \ud83d", "\udc00x", "a\ud800b"]),
        st.booleans(),
    )
    huge = st.builds(
        lambda g, n: (
            _encode(
                {
                    **g[0],
                    "messages": [*g[0]["messages"][:1], {"role": "assistant", "content": "x" * n}],
                },
                True,
            ),
            [g[1][0], {"role": "assistant", "content": "x" * n}],
        ),
        _good,
        st.integers(100_000, 1_000_000),
    )
    huge_int = st.integers(4301, 6000).map(
        lambda n: (b'{"id": ' + b"9" * n + b', "messages": []}', D.MALFORMED_JSON)
    )
    case = st.one_of(
        shaped, shaped, shaped, good, good, random_bytes, truncated, deep, surrogate, huge, huge_int
    )
    return st.lists(case, min_size=1, max_size=12)


def corpus_lines():
    """Strategy: a list of JSONL lines (bytes, no newline, none blank): one row each."""
    return corpus_cases().map(lambda cases: [line for line, _ in cases])


def _check_canonical(row: dict) -> None:
    assert isinstance(row["sample_id"], str) and row["sample_id"]
    assert isinstance(row["source"], str) and row["source"]
    assert row["messages"] and all(m["role"] in D.ROLES for m in row["messages"])
    assert all(isinstance(m["content"], str) for m in row["messages"])
    assert any(m["role"] == "assistant" and m["content"].strip() for m in row["messages"])
    json.dumps(row, ensure_ascii=False).encode("utf-8")  # writable as it is


def _check_reject(rej: D.Reject) -> None:
    assert rej.reason in D.REJECT_REASONS
    assert rej.detail.startswith(rej.reason + ": ")
    for value in (rej.sample_id, rej.source, rej.detail, rej.excerpt):
        assert value is None or isinstance(value, str)
        if value:
            value.encode("utf-8")  # raises for text that parquet or JSON could not take


@settings(
    max_examples=600,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    cases=corpus_cases(),
    bom=st.booleans(),
    suffix=st.sampled_from([".jsonl", ".jsonl", ".jsonl.gz", ".ndjson"]),
    split=st.integers(0, 12),
)
def test_every_line_comes_out_exactly_once(cases, bom, suffix, split):
    """Guards against any line crashing the reader or validation (RecursionError, Unicode
    errors, huge values, odd types), against a line lost or read twice across shards, and
    against a reason outside the documented list or a reject that cannot be written."""
    lines = [line for line, _ in cases]
    blob = (b"\xef\xbb\xbf" if bom else b"") + b"\n".join(lines) + b"\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "fuzz" + suffix)
        with open(path, "wb") as f:
            f.write(gzip.compress(blob, compresslevel=1) if suffix.endswith(".gz") else blob)
        assert D.count_rows(path) == len(lines)
        raw = list(D.iter_raw(path, 0, split)) + list(D.iter_raw(path, split))
        assert [i for i, _ in raw] == list(range(len(lines)))
        out = [D.validate(r, D.source_name(path), i) for i, r in raw]
    rejects = []
    for (line, expected), item in zip(cases, out, strict=True):
        if isinstance(item, D.Reject):
            _check_reject(item)
            rejects.append(dataclasses.asdict(item))
            assert not isinstance(expected, list), (line[:80], item)
        else:
            _check_canonical(item)
            assert not isinstance(expected, str), (line[:80], item)
        if isinstance(expected, str):
            assert item.reason == expected, (line[:80], item)
        elif expected is not None:
            assert item["messages"] == expected
    assert pa.Table.from_pylist(rejects).num_rows == len(rejects)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=corpus_lines())
def test_json_list_of_the_same_rows(lines):
    """Guards against the .json list reader disagreeing with count_rows, or one bad item
    taking its neighbours (or the file) down with it."""
    items = []
    for line in lines:  # the lines that parse as JSON (json.loads passes raw surrogates)
        try:
            json.loads(line)
        except (ValueError, RecursionError):
            continue
        items.append(line)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "fuzz.json")
        with open(path, "wb") as f:
            f.write(b"[" + b",\n".join([*items, b"[" * 3000 + b"]" * 3000]) + b"]")
        assert D.count_rows(path) == len(items) + 1
        got = [D.validate(r, "fuzz", i) for i, r in D.iter_raw(path)]
    assert len(got) == len(items) + 1 and got[-1].reason == D.MALFORMED_JSON
    for item in got:
        _check_reject(item) if isinstance(item, D.Reject) else _check_canonical(item)


@settings(max_examples=300, deadline=None)
@given(body=st.text(alphabet='[]{}",:\\ \n1a\ud83d', max_size=60))
def test_json_list_of_any_text(body):
    """Guards against a broken .json list (truncated, stray brackets, trailing commas) raising
    instead of ending in reject rows, or counting rows differently from how it reads them."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "any.json")
        with open(path, "wb") as f:
            f.write(("[" + body).encode("utf-8", "surrogatepass"))
        got = [D.validate(r, "any", i) for i, r in D.iter_raw(path)]
        assert D.count_rows(path) == len(got)
    for item in got:
        _check_reject(item) if isinstance(item, D.Reject) else _check_canonical(item)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    """The shipped tiny BPE tokenizer with its ChatML template (module scope: hypothesis
    runs every example in one test call)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


# Short contents that collide with template text ("a" and "t" are in "<|im_start|>assistant").
_SHORT = ["a", "b", "t", "7", " ok", "im", "assistant", "<|im_end|>", "\n", "x\ue000y", "é"]
_message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "user", "assistant", "assistant"]),
        "content": st.one_of(st.text(max_size=30), st.sampled_from(_SHORT)),
    }
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=st.lists(_message, min_size=1, max_size=5), max_length=st.integers(1, 64))
def test_tokenize_never_raises_on_canonical_rows(tokenizer, messages, max_length):
    """Guards against a canonical row that tokenization cannot place a loss mask on (an
    answer hidden in the template's own text, a one-character answer) raising out of the
    stage instead of tokenizing, and against labels that include prompt-only tokens."""
    row = D.validate({"messages": messages}, "fuzz")
    if isinstance(row, D.Reject):
        return
    enc = chat.tokenize_messages(tokenizer, row["messages"], max_length)
    n = len(enc["input_ids"])
    assert n == min(max_length, enc["n_tokens_full"]) and len(enc["labels"]) == n
    assert enc["truncated"] == (enc["n_tokens_full"] > max_length)
    if not enc["truncated"]:
        labelled = tokenizer.decode([t for t in enc["labels"] if t != -100])
        for m in row["messages"]:
            if m["role"] == "assistant":
                assert m["content"].strip() in labelled
