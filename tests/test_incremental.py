"""Incremental selection: the selection log (idempotent, copy checks, quota, crash repair,
two writers), ``qgate extend`` against a full re-selection on the same reference, the log
feeding finetune, and recalibration over several scores directories."""

from __future__ import annotations

import json
import multiprocessing as mp
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from qgate import data as D
from qgate.config import MinHash
from qgate.minhash import exact_key, message_signatures
from qgate.selection_log import (
    ALREADY_COMMITTED,
    BUDGET_EXHAUSTED,
    COMMITTED,
    SelectionLog,
    read_log,
)


def _entry(i: int, prompt: str | None = None) -> dict:
    msgs = [
        {"role": "user", "content": prompt or f"Question number {i}: what is {i} plus {i * 3}?"},
        {"role": "assistant", "content": f"{i + i * 3}, because {i} and {i * 3} add up so."},
    ]
    sig = message_signatures([msgs], MinHash())[0].tolist()
    return {
        "id": f"s{i}",
        "source": "t",
        "messages": msgs,
        "text_key": exact_key(msgs),
        "minhash": sig,
    }


def test_log_is_idempotent_refuses_copies_and_keeps_the_quota(tmp_path):
    path = str(tmp_path / "log.jsonl")
    pool_msgs = [
        [
            {"role": "user", "content": "Name the capital of Peru."},
            {"role": "assistant", "content": "Lima"},
        ]
    ]
    pool = (
        ["pool-0"],
        message_signatures(pool_msgs, MinHash()),
        [bytes.fromhex(exact_key(pool_msgs[0]))],
    )
    log = SelectionLog(path, MinHash(), pool, max_commits=3)
    copy = {
        **_entry(99, "name the capital of  PERU."),
        "messages": [
            {"role": "user", "content": "name the capital of  PERU."},
            {"role": "assistant", "content": "lima"},
        ],
    }
    copy["text_key"] = exact_key(copy["messages"])
    near = _entry(0)
    near["id"] = "s0-again"
    near["messages"] = [dict(m) for m in near["messages"]]
    near["messages"][1]["content"] += "!"
    near["text_key"] = exact_key(near["messages"])
    near["minhash"] = message_signatures([near["messages"]], MinHash())[0].tolist()
    same_id = {**_entry(50), "id": "pool-0"}  # new text under a pool row's id
    res = log.commit([_entry(0), _entry(1), copy, near, _entry(0), same_id, _entry(2), _entry(3)])
    assert [r["status"] for r in res] == [
        COMMITTED,
        COMMITTED,
        D.DUPLICATE_TEXT,
        D.NEAR_DUPLICATE,
        ALREADY_COMMITTED,
        D.DUPLICATE_ID,
        COMMITTED,
        BUDGET_EXHAUSTED,
    ]
    assert res[2]["kept_id"] == "pool-0" and res[3]["kept_id"] == "s0"
    # a new writer (a restarted replica) reads the log back and stays idempotent
    again = SelectionLog(path, MinHash(), pool, max_commits=3)
    assert [r["status"] for r in again.commit([_entry(1)])] == [ALREADY_COMMITTED]
    assert [e["id"] for e in read_log(path)] == ["s0", "s1", "s2"]


def test_torn_last_line_is_cut_and_never_read(tmp_path):
    path = str(tmp_path / "log.jsonl")
    SelectionLog(path).commit([_entry(0)])
    with open(path, "ab") as f:
        f.write(b'{"id": "half", "mess')  # a writer died mid-line
    assert [e["id"] for e in read_log(path)] == ["s0"]
    assert [r["status"] for r in SelectionLog(path).commit([_entry(1)])] == [COMMITTED]
    assert [e["id"] for e in read_log(path)] == ["s0", "s1"]


def _writer(path: str, start: int, q) -> None:
    log = SelectionLog(path, MinHash())
    q.put([r["status"] for r in log.commit([_entry(i) for i in range(start, start + 40)])])


def test_two_writers_commit_each_sample_once(tmp_path):
    """Guards against two replicas appending the same retried sample twice."""
    path = str(tmp_path / "log.jsonl")
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(path, s, q)) for s in (0, 20, 0)]
    for p in procs:
        p.start()
    statuses = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    ids = [e["id"] for e in read_log(path)]
    assert sorted(ids) == sorted({f"s{i}" for i in range(60)}) and len(ids) == 60
    assert sum(s.count(COMMITTED) for s in statuses) == 60


# ----------------------------------------------------------------------------- extend


@pytest.fixture(scope="module")
def grown(tmp_path_factory, corpus, tiny_model, ray_session):
    """A pool scored and selected, and a second batch of new rows scored beside it."""
    import dataclasses

    from qgate.batch_scoring import run_scoring
    from qgate.config import ScoreConfig, SelectConfig
    from qgate.selection import run_selection
    from qgate.synthetic import generate_corpus

    run = str(tmp_path_factory.mktemp("grow"))
    new = generate_corpus(
        os.path.join(run, "new"), seed=7, n_pool=120, n_target=4, n_test=4, n_pretrain=0
    )
    with open(new["pool"]) as f:
        rows = [json.loads(line) for line in f]
    D.write_jsonl(new["pool"], [{**r, "id": f"new-{r['id']}"} for r in rows])  # ids of its own
    common = {"base_model": tiny_model, "max_length": 128, "rows_per_shard": 60}
    run_scoring(ScoreConfig(run_dir=run, corpus=[corpus["pool"]], **common))
    run_scoring(
        ScoreConfig(
            run_dir=run, corpus=[new["pool"]], output=os.path.join(run, "scores_new"), **common
        )
    )
    before = {
        p: os.stat(os.path.join(run, "scores", p)).st_mtime_ns
        for p in os.listdir(os.path.join(run, "scores"))
    }
    # ranked within prompt clusters, as select.yaml does: extend must read prompt embeddings
    sel_cfg = SelectConfig(run_dir=run, corpus=[corpus["pool"]], report=False)
    sel = run_selection(dataclasses.replace(sel_cfg, calibration="cluster"))
    return {"run": run, "new": new, "before": before, "sel": sel, "pool": corpus["pool"]}


def test_extend_adds_what_a_full_reselection_on_the_reference_selects(grown):
    """Guards against the batch path deciding differently from the reference's cutoffs."""
    from qgate.config import ExtendConfig
    from qgate.incremental import read_samples, run_extend
    from qgate.reference import Reference
    from qgate.selection import decide

    run = grown["run"]
    cfg = ExtendConfig(run_dir=run, scores=[os.path.join(run, "scores_new")])
    s = run_extend(cfg)
    ref = Reference.load(cfg.reference_path)
    # the full re-selection: every row, old and new, decided under the same reference
    everything = read_samples([os.path.join(run, "scores"), os.path.join(run, "scores_new")], ref)
    decisions = decide(ref, everything)
    new_ids = {x["sample_id"] for x in read_samples([os.path.join(run, "scores_new")], ref)}
    want = {
        x["sample_id"]
        for x, d in zip(everything, decisions, strict=True)
        if d["selected"] and x["sample_id"] in new_ids
    }
    refused = s["statuses"].get(D.DUPLICATE_TEXT, 0) + s["statuses"].get(D.NEAR_DUPLICATE, 0)
    logged = [e["id"] for e in read_log(cfg.log_path)]
    assert s["passed"] == len(want) and len(logged) == len(want) - refused
    assert set(logged) <= want and len(set(logged)) == len(logged)
    assert 0 < len(logged) < s["new_rows"] == 120
    # pool rows decide as the selection did (rows at a cutoff within float noise aside)
    sel = {
        r["sample_id"]: r["selected"]
        for r in pq.read_table(os.path.join(run, "selection", "selection.parquet")).to_pylist()
    }
    agree = [
        d["selected"] == sel[x["sample_id"]]
        for x, d in zip(everything, decisions, strict=True)
        if x["sample_id"] in sel and abs(d["margin"]) > 1e-6
    ]
    assert all(agree) and len(agree) >= len(sel) - 2
    # nothing already scored was rewritten
    after = {
        p: os.stat(os.path.join(run, "scores", p)).st_mtime_ns
        for p in os.listdir(os.path.join(run, "scores"))
    }
    assert after == grown["before"]
    # a retried run appends nothing
    again = run_extend(cfg)
    assert again["committed"] == 0 and again["statuses"].get(ALREADY_COMMITTED) == len(logged)
    assert [e["id"] for e in read_log(cfg.log_path)] == logged


def test_log_feeds_finetune(grown, tiny_model):
    from qgate.config import FinetuneConfig
    from qgate.finetune import prepare

    log = os.path.join(grown["run"], "selection", "log.jsonl")
    if not os.path.exists(log):  # this test may run alone
        from qgate.config import ExtendConfig
        from qgate.incremental import run_extend

        run_extend(
            ExtendConfig(run_dir=grown["run"], scores=[os.path.join(grown["run"], "scores_new")])
        )
    cfg = FinetuneConfig(
        run_dir=grown["run"],
        target_model=tiny_model,
        data=[log],
        max_steps=2,
        batch_size=2,
        max_length=128,
    )
    _, rows = prepare(cfg)
    assert sorted(r["sample_id"] for r in rows) == sorted(e["id"] for e in read_log(log))


def test_recalibration_selects_over_old_and_new_scores(grown, tmp_path):
    from qgate.config import SelectConfig
    from qgate.selection import run_selection

    run = grown["run"]
    s = run_selection(
        SelectConfig(
            run_dir=run,
            more_scores=[os.path.join(run, "scores_new")],
            corpus=[grown["pool"], grown["new"]["pool"]],
            output=str(tmp_path / "recal"),
            report=False,
        )
    )
    assert s["rows"] == grown["sel"]["rows"] + 120 - _rejected(os.path.join(run, "scores_new"))
    with open(tmp_path / "recal" / "reference.json") as f:
        assert json.load(f)["counts"]["scored"] == s["rows"]
    assert np.isclose(s["selected"], round(0.3 * s["rows"]), atol=1)


def _rejected(scores_dir: str) -> int:
    with open(os.path.join(scores_dir, "_manifest.json")) as f:
        return json.load(f)["rejected"]
