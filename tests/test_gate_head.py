"""The gate head: a logistic read-out of the per-layer gate scores, fitted on real rows
against corrupted copies; its fit, its batch-independence, and a selection that uses it
(the pool's q, reference.json and decide() for a new sample)."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score
from test_selection import L, cfg_for, pool_samples, read_selection, write_pool

from qgate import ranking
from qgate import selection as sel
from qgate.gate_head import NEGATIVES_DIR, GateHead, fit_gate_head
from qgate.reference import Reference


def _layers(n, good, rng):
    """Gate vectors where layers 1.. open on good rows and layer 0 opens on bad ones: the
    case where DESIGN.md's equal-weight q is pulled the wrong way by one layer."""
    S = rng.uniform(0.3, 0.7, (n, L))
    sign = 1.0 if good else -1.0
    S[:, 1:] += 0.06 * sign
    S[:, :1] -= 0.25 * sign
    return S.clip(0.01, 0.99)


def test_head_learns_layer_weights_that_the_formula_cannot():
    """Guards against a head that does not learn from the negatives: on gates where one layer
    opens on bad rows, the head must rank held-out rows far better than equal-weight q."""
    rng = np.random.default_rng(0)
    head = fit_gate_head(_layers(400, True, rng), _layers(400, False, rng))
    assert head.coef[0] < 0 < head.coef[1:].min()  # the misleading layer gets a negative weight
    assert head.n_real == head.n_negative == 400 and head.auroc > 0.95
    good = rng.random(600) < 0.7
    S = np.vstack([_layers(int(good.sum()), True, rng), _layers(int((~good).sum()), False, rng)])
    y = np.r_[np.ones(good.sum()), np.zeros((~good).sum())]
    q = ranking.quality_scores(S, ranking.column_stats([S]))
    assert roc_auc_score(y, head.score(S)) > 0.95 > 0.6 > roc_auc_score(y, q)


def test_head_score_is_batch_independent_and_round_trips():
    """Guards against a row's head value depending on its batch-mates (the pool's q must
    equal Serve's for the same row) or changing through reference.json."""
    rng = np.random.default_rng(1)
    head = fit_gate_head(_layers(50, True, rng), _layers(50, False, rng))
    S = rng.uniform(0, 1, (37, L)).astype(np.float32)
    batch = head.score(S)
    assert all(head.score(S[i])[0] == batch[i] for i in range(len(S)))
    again = GateHead.from_dict(json.loads(json.dumps(head.to_dict())))
    assert np.array_equal(again.score(S), batch)


def test_head_refuses_too_few_rows_bad_values_and_other_widths():
    rng = np.random.default_rng(2)
    with pytest.raises(sel.SelectionError, match="needs >= 10 real and corrupted rows"):
        fit_gate_head(_layers(50, True, rng), _layers(3, False, rng))
    bad = _layers(50, False, rng)
    bad[4, 2] = np.nan
    with pytest.raises(sel.SelectionError, match="NaN or inf"):
        fit_gate_head(_layers(50, True, rng), bad)
    head = fit_gate_head(_layers(50, True, rng), _layers(50, False, rng))
    with pytest.raises(sel.SelectionError, match=f"has {L + 1} layers, the gate head has {L}"):
        head.score(np.zeros((2, L + 1)))


def _write_negatives(scores, n, rng):
    """RUN/scores/head_negatives: corrupted copies of the first n pool rows, with gate
    vectors lower than any pool row's on layers 1.. (what a trained gate does)."""
    pool = pool_samples(scores)
    ids = sorted(pool)[:n]
    S = np.stack([pool[i]["gate"] for i in ids]) - 0.2
    S[:, 0] += 0.4
    out = os.path.join(scores, NEGATIVES_DIR)
    os.makedirs(out)
    table = pa.table(
        {
            "sample_id": [f"{i}~swap" for i in ids],
            "gate": pa.FixedSizeListArray.from_arrays(pa.array(S.astype(np.float32).ravel()), L),
        }
    )
    pq.write_table(table, os.path.join(out, "part-00000.parquet"))
    with open(os.path.join(out, "_manifest.json"), "w") as f:
        json.dump({"version": 1, "complete": True, "rows_in": n, "scored": n, "rejected": 0}, f)


def test_selection_with_the_head_matches_decide_and_refuses_without_negatives(tmp_path):
    """Guards against the head's q differing between the pool selection and a new sample
    (Serve, extend), the fitted head missing from reference.json, or a head selection
    running silently without the negatives it needs."""
    scores, _ = write_pool(tmp_path, n=200)
    kw = dict(method="worst_rank", signals=["gate", "ifd"], gate_score="head", report=False)
    with pytest.raises(
        sel.SelectionError, match="gate_score: head needs the gate head's negatives"
    ):
        sel.run_selection(cfg_for(tmp_path, **kw))
    _write_negatives(scores, 60, np.random.default_rng(3))
    sel.run_selection(cfg_for(tmp_path, **(kw | {"report": True})))
    with open(os.path.join(tmp_path, "selection", "report.html")) as f:
        assert "gate head, fitted on 60 real rows and 60 corrupted copies" in f.read()
    ref = Reference.load(os.path.join(tmp_path, "selection", "reference.json"))
    head = GateHead.from_dict(ref.gate_head)
    assert head.n_real == head.n_negative == 60 and head.coef[0] < 0
    t = read_selection(tmp_path).to_pylist()
    stats = pool_samples(scores)
    assert [r["q"] for r in t] == list(head.score([stats[r["sample_id"]]["gate"] for r in t]))
    got = sel.decide(ref, [stats[r["sample_id"]] for r in t])
    assert [g["q"] for g in got] == [r["q"] for r in t]
    assert [g["selected"] for g in got] == [r["selected"] for r in t]
    plain = cfg_for(tmp_path, method="worst_rank", signals=["gate", "ifd"], report=False)
    sel.run_selection(plain)  # the formula's reference.json has no gate_head key at all
    with open(os.path.join(tmp_path, "selection", "reference.json")) as f:
        assert "gate_head" not in json.load(f)
