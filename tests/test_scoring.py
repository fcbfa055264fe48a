"""Stage 2: score_batch math and padding invariance; the Ray Data job's exactly-once output."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM

from qgate import data as D
from qgate.batch_scoring import MANIFEST_FILE, ScoringError, run_scoring
from qgate.config import ScoreConfig
from qgate.config_io import load_config
from qgate.model import forward, gate_parameters, load_gated_model
from qgate.scoring import micro_batches, score_batch, tokenize_for_scoring

ALPHA, EPS = 1.0, 1e-8


@pytest.fixture(scope="module")
def gated(tiny_model):
    """Tiny gated model with non-trivial gates (random weights, varied biases)."""
    model, tok, _ = load_gated_model(tiny_model, mode="probe", seed=7)
    with torch.no_grad():
        for k, p in gate_parameters(model).items():
            p.normal_(0, 0.5) if k.endswith("weight") else p.fill_(0.3)
    return model, tok


def _samples(tok, corpus, n=8, ifd=False):
    rows = D.read_corpus(corpus["pool"])[0][:n]
    return [tokenize_for_scoring(tok, r["messages"], 128, "assistant", ifd) for r in rows]


def test_padding_invariance(gated, corpus):
    """Guards against a sample's stats depending on its batch-mates (padding, positions)."""
    model, tok = gated
    samples = _samples(tok, corpus, 8, ifd=True)
    assert len({len(s["input_ids"]) for s in samples}) > 2  # really mixed lengths
    one_call = 10**9  # a call costlier than any padding: the 8 samples share one padded batch
    assert len(micro_batches([len(s["input_ids"]) for s in samples], 4096, one_call)) == 1
    together = score_batch(
        model, samples, pad_id=tok.pad_token_id, ifd=True, batch_tokens=4096, call_tokens=one_call
    )
    for s, t in zip(samples, together):
        alone = score_batch(model, [s], pad_id=tok.pad_token_id, ifd=True)[0]
        assert abs(alone["nll"] - t["nll"]) < 1e-5 and abs(alone["ifd"] - t["ifd"]) < 1e-5
        for k in ("gate", "gate_mean", "embedding", "prompt_embedding"):
            np.testing.assert_allclose(alone[k], t[k], atol=1e-5)


def test_prompt_embedding_sees_the_prompt_not_the_answer(gated):
    """Guards against a prompt embedding that pools answer tokens (it would group rows by
    how they were answered, so a cluster of bad answers calibrates against itself): the same
    prompt with different answers gives the same prompt embedding, under both loss modes,
    equal to the mean final hidden state over the tokens before the answer."""
    model, tok = gated
    ask = {"role": "user", "content": "Name the capital of France."}
    convs = [
        [ask, {"role": "assistant", "content": "Paris."}],
        [ask, {"role": "assistant", "content": "zzq vrr blob blob blob blob"}],
        [{"role": "user", "content": "Sort 3, 1, 2."}, {"role": "assistant", "content": "Paris."}],
    ]
    for loss_on in ("assistant", "all"):
        encs = [tokenize_for_scoring(tok, c, 128, loss_on, False) for c in convs]
        assert encs[0]["n_prompt"] == encs[1]["n_prompt"] > 0
        assert (
            encs[0]["input_ids"][: encs[0]["n_prompt"]]
            == encs[1]["input_ids"][: encs[1]["n_prompt"]]
        )
        out = score_batch(model, encs, pad_id=tok.pad_token_id)
        np.testing.assert_allclose(
            out[0]["prompt_embedding"], out[1]["prompt_embedding"], atol=1e-5
        )
        assert np.abs(out[0]["embedding"] - out[1]["embedding"]).max() > 1e-3
        assert np.abs(out[0]["prompt_embedding"] - out[2]["prompt_embedding"]).max() > 1e-3
        ids = torch.tensor([encs[0]["input_ids"][: encs[0]["n_prompt"]]])
        with torch.no_grad():
            hidden, _ = forward(model, ids, torch.ones_like(ids), body_only=True)
        want = hidden[0].float().mean(0).numpy()
        np.testing.assert_allclose(
            out[0]["prompt_embedding"], want / np.linalg.norm(want), atol=1e-5
        )


def test_micro_batches_are_the_cheapest_partition_under_the_cap():
    """Guards against micro-batches that pad far more than they must (cutting greedily at the
    token cap padded a 64-row shard to twice its tokens) or that break the cap or lose rows:
    checked against every partition of the longest-first order."""
    import itertools

    rng = np.random.default_rng(3)
    for trial in range(40):
        n = int(rng.integers(1, 9))
        lengths = [int(x) for x in rng.integers(1, 60, n)]
        cap, per_call = int(rng.integers(40, 200)), int(rng.integers(0, 50))
        groups = micro_batches(lengths, cap, per_call)
        assert sorted(i for g in groups for i in g) == list(range(n))
        assert all(len(g) == 1 or len(g) * max(lengths[i] for i in g) <= cap for g in groups)

        def cost(gs, lengths=lengths, per_call=per_call):
            return sum(len(g) * max(lengths[i] for i in g) + per_call for g in gs)

        order = sorted(range(n), key=lambda i: (-lengths[i], i))
        best = float("inf")
        for cuts in itertools.product([False, True], repeat=n - 1):
            gs, cur = [], [order[0]]
            for i, cut in zip(order[1:], cuts):
                if cut:
                    gs.append(cur)
                    cur = []
                cur.append(i)
            gs.append(cur)
            if all(len(g) == 1 or len(g) * max(lengths[i] for i in g) <= cap for g in gs):
                best = min(best, cost(gs))
        assert cost(groups) == best, (trial, lengths, cap, per_call)


def test_gate_scores_match_independent_computation(gated, tiny_model, corpus):
    """Guards against wrong token weights, an off-by-one between gates and token ppl, or masks.

    The reference uses the unmodified HF model's logits and applies the saved gate weights to
    hooked post-attention-layernorm outputs: no qgate scoring code is involved.
    """
    model, tok = gated
    samples = _samples(tok, corpus, 4)
    got = score_batch(model, samples, pad_id=tok.pad_token_id, alpha=ALPHA, eps=EPS)
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    params = {k: v.detach() for k, v in gate_parameters(model).items()}
    for s, g in zip(samples, got):
        normed = []
        hooks = [
            layer.post_attention_layernorm.register_forward_hook(
                lambda m, i, o, acc=normed: acc.append(o)
            )
            for layer in base.model.layers
        ]
        ids = torch.tensor([s["input_ids"]])
        with torch.no_grad():
            logits = base(input_ids=ids).logits[0]
        for h in hooks:
            h.remove()
        labels = np.array(s["labels"])
        logp = torch.log_softmax(logits.double(), -1).numpy()
        scored = [t for t in range(1, len(labels)) if labels[t] != -100]
        nll = np.array([-logp[t - 1, labels[t]] for t in scored])
        ppl = np.exp(nll) ** ALPHA
        w = ppl / (ppl.sum() + EPS)
        for layer, x in enumerate(normed):
            z = (
                x[0].double() @ params[f"gate.{layer}.weight"][0].double()
                + params[f"gate.{layer}.bias"].double()
            )
            gate = torch.sigmoid(z).numpy()
            assert abs(float((w * gate[scored]).sum()) - g["gate"][layer]) < 1e-5
            assert abs(float(gate[scored].mean()) - g["gate_mean"][layer]) < 1e-5
        assert abs(nll.mean() - g["nll"]) < 1e-4
        assert g["n_loss_tokens"] == len(scored)


def _score_cfg(tiny_model, corpus_paths, out, *extra):
    args = [
        f"base_model={tiny_model}",
        f"corpus={json.dumps(corpus_paths)}",
        f"output={out}",
        f"run_dir={out}",
        "max_length=128",
        "batch_tokens=2048",
        "batch_rows=32",
        "rows_per_shard=40",
        "actors.num_cpus=0.5",
    ]
    return load_config(ScoreConfig, None, args + list(extra))


def _all_ids(out):
    """Scored ids (in file order) and {sample_id: [reasons]} of rejects in an output dir."""
    scored = [
        sid
        for p in sorted(os.listdir(out))
        if p.startswith("part-") and p.endswith(".parquet")
        for sid in pq.read_table(os.path.join(out, p)).column("sample_id").to_pylist()
    ]
    rej_dir = os.path.join(out, "rejects")
    rejects = {}
    for p in sorted(n for n in os.listdir(rej_dir) if n.endswith(".parquet")):
        t = pq.read_table(os.path.join(rej_dir, p)).to_pylist()
        for r in t:
            rejects.setdefault(r["sample_id"], []).append(r["reason"])
    return scored, rejects


def _bad_corpus(tmp_path, corpus):
    rows = D.read_corpus(corpus["pool"])[0][:60]
    good = [{"id": r["sample_id"], "messages": r["messages"]} for r in rows]
    lines = [json.dumps(r).encode() for r in good]
    bad = {
        "bad#row60": b'{"messages": [',
        "bad#row61": b'{"instruction": "x", "output": "\xff"}',
        "shape": json.dumps({"id": "shape", "text": "x"}).encode(),
        "noans": json.dumps(
            {"id": "noans", "messages": [{"role": "user", "content": "q"}]}
        ).encode(),
        "nonstr": json.dumps(
            {
                "id": "nonstr",
                "messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "a"}],
            }
        ).encode(),
        "role": json.dumps(
            {
                "id": "role",
                "messages": [
                    {"role": "bot", "content": "q"},
                    {"role": "assistant", "content": "a"},
                ],
            }
        ).encode(),
        "long": json.dumps(
            {
                "id": "long",
                "messages": [
                    {"role": "user", "content": "word " * 400},
                    {"role": "assistant", "content": "a"},
                ],
            }
        ).encode(),
    }
    lines += list(bad.values()) + [lines[3]]  # plus a duplicate of row 3
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    expected = {
        "bad#row60": D.MALFORMED_JSON,
        "bad#row61": D.INVALID_UTF8,
        "shape": D.UNKNOWN_SHAPE,
        "noans": D.MISSING_ASSISTANT,
        "nonstr": D.NON_STRING_CONTENT,
        "role": D.UNKNOWN_ROLE,
        "long": D.NO_ANSWER_AFTER_TRUNCATION,
        good[3]["id"]: D.DUPLICATE_ID,
    }
    return str(path), [r["id"] for r in good], expected


def test_every_row_once_with_reasons(tiny_model, corpus, ray_session, tmp_path):
    """Guards against bad rows being dropped, double-counted or given the wrong reason."""
    path, good_ids, expected = _bad_corpus(tmp_path, corpus)
    m = run_scoring(_score_cfg(tiny_model, [path], str(tmp_path / "scores")))
    scored, rejects = _all_ids(str(tmp_path / "scores"))
    assert sorted(scored) == sorted(good_ids) and len(scored) == len(set(scored))
    assert {k: v for k, v in rejects.items()} == {k: [v] for k, v in expected.items()}
    assert m["rows_in"] == 68 == m["scored"] + m["rejected"]
    assert not os.path.exists(tmp_path / "scores" / "_progress")  # no heartbeat outlives a job
    assert m["rejects_by_reason"][D.DUPLICATE_ID] == 1
    table = pq.read_table(os.path.join(tmp_path / "scores", "part-00000-000000.parquet"))
    assert table.schema.field("gate").type == pa.list_(pa.float32(), 2)
    assert table.column("ifd").null_count == 0


def test_a_shard_beats_while_it_is_scored(tiny_model, corpus, tmp_path):
    """Guards against the score watchdog crying stall during a healthy long shard (a slow
    model takes minutes per shard): the actor writes a heartbeat before each window, rows
    done of the shard, and removes it once the shard is written."""
    from qgate.batch_scoring import ShardScorer
    from qgate.scorer import ScoringSettings
    from qgate.watchdog import Heartbeats

    out = tmp_path / "s"
    beats = out / "_progress"
    beats.mkdir(parents=True)
    (out / "rejects").mkdir()
    (out / "_shards").mkdir()
    c = _score_cfg(tiny_model, [corpus["pool"]], str(out), "ifd=false")
    names = ("max_length", "loss_on", "alpha", "eps", "embedding_dim", "embedding_seed", "ifd")
    st = ScoringSettings.for_model(tiny_model, None, "float32", **{k: getattr(c, k) for k in names})
    runtime = {"device": "cpu", "threads": 1, "batch_tokens": 2048, "debug_tokens": False}
    actor = ShardScorer(
        tiny_model, None, [{"settings": st.to_dict(), "out": str(out)}], runtime | {"batch_rows": 8}
    )
    seen = []
    score = actor.outputs[0]["scorer"].score

    def watched(encs):
        seen.append(Heartbeats([str(beats)])())
        return score(encs)

    actor.outputs[0]["scorer"].score = watched
    info = actor.run_shard(
        {"shard": "00000-000000", "path": corpus["pool"], "start": 0, "stop": 30}
    )
    assert info["scored"] == 30
    assert [text for _, text in seen] == [
        f"shard 00000-000000, {done} of 30 rows done" for done in (0, 8, 16, 24)
    ]
    assert len({key for key, _ in seen}) == 4  # each beat is new progress to the watchdog
    assert os.listdir(beats) == [] and Heartbeats([str(beats)])() is None


def test_killed_actor_job_completes(tiny_model, corpus, ray_session, tmp_path):
    """Guards against an actor crash losing or duplicating rows."""
    fault = {"exit_after": 2, "marker": str(tmp_path / "died")}
    m = run_scoring(_score_cfg(tiny_model, [corpus["pool"]], str(tmp_path / "s")), fault=fault)
    assert (tmp_path / "died").exists()
    scored, rejects = _all_ids(str(tmp_path / "s"))
    ids = [r["sample_id"] for r in D.read_corpus(corpus["pool"])[0]]
    assert sorted(scored) == sorted(ids) and not rejects and m["scored"] == len(ids)


def test_interrupted_driver_resumes_without_duplicates(tiny_model, corpus, ray_session, tmp_path):
    """Guards against a re-launch appending, re-scoring done shards, or losing rows, and
    against a driver that raised leaving its actor pool running while the exception lives
    (a notebook keeps the last traceback)."""
    cfg = _score_cfg(tiny_model, [corpus["pool"]], str(tmp_path / "s"))
    cpus = ray_session.available_resources().get("CPU", 0.0)
    with pytest.raises(ScoringError, match="fault injection") as stopped:
        run_scoring(cfg, fault={"stop_after_shards": 2})
    deadline = time.time() + 8.0  # the pool is stopped, not left to finish the corpus
    while ray_session.available_resources().get("CPU", 0.0) < cpus and time.time() < deadline:
        time.sleep(0.2)
    assert ray_session.available_resources().get("CPU", 0.0) >= cpus, "actors outlived the raise"
    assert stopped.value.__traceback__ is not None  # the traceback was alive all along
    assert not os.path.exists(tmp_path / "s" / MANIFEST_FILE)
    # only finished markers: a shard in flight when the driver stopped may have left its
    # temp file behind (the full suite once saw one come and go), which resume ignores
    done = sorted(d for d in os.listdir(tmp_path / "s" / "_shards") if d.endswith(".json"))
    assert 2 <= len(done) < len(D.read_corpus(corpus["pool"])[0]) // 40
    mtimes = {d: os.path.getmtime(tmp_path / "s" / "_shards" / d) for d in done}
    m = run_scoring(cfg)
    assert all(os.path.getmtime(tmp_path / "s" / "_shards" / d) == t for d, t in mtimes.items())
    scored, _ = _all_ids(str(tmp_path / "s"))
    ids = [r["sample_id"] for r in D.read_corpus(corpus["pool"])[0]]
    assert sorted(scored) == sorted(ids) and m["scored"] == len(ids) == m["rows_in"]
    with pytest.raises(ScoringError, match="different corpus"):
        run_scoring(_score_cfg(tiny_model, [corpus["pool"]], str(tmp_path / "s"), "alpha=2.0"))


def test_parquet_input_equals_jsonl(tiny_model, corpus, ray_session, tmp_path):
    """Guards against format-dependent scores: the same rows as parquet score identically."""
    rows = D.read_corpus(corpus["pool"])[0][:50]
    D.write_jsonl(str(tmp_path / "c.jsonl"), rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    a = run_scoring(_score_cfg(tiny_model, [str(tmp_path / "c.jsonl")], str(tmp_path / "a")))
    b = run_scoring(_score_cfg(tiny_model, [str(tmp_path / "c.parquet")], str(tmp_path / "b")))
    ta = pq.read_table(tmp_path / "a" / "part-00000-000000.parquet").to_pydict()
    tb = pq.read_table(tmp_path / "b" / "part-00000-000000.parquet").to_pydict()
    assert a["scored"] == b["scored"] == 50
    assert ta["sample_id"] == tb["sample_id"] and ta["source"] == tb["source"]
    np.testing.assert_allclose(np.array(ta["gate"]), np.array(tb["gate"]), atol=1e-6)
    np.testing.assert_allclose(np.array(ta["nll"]), np.array(tb["nll"]), atol=1e-6)


def test_duplicate_pass_reads_ids_only_and_survives_digest_collisions(tmp_path, monkeypatch):
    """Guards against the end-of-job duplicate pass reading every scored part whole in the
    driver (80 GB at 10M rows of 2,048-dim embeddings), rewriting parts without duplicates,
    and against an 8-byte digest collision rejecting a row whose id is unique."""
    from qgate import batch_scoring as B

    (tmp_path / "rejects").mkdir()
    ids = [["a", "b", "c"], ["d", "b", "e"], ["f", "g", "a"]]
    for n, shard in enumerate(ids):
        table = pa.table({"sample_id": shard, "source": ["s"] * 3, "x": [float(n)] * 3})
        pq.write_table(table, tmp_path / f"part-{n}.parquet")
    before = (tmp_path / "part-0.parquet").stat().st_mtime_ns
    monkeypatch.setattr(B, "id_digests", lambda ids: np.zeros(len(ids), np.uint64))
    assert B.resolve_duplicates(str(tmp_path), ["0", "1", "2"]) == 2  # every digest collides
    kept = [
        pq.read_table(tmp_path / f"part-{n}.parquet").column("sample_id").to_pylist()
        for n in range(3)
    ]
    assert kept == [["a", "b", "c"], ["d", "e"], ["f", "g"]]
    assert (tmp_path / "part-0.parquet").stat().st_mtime_ns == before  # no duplicate: untouched
    rej = pq.read_table(tmp_path / "rejects" / "dup-1.parquet").to_pylist()
    assert [(r["sample_id"], r["reason"]) for r in rej] == [("b", D.DUPLICATE_ID)]
    monkeypatch.undo()
    assert B.resolve_duplicates(str(tmp_path), ["0", "1", "2"]) == 0  # idempotent
