"""The contrast gate objective: corrupted negatives, the loss, a warmup that learns it, and
the seed-parity gate without a bias."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from qgate import losses
from qgate import model as M
from qgate import warmup as stage
from qgate.config import ConfigError, WarmupConfig
from qgate.config_io import load_config
from qgate.corruption import CORRUPTIONS, DEFAULT_CORRUPTIONS, corrupt, make_negatives
from qgate.data import read_corpus
from qgate.scorer import Scorer, ScoringSettings

SMALL = ["batch_size=8", "max_length=96", "scaling.num_workers=1", "lr=0.05"]


def score_parts_table(scores_dir: str) -> dict:
    """A scores directory's part files as one column dict, in input order."""
    import glob

    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = sorted(glob.glob(os.path.join(scores_dir, "part-*.parquet")))
    return pa.concat_tables([pq.read_table(p) for p in parts]).to_pydict()


def _answer(row) -> str:
    return [m for m in row["messages"] if m["role"] == "assistant"][-1]["content"]


def test_negatives_are_deterministic_and_only_change_the_answer(corpus):
    """Guards against negatives that differ between a run and its resume, that leave the
    answer unchanged (a 'negative' equal to a real row), or that touch the prompt."""
    n = 8 * len(CORRUPTIONS)
    rows = read_corpus(corpus["pool"])[0][:n]
    a, b = (
        make_negatives(rows, list(CORRUPTIONS), seed=1),
        make_negatives(rows, list(CORRUPTIONS), 1),
    )
    assert a == b and len(a) == n
    assert make_negatives(rows, list(CORRUPTIONS), seed=2) != a
    by_id = {r["sample_id"]: r for r in rows}
    kinds = {}
    for neg in a:
        src_id, kind = neg["sample_id"].rsplit("~", 1)
        src = by_id[src_id]
        kinds[kind] = kinds.get(kind, 0) + 1
        assert _answer(neg) != _answer(src) and _answer(neg).strip()
        assert neg["messages"][:-1] == src["messages"][:-1]  # the prompt is untouched
    assert kinds == {k: 8 for k in CORRUPTIONS}  # round-robin over the kinds


def test_extend_runs_the_answer_on_with_another_rows_answer():
    """Guards against an `extend` copy that does not run on past its source's answer: it
    teaches the gate that a good answer ends where its prompt is answered (what tells a
    boilerplate refusal or an answer to another question from a real one)."""

    def make(sample_id: str, prompt: str, answer: str) -> dict:
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        return {"sample_id": sample_id, "source": "s", "messages": turns}

    row, donor = make("r1", "Capital of Peru?", "Lima. "), make("r2", "2 + 2?", " It is 4.")
    got = corrupt(row, "extend", random.Random(0), donor)
    assert got["sample_id"] == "r1~extend" and got["messages"][0] == row["messages"][0]
    assert got["messages"][1] == {"role": "assistant", "content": "Lima. It is 4."}
    with pytest.raises(ValueError, match="extend needs a donor"):
        corrupt(row, "extend", random.Random(0))
    rows = [row, donor, dict(row, sample_id="r3")]
    for neg in make_negatives(rows, ["extend"], seed=0):
        src = next(r for r in rows if r["sample_id"] == neg["sample_id"].rsplit("~", 1)[0])
        assert len(_answer(neg)) > len(_answer(src).rstrip())


def test_prompt_answers_with_the_donors_last_user_turn():
    """Guards against a `prompt` copy that takes the donor's answer or system turn, or
    touches the row's own prompt: its answer is the donor's user turn, fluent and no answer."""

    def make(sample_id: str, *turns: tuple[str, str]) -> dict:
        messages = [{"role": role, "content": text} for role, text in turns]
        return {"sample_id": sample_id, "source": "s", "messages": messages}

    row = make("r1", ("system", "Be brief."), ("user", "Capital of Peru?"), ("assistant", "Lima."))
    donor = make(
        "r2",
        ("user", "Hi"),
        ("assistant", "Hello."),
        ("user", "Sort 3 1 2."),
        ("assistant", "1 2 3"),
    )
    got = corrupt(row, "prompt", random.Random(0), donor)
    assert got["sample_id"] == "r1~prompt" and got["messages"][:2] == row["messages"][:2]
    assert got["messages"][2] == {"role": "assistant", "content": "Sort 3 1 2."}


def test_contrast_loss_is_bce_of_the_scored_gate():
    """Guards against the contrast loss pooling gates differently from the score stage."""
    gates = torch.tensor([[[0.9, 0.8, 0.1]], [[0.2, 0.3, 0.9]]])  # (B=2, L=1, T=3)
    w = torch.tensor([[0.0, 0.5, 0.5], [0.0, 1.0, 0.0]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    is_neg = torch.tensor([False, True])
    got = losses.quality_terms(gates, mask, "contrast", is_neg, weights=w).mean()
    s = torch.tensor([0.45, 0.3])  # sum_t w_t g_t
    want = -(torch.log(s[0]) + torch.log(1 - s[1])) / 2
    torch.testing.assert_close(got, want)


def test_score_alpha_follows_the_gates_unless_set(capsys):
    """Guards against the score stage weighing tokens otherwise than a contrast warmup trained
    its gates to (alpha unset), or overriding the gates' alpha without saying so (alpha set)."""
    from qgate.scorer import scoring_alpha

    def meta(extra):
        return M.GateMeta("probe", 2, 8, "base", 0.0, extra=extra)

    contrast0 = meta({"loss": "contrast", "alpha": 0.0})
    assert scoring_alpha(None, contrast0) == 0.0
    assert scoring_alpha(None, meta({"loss": "linear"})) == 1.0  # trained without weights
    assert scoring_alpha(None, None) == 1.0  # fresh gates
    assert capsys.readouterr().out == ""
    assert scoring_alpha(1.0, contrast0) == 1.0
    assert "differs from the alpha the gates were trained with (0)" in capsys.readouterr().out
    assert scoring_alpha(0.0, contrast0) == 0.0 and capsys.readouterr().out == ""


@pytest.fixture(scope="module")
def contrast_run(tiny_model, corpus, ray_session, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("contrast")
    args = [f"base_model={tiny_model}", f"corpus={corpus['pool']}", f"run_dir={run_dir}"]
    args += SMALL + ["loss=contrast", "target_fraction=0.5", "max_steps=40"]
    args += ["report_every=10", "checkpoint_every=40", "gate_bias=false", "head_negatives=24"]
    cfg = load_config(WarmupConfig, None, args)
    return cfg, stage.run(cfg)


def test_contrast_warmup_trains_and_scores_like_the_score_stage(contrast_run, tiny_model, corpus):
    """Guards against a contrast warmup that never updates the gates, loses its recipe from
    qgate.json, or writes gates the score stage's Scorer cannot use. (Whether the gate learns
    quality is measured on a real base in bench/quality.py: this tiny model is untrained.)"""
    cfg, summary = contrast_run
    hist = summary["history"]
    assert [h["step"] for h in hist] == [10, 20, 30, 40]
    assert all(0 < h["quality_loss"] < 2 for h in hist)
    gates = os.path.join(cfg.run_dir, "warmup")
    meta = M.read_meta(gates)
    assert meta.extra["loss"] == "contrast" and meta.extra["corruptions"] == list(
        DEFAULT_CORRUPTIONS
    )
    fresh, _, _ = M.load_gated_model(tiny_model, mode="probe", seed=cfg.seed, bias=False)
    trained, _, _ = M.load_gated_model(tiny_model, gates=gates)
    a, b = M.gate_parameters(fresh), M.gate_parameters(trained)
    assert all(not torch.equal(a[k], b[k]) for k in a)
    settings = ScoringSettings.for_model(
        tiny_model,
        meta,
        "float32",
        max_length=96,
        loss_on="assistant",
        alpha=1.0,
        eps=1e-8,
        embedding_dim=None,
        embedding_seed=0,
        ifd=False,
    )
    scorer = Scorer(tiny_model, gates, settings)
    rows = read_corpus(corpus["pool"])[0][:8]
    stats = scorer.score([scorer.tokenize(r["messages"]) for r in rows])
    g = np.stack([st["gate"] for st in stats])
    assert g.shape == (8, 2) and ((g > 0) & (g < 1)).all()


def test_gate_without_bias_saves_and_reloads(contrast_run, tiny_model):
    """Guards against the seed-parity gate (no bias) gaining a bias on save or reload."""
    cfg, _ = contrast_run
    model, _, meta = M.load_gated_model(tiny_model, gates=os.path.join(cfg.run_dir, "warmup"))
    assert meta.bias is False and all(m.qgate.bias is None for m in M.gated_mlps(model))
    assert sorted(M.gate_parameters(model)) == ["gate.0.weight", "gate.1.weight"]


def test_contrast_config_checks(tiny_model, corpus, tmp_path):
    """Guards against an unknown corruption or a mix-mode contrast run starting at all."""
    base = [f"base_model={tiny_model}", f"corpus={corpus['pool']}", f"run_dir={tmp_path}"]
    with pytest.raises(ConfigError, match="corruptions"):
        load_config(WarmupConfig, None, base + ["loss=contrast", "corruptions=[typo]"])
    with pytest.raises(ConfigError, match="mode"):
        load_config(WarmupConfig, None, base + ["loss=contrast", "mode=mix"])


def test_head_negatives_are_written_scored_and_fit_a_head(contrast_run, tiny_model, corpus):
    """Guards against the gate head's chain breaking between stages: the warmup writes its
    corrupted copies beside the gates, the score stage scores them (gate columns, no IFD)
    before it marks the scores complete, and a selection with gate_score: head fits on them
    and records the head in reference.json."""
    import json

    from jobs.score import summary_lines
    from qgate.batch_scoring import run_scoring
    from qgate.config import ScoreConfig, SelectConfig
    from qgate.gate_head import NEGATIVES_DIR, NEGATIVES_FILE, GateHead
    from qgate.reference import Reference
    from qgate.selection import run_selection

    cfg, summary = contrast_run
    gates = os.path.join(cfg.run_dir, "warmup")
    with open(os.path.join(gates, NEGATIVES_FILE)) as f:
        negatives = [json.loads(line) for line in f]
    real = {r["sample_id"]: r for r in read_corpus(corpus["pool"])[0]}
    assert summary["head_negatives"] == len(negatives) == 24
    for n in negatives:  # a copy of a pool row with only its answer changed
        origin, kind = n["id"].rsplit("~", 1)
        assert kind in CORRUPTIONS and n["messages"][:-1] == real[origin]["messages"][:-1]
        assert n["messages"][-1] != real[origin]["messages"][-1]
    common = [f"base_model={tiny_model}", f"corpus=[{corpus['pool']}]", f"run_dir={cfg.run_dir}"]
    m = run_scoring(load_config(ScoreConfig, None, common + ["max_length=96"]))
    assert m["head_negatives"] == {"dir": NEGATIVES_DIR, "scored": 24, "rejected": 0}
    neg = os.path.join(m["output"], NEGATIVES_DIR)
    with open(os.path.join(neg, "_manifest.json")) as f:
        assert json.load(f)["scoring"]["ifd"] is False
    assert "the gate head's negatives: 24 scored, 0 rejected" in summary_lines(m)
    # scored on the corpus's pool, with the negatives' own settings: as if scored alone
    alone_argv = [f"base_model={tiny_model}", f"corpus=[{os.path.join(gates, NEGATIVES_FILE)}]"]
    alone_argv += [f"run_dir={cfg.run_dir}", f"gates={gates}", "max_length=96", "ifd=false"]
    alone_argv += [f"output={os.path.join(cfg.run_dir, 'negatives_alone')}"]
    alone = run_scoring(load_config(ScoreConfig, None, alone_argv), head_negatives=False)
    a, b = (score_parts_table(d) for d in (neg, alone["output"]))
    assert a["sample_id"] == b["sample_id"] and a["ifd"] == b["ifd"] == [None] * 24
    assert np.allclose(np.array(a["gate"]), np.array(b["gate"]), atol=1e-6)
    sel = [f"corpus=[{corpus['pool']}]", f"run_dir={cfg.run_dir}", "report=false"]
    sel += ["method=worst_rank", "signals=[gate, ifd]", "gate_score=head"]
    run_selection(load_config(SelectConfig, None, sel))
    ref = Reference.load(os.path.join(cfg.run_dir, "selection", "reference.json"))
    head = GateHead.from_dict(ref.gate_head)
    assert head.n_real == head.n_negative == 24 and head.coef.shape == (2,)
