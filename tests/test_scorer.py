"""The one Scorer: head-only-where-needed parity, dtype rules, settings contract, poison rows."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from qgate import data as D
from qgate import hardware, losses, scoring
from qgate.batch_scoring import ScoringError, actor_layout, run_scoring, score_isolating
from qgate.config import ScoreConfig
from qgate.config_io import load_config
from qgate.model import forward, gate_parameters, load_gated_model
from qgate.scorer import Scorer, ScoringSettings


@pytest.fixture(scope="module")
def gated(tiny_model):
    """Tiny gated model with non-trivial gates."""
    model, tok, _ = load_gated_model(tiny_model, mode="probe", seed=3)
    with torch.no_grad():
        for k, p in gate_parameters(model).items():
            p.normal_(0, 0.5) if k.endswith("weight") else p.fill_(-0.2)
    return model, tok


def _encs(tok, corpus, n=6):
    rows = D.read_corpus(corpus["pool"])[0][:n]
    return [scoring.tokenize_for_scoring(tok, r["messages"], 128, "assistant", False) for r in rows]


def _settings(tiny_model, dtype="float32", **kw) -> ScoringSettings:
    args = dict(max_length=128, loss_on="assistant", alpha=1.0, eps=1e-8)
    args |= dict(embedding_dim=None, embedding_seed=0, ifd=False) | kw
    return ScoringSettings.for_model(tiny_model, None, dtype, **args)


def test_scored_token_nll_matches_full_logits(gated, corpus, monkeypatch):
    """Guards against the gathered, chunked LM head drifting from full-logits nll (an
    off-by-one between a token and the state that predicts it, or a chunk boundary)."""
    model, tok = gated
    encs = _encs(tok, corpus)
    ids = scoring._pad([e["input_ids"] for e in encs], tok.pad_token_id, "cpu")
    lab = scoring._pad([e["labels"] for e in encs], -100, "cpu")
    attn = scoring._pad([[1] * len(e["input_ids"]) for e in encs], 0, "cpu")
    with torch.no_grad():
        out, _ = forward(model, ids, attn)
        want, mask = losses.token_nll(out.logits, lab)
        monkeypatch.setattr(scoring, "HEAD_CHUNK_ELEMENTS", 7 * model.config.vocab_size)
        hidden, _ = forward(model, ids, attn, body_only=True)
        got, got_mask = scoring.scored_token_nll(model, hidden, lab)
    assert torch.equal(got_mask, mask)
    assert int(mask.sum()) > 7 * 3  # several chunks really ran
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_settings_round_trip_and_old_blocks(tiny_model):
    """Guards against the scores contract losing a field, or old manifests (no dtype) failing."""
    s = _settings(tiny_model, embedding_dim=8)
    assert ScoringSettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert s.embedding_dim_out == 8 and s.num_layers == 2 and s.hidden_size == 32
    old = {k: v for k, v in s.to_dict().items() if k != "dtype"}
    assert ScoringSettings.from_dict(old).dtype == "float32"
    with pytest.raises(ValueError, match="unknown scoring settings"):
        ScoringSettings.from_dict(s.to_dict() | {"surprise": 1})


def test_dtype_auto_follows_the_cpu(monkeypatch):
    """Guards against auto picking bf16 on a CPU that only emulates it (slower than fp32)."""
    hardware.cpu_native_bf16.cache_clear()
    monkeypatch.setenv("QGATE_CPU_BF16", "1")
    assert hardware.resolve_dtype("auto", "cpu") == torch.bfloat16
    hardware.cpu_native_bf16.cache_clear()
    monkeypatch.setenv("QGATE_CPU_BF16", "0")
    assert hardware.resolve_dtype("auto", "cpu") == torch.float32
    assert hardware.resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    hardware.cpu_native_bf16.cache_clear()
    with pytest.raises(ValueError, match="dtype must be one of"):
        hardware.resolve_dtype("fp8", "cpu")


def test_bf16_scores_close_to_fp32_and_mismatch_refused(tiny_model, corpus):
    """Guards against bf16 scoring changing ranks beyond its stated tolerance, and against an
    endpoint silently scoring in another dtype than its reference."""
    fp32 = Scorer(tiny_model, None, _settings(tiny_model, "float32"))
    bf16 = Scorer(tiny_model, None, _settings(tiny_model, "bfloat16"))
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    encs = _encs(fp32.tokenizer, corpus, 8)
    a, b = fp32.score(encs), bf16.score(encs)
    d_nll = max(abs(x["nll"] - y["nll"]) for x, y in zip(a, b))
    d_gate = max(float(np.abs(x["gate"] - y["gate"]).max()) for x, y in zip(a, b))
    assert 0 < d_nll < 0.2 and d_gate < 0.01
    with pytest.raises(ValueError, match="made in float32 but dtype=bfloat16"):
        Scorer(tiny_model, None, _settings(tiny_model, "float32"), dtype="bfloat16")


def test_scorer_view_shares_the_model_and_guards_fixed_settings(tiny_model, corpus):
    """Guards against the score job's second output (the head negatives, IFD off) loading
    the model again or scoring with the first output's settings, and against a view that
    changes what the loaded model fixed (dtype, projection)."""
    base = Scorer(tiny_model, None, _settings(tiny_model, ifd=True))
    view = base.with_settings(_settings(tiny_model, ifd=False))
    assert view.model is base.model and view.projection is base.projection
    assert (base.settings.ifd, view.settings.ifd) == (True, False)
    encs = _encs(view.tokenizer, corpus)
    alone = Scorer(tiny_model, None, _settings(tiny_model, ifd=False))
    for x, y in zip(view.score(encs), alone.score(encs), strict=True):
        assert x["ifd"] is None and abs(x["nll"] - y["nll"]) < 1e-6
    with pytest.raises(ValueError, match=r"cannot change \['dtype'\]"):
        base.with_settings(_settings(tiny_model, "bfloat16"))
    with pytest.raises(ValueError, match="embedding_dim"):
        base.with_settings(_settings(tiny_model, embedding_dim=8))


class _Flaky:
    """A scorer that raises whenever a batch holds a poisoned row (n_tokens == -1)."""

    def __init__(self, always=False):
        self.always, self.calls = always, 0

    def score(self, rows):
        self.calls += 1
        if self.always or any(r["n_tokens"] == -1 for r in rows):
            raise RuntimeError("boom")
        one = {"gate": np.zeros(2, np.float32), "embedding": np.ones(3, np.float32)}
        return [dict(one, nll=float(r["n_tokens"]), n_loss_tokens=1, ifd=None) for r in rows]


def test_poison_rows_are_isolated_and_real_errors_fail():
    """Guards against one bad sample failing a whole batch (or corpus), and against a real
    fault (every sample fails, e.g. out of memory) being hidden as rejects."""
    rows = [{"n_tokens": i} for i in range(16)]
    rows[5]["n_tokens"] = rows[11]["n_tokens"] = -1
    out = score_isolating(_Flaky(), rows)
    assert [i for i, o in enumerate(out) if o.get("reason") == D.SCORING_ERROR] == [5, 11]
    assert [o["nll"] for i, o in enumerate(out) if i not in (5, 11)] == [
        float(i) for i in range(16) if i not in (5, 11)
    ]
    nan = _Flaky()
    nan.score = lambda rs: [{"nll": float("nan"), "gate": np.zeros(2), "embedding": np.ones(3)}]
    assert score_isolating(nan, [{"n_tokens": 1}])[0]["reason"] == D.SCORING_ERROR
    with pytest.raises(ScoringError, match="not a data problem"):
        score_isolating(_Flaky(always=True), [{"n_tokens": i} for i in range(32)])


def test_actor_layout_uses_every_core(tiny_model, tmp_path):
    """Guards against a lone CPU actor getting one thread on a multi-core machine."""
    base = [f"base_model={tiny_model}", f"corpus=[{tmp_path}/x.jsonl]"]
    cfg = load_config(ScoreConfig, None, base)
    assert actor_layout(cfg, 2.0) == (2.0, 2)
    cfg = load_config(ScoreConfig, None, base + ["actors.max_size=2", "actors.min_size=2"])
    assert actor_layout(cfg, 4.0) == (2.0, 2)
    cfg = load_config(ScoreConfig, None, base + ["actors.num_cpus=3", "actors.threads=1"])
    assert actor_layout(cfg, 4.0) == (3.0, 1)
    with pytest.raises(ScoringError, match="never start"):
        actor_layout(cfg, 2.0)


def test_job_records_dtype_and_refuses_mixing(tiny_model, corpus, ray_session, tmp_path):
    """Guards against bf16 and fp32 scores landing in one output, and against the manifest
    not saying which dtype made the scores."""
    rows = D.read_corpus(corpus["pool"])[0][:30]
    path = str(tmp_path / "c.jsonl")
    D.write_jsonl(path, rows)
    out = str(tmp_path / "s")
    args = [f"base_model={tiny_model}", f"corpus=[{path}]", f"output={out}", f"run_dir={out}"]
    args += ["max_length=128", "batch_tokens=2048", "rows_per_shard=16", "actors.num_cpus=1"]
    m = run_scoring(load_config(ScoreConfig, None, args + ["dtype=bfloat16"]))
    assert m["dtype"] == "bfloat16" == m["scoring"]["dtype"] and m["scored"] == 30
    table = pq.read_table(os.path.join(out, "part-00000-000000.parquet"))
    assert np.isfinite(np.array(table.column("nll").to_pylist())).all()
    with pytest.raises(ScoringError, match="dtype included"):
        run_scoring(load_config(ScoreConfig, None, args + ["dtype=float32"]))
