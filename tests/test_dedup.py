"""Dedup: text identity (qgate.minhash), clustering and the kept rule, the Ray stage end to
end (rows in = kept + rejected, resume), and the score stage reading its result."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from qgate import data as D
from qgate.config import DedupConfig, MinHash
from qgate.dedup import cluster, priority, run_dedup
from qgate.minhash import (
    NearDuplicateIndex,
    exact_key,
    message_signatures,
    normalize_text,
    similarity,
)


def _msgs(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


LONG = (
    "Explain why the sky appears blue during the day and red at sunset, in two sentences "
    "that a curious ten year old could follow without any physics background."
)
ANSWER = (
    "Sunlight scatters off air molecules, and blue light scatters the most, so blue reaches "
    "your eyes from every direction. At sunset light crosses more air, the blue is scattered "
    "away, and the reds and oranges are left."
)


def test_exact_key_ignores_case_and_whitespace_only():
    a = exact_key(_msgs("Sort  these: 3, 1", "1, 3"))
    assert a == exact_key(_msgs(" sort these:\t3, 1 ", "1,  3"))
    assert a != exact_key(_msgs("Sort these: 3, 2", "2, 3"))
    # roles count: the same texts under other roles are not the same sample
    swapped = [
        {"role": "assistant", "content": "Sort these: 3, 1"},
        {"role": "user", "content": "1, 3"},
    ]
    assert a != exact_key(swapped)
    assert normalize_text("ＡＢ  c\n") == "ab c"  # NFKC + casefold + spaces


def test_signature_similarity_separates_edits_from_other_texts():
    st = MinHash()
    sig = message_signatures(
        [
            _msgs(LONG, ANSWER),
            _msgs(LONG.replace("two sentences", "2 short sentences"), ANSWER),
            _msgs("Name the capital of France.", "Paris"),
        ],
        st,
    )
    assert sig.dtype == np.uint32 and sig.shape == (3, st.num_perm)
    assert similarity(sig[0], sig[1]) >= st.threshold
    assert similarity(sig[0], sig[2]) < 0.1


def test_cluster_keeps_first_or_best_and_points_at_the_survivor():
    st = MinHash()
    rows = [
        _msgs(LONG, ANSWER),  # 0
        _msgs(LONG.upper(), ANSWER),  # 1 exact copy of 0 (case)
        _msgs(LONG.replace("curious", "bright"), ANSWER),  # 2 near copy of 0
        _msgs("Name the capital of France.", "Paris"),  # 3 unique
        _msgs(LONG.replace("curious", "bright").lower(), ANSWER),  # 4 exact copy of 2
    ]
    keys = np.array([bytes.fromhex(exact_key(m)) for m in rows], dtype="S16")
    sig = message_signatures(rows, st)
    order = np.arange(len(rows))
    rep, code = cluster(keys, sig, priority(order, None), st)
    assert rep.tolist() == [0, 0, 0, 3, 0]
    assert code.tolist() == [0, 1, 2, 0, 1]
    # best score wins each cluster (row 1 its exact pair, row 2 the near cluster); an exact
    # copy of a dropped row points at the final survivor
    score = np.array([0.1, 0.2, 0.9, 0.5, np.nan])
    rep, code = cluster(keys, sig, priority(order, score), st)
    assert rep.tolist() == [2, 2, 2, 3, 2]
    assert code.tolist() == [1, 2, 0, 0, 1]
    # exact only: near copies stay
    rep, code = cluster(keys, sig, priority(order, None), st, near=False)
    assert code.tolist() == [0, 1, 0, 0, 1]


def test_index_finds_copies_added_later():
    st = MinHash()
    sig = message_signatures([_msgs(LONG, ANSWER), _msgs("Capital of Peru?", "Lima")], st)
    idx = NearDuplicateIndex(st, ["a", "b"], sig)
    probe = message_signatures([_msgs(LONG.replace("blue", "azure", 1), ANSWER)], st)[0]
    hit = idx.match(probe)
    assert hit is not None and hit[0] == "a" and hit[1] >= st.threshold
    fresh = message_signatures([_msgs("Translate 'cat' to German.", "Katze")], st)[0]
    assert idx.match(fresh) is None
    idx.add("c", fresh)
    assert idx.match(fresh) == ("c", 1.0)


def _write(path, rows: list) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")
    return str(path)


@pytest.fixture()
def dup_corpus(tmp_path) -> tuple[str, dict]:
    """A corpus with planted exact copies, near copies, id-less copies and bad rows."""
    import random

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"

    def words(n: int) -> str:
        return " ".join("".join(rng.choice(letters) for _ in range(6)) for _ in range(n))

    rows = [{"id": f"u{i}", "messages": _msgs(words(10), words(4))} for i in range(30)]
    rows += [
        {
            "id": "exact-of-u3",
            "messages": _msgs(
                rows[3]["messages"][0]["content"].upper(), rows[3]["messages"][1]["content"]
            ),
        },
        {"id": "near-of-long", "messages": _msgs(LONG.replace("curious", "bright"), ANSWER)},
        {"id": "long", "messages": _msgs(LONG, ANSWER)},
        {"messages": _msgs("Capital of Peru?", "Lima")},  # id-less: content-hash id
        {"messages": _msgs("Capital of Peru?", "Lima")},  # the same again
        "{not json",
        {"id": "noans", "messages": [{"role": "user", "content": "hi"}]},
    ]
    path = _write(tmp_path / "dups.jsonl", rows)
    return path, {"exact-of-u3": "u3", "long": "near-of-long"}


def test_dedup_stage_rows_in_equal_kept_plus_rejected(dup_corpus, ray_session, tmp_path):
    """Guards against a copy surviving, a row vanishing, or the kept rule being ignored."""
    path, kept_of = dup_corpus
    out = str(tmp_path / "dedup")
    m = run_dedup(DedupConfig(corpus=[path], output=out, rows_per_shard=10))
    assert m["rows_in"] == 37 == m["kept"] + m["rejected"]
    kept = pq.read_table(os.path.join(out, "kept.parquet")).to_pylist()
    rej = pq.read_table(os.path.join(out, "rejects", "dedup.parquet")).to_pylist()
    by_id = {r["sample_id"]: r for r in rej}
    assert by_id["exact-of-u3"]["reason"] == D.DUPLICATE_TEXT
    assert by_id["exact-of-u3"]["kept_id"] == "u3"
    # the near copy came first in input order, so it is the one kept
    assert by_id["long"]["reason"] == D.NEAR_DUPLICATE
    assert by_id["long"]["kept_id"] == "near-of-long"
    assert by_id["long"]["similarity"] >= 0.8
    peru = [r for r in rej if r["reason"] == D.DUPLICATE_TEXT and r["sample_id"] != "exact-of-u3"]
    assert (
        len(peru) == 1 and peru[0]["row_index"] == 34 and peru[0]["kept_id"] == peru[0]["sample_id"]
    )
    assert m["rejects_by_reason"] == {
        D.DUPLICATE_TEXT: 2,
        D.NEAR_DUPLICATE: 1,
        D.MALFORMED_JSON: 1,
        D.MISSING_ASSISTANT: 1,
    }
    assert len(kept) == 32 and [k["order"] for k in kept] == sorted(k["order"] for k in kept)
    assert {k["sample_id"] for k in kept} >= {"u3", "near-of-long"}
    # every input row is in exactly one of kept / rejects, by position
    seen = [(k["path"], k["row_index"]) for k in kept]
    for p in sorted(os.listdir(os.path.join(out, "rejects"))):
        seen += [
            (r["path"], r["row_index"])
            for r in pq.read_table(os.path.join(out, "rejects", p)).to_pylist()
        ]
    assert sorted(i for _, i in seen) == list(range(37))

    # resume: a second launch signs nothing again and gives the same result
    again = run_dedup(DedupConfig(corpus=[path], output=out, rows_per_shard=10))
    assert again["kept"] == m["kept"] and again["rejects_by_reason"] == m["rejects_by_reason"]
    with pytest.raises(Exception, match="another corpus"):
        run_dedup(DedupConfig(corpus=[path], output=out, rows_per_shard=7))


def test_keep_best_uses_the_selection_score(dup_corpus, ray_session, tmp_path):
    import pyarrow as pa

    path, _ = dup_corpus
    sel = tmp_path / "selection.parquet"
    pq.write_table(pa.table({"sample_id": ["long", "near-of-long"], "score": [0.9, 0.1]}), sel)
    out = str(tmp_path / "best")
    run_dedup(DedupConfig(corpus=[path], output=out, keep="best", keep_scores=str(sel)))
    rej = pq.read_table(os.path.join(out, "rejects", "dedup.parquet")).to_pylist()
    near = [r for r in rej if r["reason"] == D.NEAR_DUPLICATE]
    assert [(r["sample_id"], r["kept_id"]) for r in near] == [("near-of-long", "long")]


def test_score_stage_skips_what_dedup_removed(dup_corpus, tiny_model, ray_session, tmp_path):
    """Guards against scoring copies after a dedup run, or losing them from the count."""
    from qgate.batch_scoring import run_scoring
    from qgate.config import ScoreConfig

    path, _ = dup_corpus
    dd = str(tmp_path / "dedup")
    dm = run_dedup(DedupConfig(corpus=[path], output=dd))
    out = str(tmp_path / "scores")
    cfg = ScoreConfig(
        run_dir=str(tmp_path),  # no warmup gates there: fresh ones, never another run's
        base_model=tiny_model,
        corpus=[path],
        output=out,
        dedup=dd,
        ifd=False,
        max_length=128,
        rows_per_shard=20,
    )
    m = run_scoring(cfg)
    assert m["rows_in"] == 37 == m["scored"] + m["rejected"]
    assert m["scored"] == dm["kept"]
    assert m["rejects_by_reason"][D.DUPLICATE_TEXT] == 2
    assert m["rejects_by_reason"][D.NEAR_DUPLICATE] == 1
    t = pq.read_table(os.path.join(out, "part-00000-000000.parquet"))
    assert t.schema.field("minhash").type.list_size == MinHash().num_perm
    kept = pq.read_table(os.path.join(dd, "kept.parquet")).column("sample_id").to_pylist()
    scored = []
    for p in sorted(os.listdir(out)):
        if p.startswith("part-"):
            scored += (
                pq.read_table(os.path.join(out, p), columns=["sample_id"]).column(0).to_pylist()
            )
    assert scored == kept
    # the stored signature is the one qgate.minhash makes for the row
    row = next(r for r in D.read_corpus(path)[0] if r["sample_id"] == "u0")
    first = t.slice(0, 1).to_pylist()[0]
    assert first["sample_id"] == "u0"
    assert first["minhash"] == message_signatures([row["messages"]], MinHash())[0].tolist()
