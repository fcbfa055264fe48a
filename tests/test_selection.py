"""Selection: q, round-robin, budgets, quotas, determinism, corpus join, manifest checks,
decide() parity with the pool, percentiles, report and the job entry point."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qgate import budget, ranking
from qgate import selection as sel
from qgate.config import SelectConfig
from qgate.config_io import load_config
from qgate.data import read_corpus
from qgate.reference import Reference

L, D = 4, 8
NOISE = ("gibberish", "loop")


def _normalize(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


TASK_OFFSETS = (0.0, 0.0, -0.3, -0.6)
"""Gate offsets of the prompt tasks of write_pool: tasks 2 and 3 are harder, not worse."""


def write_pool(
    root,
    n=300,
    parts=3,
    seed=0,
    ifd_null=0.05,
    manifest_patch=None,
    prompt_embedding=True,
    task_offsets=(0.0,) * 4,
):
    """Synthetic RUN/scores (parts in shuffled row order + manifest) and a labelled corpus.

    Clean rows and source 'a' get higher gate values, so q separates them; embeddings sit
    around 3 directions. Each row asks one of 4 tasks (its prompt embedding sits near the
    task's direction, whatever its source or noise), and a task's rows get its gate offset
    (``task_offsets``, e.g. TASK_OFFSETS). Returns (scores_dir, corpus_path).
    """
    rng = np.random.default_rng(seed)
    ids = np.asarray([f"s{i:05d}" for i in range(n)])
    sources = rng.choice(["a", "b", "c"], n)
    noise = np.where(rng.random(n) < 0.3, rng.choice(NOISE, n), "clean")
    gate = rng.uniform(0.2, 0.8, (n, L)) + 0.15 * (noise == "clean")[:, None]
    gate += 0.1 * (sources == "a")[:, None]
    centres = _normalize(rng.normal(size=(3, D)))
    emb = _normalize(centres[rng.integers(0, 3, n)] + 0.3 * rng.normal(size=(n, D)))
    nll = rng.gamma(2.0, 1.0, n) + 1.0 * (noise == "gibberish")
    ifd = rng.uniform(0.5, 1.5, n) + 0.3 * (noise == "loop")
    ifd_valid = rng.random(n) >= ifd_null
    n_loss = rng.integers(5, 200, n)
    task = rng.integers(0, len(task_offsets), n)
    gate += np.asarray(task_offsets)[task][:, None]
    tasks = _normalize(np.eye(D)[: len(task_offsets)] * 3 + 0.1 * rng.normal(size=(4, D)))
    prompt = _normalize(tasks[task] + 0.1 * rng.normal(size=(n, D)))

    scores = os.path.join(root, "scores")
    os.makedirs(scores, exist_ok=True)
    perm = rng.permutation(n)
    for j, chunk in enumerate(np.array_split(perm, parts)):
        m = len(chunk)
        table = pa.table(
            {
                "sample_id": pa.array(ids[chunk].tolist()),
                "source": pa.array(sources[chunk].tolist()),
                "n_tokens": pa.array(n_loss[chunk] + 10, pa.int32()),
                "n_loss_tokens": pa.array(n_loss[chunk], pa.int32()),
                "truncated": pa.array(np.zeros(m, bool)),
                "nll": pa.array(nll[chunk], pa.float32()),
                "gate": pa.FixedSizeListArray.from_arrays(
                    pa.array(gate[chunk].astype(np.float32).ravel()), L
                ),
                "gate_mean": pa.FixedSizeListArray.from_arrays(
                    pa.array(gate[chunk].astype(np.float32).ravel()), L
                ),
                "embedding": pa.array(
                    emb[chunk].astype(np.float32).tolist(), pa.list_(pa.float32())
                ),
                "ifd": pa.array(ifd[chunk], pa.float32(), mask=~ifd_valid[chunk]),
            }
        )
        if prompt_embedding:
            table = table.append_column(
                "prompt_embedding",
                pa.FixedSizeListArray.from_arrays(
                    pa.array(prompt[chunk].astype(np.float32).ravel()), D
                ),
            )
        pq.write_table(table, os.path.join(scores, f"part-{j:05d}.parquet"))

    corpus = os.path.join(root, "pool.jsonl")
    with open(corpus, "w") as f:
        f.write("{not json\n")  # a reject: scored stages count it in rows_in
        for i in rng.permutation(n):
            row = {
                "id": ids[i],
                "source": sources[i],
                "noise": noise[i],
                "task": int(task[i]),
                "messages": [
                    {"role": "user", "content": f"question {i}"},
                    {"role": "assistant", "content": f"answer {i}"},
                ],
            }
            f.write(json.dumps(row) + "\n")
    manifest = {
        "version": 1,
        "complete": True,
        "rows_in": n + 1,
        "scored": n,
        "rejected": 1,
        "rejects_by_reason": {"malformed_json": 1},
        "model_digest": "m0",
        "gates_digest": "g0",
        "scoring": {"max_length": 64, "num_layers": L, "embedding_dim": D, "ifd": True},
        "config": {"corpus": [corpus]},
    }
    manifest.update(manifest_patch or {})
    with open(os.path.join(scores, "_manifest.json"), "w") as f:
        json.dump(manifest, f)
    return scores, corpus


def cfg_for(root, **kw) -> SelectConfig:
    scores, corpus = os.path.join(root, "scores"), os.path.join(root, "pool.jsonl")
    base = dict(scores=scores, corpus=[corpus], output=os.path.join(root, "selection"))
    base["method"] = "quality_gate"  # these tests pin the method; the package default may move
    base.update(kw)
    return SelectConfig(**base)


def read_selection(root, name="selection"):
    return pq.read_table(os.path.join(root, name, "selection.parquet"))


def pool_samples(scores_dir):
    """The per-sample stats dicts the endpoint would pass to decide(), by sample_id."""
    out = {}
    for p in sorted(os.listdir(scores_dir)):
        if p.startswith("part-"):
            for r in pq.read_table(os.path.join(scores_dir, p)).to_pylist():
                out[r["sample_id"]] = r
    return out


# ----------------------------------------------------------------------------- q


def _q_reference(S, tau, eps):
    """Independent, loop-based implementation of DESIGN.md's formula."""
    n, layers = S.shape
    a, b, mu = S.min(axis=0), S.max(axis=0), S.mean(axis=0)
    q = np.zeros(n)
    for i in range(n):
        total = 0.0
        for j in range(layers):
            second = mu[j] + tau if tau > 0 else max(mu[j], eps)
            total += (S[i, j] - a[j]) / (max(b[j] - a[j], eps) * second)
        q[i] = total / layers
    return q


@pytest.mark.parametrize("tau", [0.0, 0.5])
def test_quality_scores_match_independent_formula(tau):
    """Guards against a wrong normaliser (tau branch, eps clamps, constant or zero columns)
    and against streaming stats that differ from whole-matrix stats."""
    rng = np.random.default_rng(1)
    S = rng.uniform(0, 1, (500, 6))
    S[:, 2] = 0.5  # constant column: b - a = 0 -> eps
    S[:, 4] = 0.0  # constant zero column: mu = 0 -> eps (tau = 0) or tau
    S[:, 5] *= 1e-3
    stats = ranking.column_stats(np.array_split(S, 7))
    np.testing.assert_allclose(stats.a, S.min(0))
    np.testing.assert_allclose(stats.b, S.max(0))
    np.testing.assert_allclose(stats.mu, S.mean(0), rtol=1e-12)
    q = ranking.quality_scores(S, stats, tau=tau, eps=1e-8)
    np.testing.assert_allclose(q, _q_reference(S, tau, 1e-8), rtol=1e-10)
    # A row alone scores bit-identically to the same row inside a batch.
    assert ranking.quality_scores(S[17], stats, tau, 1e-8)[0] == q[17]


# ----------------------------------------------------------------------------- round-robin


def test_round_robin_matches_hand_worked_example():
    """Guards against a wrong interleave order, ties not broken by sample_id, exhausted
    clusters not skipped, NaN scores being taken, or dependence on input order."""
    rows = [  # (sample_id, cluster, score)
        ("s", 0, 0.2),
        ("r", 0, 0.7),
        ("p", 0, 0.9),
        ("q", 0, 0.7),
        ("n", 1, 0.1),
        ("m", 1, 0.95),
        ("z", 2, 0.5),
        ("y", 2, float("nan")),
    ]
    ids, clusters, scores = zip(*rows, strict=True)
    # Round 1: p (c0), m (c1), z (c2). Round 2: q (c0; ties r at 0.7, q < r), n (c1); c2 is
    # exhausted (y has no score). Round 3: r. Budget 6 stops here; s is never reached.
    expected = ["p", "m", "z", "q", "n", "r"]
    assert budget.round_robin(scores, clusters, ids, 6) == expected
    assert budget.round_robin(scores[::-1], clusters[::-1], ids[::-1], 6) == expected
    # A budget above the candidates takes all 7 candidates, never the NaN row.
    assert budget.round_robin(scores, clusters, ids, 20) == ["p", "m", "z", "q", "n", "r", "s"]
    # Quota: source x may hold 0.34 * 6 -> 2 rows; its third row (q) is skipped.
    sources = ["x" if i in ("p", "q", "r") else "y" for i in ids]
    got = budget.round_robin(scores, clusters, ids, 6, sources, {"x": 0.34})
    assert got == ["p", "m", "z", "q", "n", "s"]


# ----------------------------------------------------------------------------- budget, quotas


def test_budget_is_exact_for_ratio_and_count(tmp_path):
    """Guards against off-by-one budgets (rounding, round-robin overshoot) and the
    selected.jsonl count drifting from the selected flags."""
    assert budget.budget_rows(SelectConfig(budget_ratio=0.25), 10) == 3  # 2.5 rounds half up
    assert budget.budget_rows(SelectConfig(budget_ratio=0.001), 10) == 1  # at least one
    write_pool(tmp_path, n=203)
    for kw, want in ((dict(budget_ratio=0.25), 51), (dict(budget_count=37), 37)):
        for diversity in (True, False):
            s = sel.run_selection(cfg_for(tmp_path, k=3, diversity=diversity, report=False, **kw))
            t = read_selection(tmp_path)
            assert s["selected"] == want
            assert int(np.sum(t.column("selected").to_numpy())) == want
            with open(os.path.join(tmp_path, "selection", "selected.jsonl")) as f:
                assert sum(1 for _ in f) == want


def test_source_quota_holds_and_budget_is_still_met(tmp_path):
    """Guards against quotas being ignored, or counted against the pool instead of the budget."""
    write_pool(tmp_path, n=400)
    free = sel.compute_selection(cfg_for(tmp_path, k=3, budget_count=100))
    src = np.asarray(free.table.column("source").to_pylist())
    assert (src[free.order] == "a").sum() > 30  # 'a' scores high: the quota must bind
    quota = sel.compute_selection(
        cfg_for(tmp_path, k=3, budget_count=100, source_quotas={"a": 0.3})
    )
    src_sel = np.asarray(quota.table.column("source").to_pylist())[quota.order]
    assert (src_sel == "a").sum() == 30  # floor(0.3 * 100), filled exactly
    assert len(quota.order) == 100
    assert quota.reference.counts["per_source_selected"]["a"] == 30


# ----------------------------------------------------------------------------- outputs


def test_two_runs_give_identical_files(tmp_path):
    """Guards against nondeterminism: unseeded clustering, set/dict order, file-order effects."""
    write_pool(tmp_path, n=300)
    cfg = cfg_for(tmp_path, fit_sample=200, report=False)  # k by silhouette on a sample
    names = ("selection.parquet", "selected.jsonl", "reference.json")
    blobs = []
    for _ in range(2):
        sel.run_selection(cfg)
        blobs.append([(tmp_path / "selection" / n).read_bytes() for n in names])
    assert blobs[0] == blobs[1]
    ref = json.loads(blobs[0][2])
    assert 2 <= ref["k"] <= 32 and len(ref["centroids"]) == ref["k"]


def test_selected_jsonl_equals_canonical_rows_in_selection_order(tmp_path):
    """Guards against a second, divergent reader, rows joined to the wrong id, side columns
    (the noise label) leaking into training rows, or a scrambled selection order."""
    _, corpus = write_pool(tmp_path, n=150)
    sel.run_selection(cfg_for(tmp_path, method="perplexity", report=False))
    canonical = {r["sample_id"]: r for r in read_corpus([corpus])[0]}
    with open(os.path.join(tmp_path, "selection", "selected.jsonl")) as f:
        got = [json.loads(line) for line in f]
    t = read_selection(tmp_path).to_pylist()
    by_order = sorted((r for r in t if r["selected"]), key=lambda r: r["order"])
    assert [r["sample_id"] for r in got] == [r["sample_id"] for r in by_order]
    assert got == [canonical[r["sample_id"]] for r in got]
    assert set(got[0]) == {"sample_id", "source", "messages"}
    # perplexity without diversity: order is lowest nll first
    nll = [r["nll"] for r in by_order]
    assert nll == sorted(nll)


def test_missing_selected_id_in_corpus_fails(tmp_path):
    """Guards against silently writing fewer training rows than selected."""
    write_pool(tmp_path, n=50)
    with open(os.path.join(tmp_path, "other.jsonl"), "w") as f:
        f.write(
            json.dumps(
                {
                    "id": "x",
                    "messages": [
                        {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a"},
                    ],
                }
            )
        )
    cfg = cfg_for(tmp_path, corpus=[os.path.join(tmp_path, "other.jsonl")], report=False)
    with pytest.raises(sel.SelectionError, match="not in the corpus"):
        sel.run_selection(cfg)


@pytest.mark.parametrize(
    "patch, remove_part, match",
    [
        ({"rows_in": 999}, False, "rows were lost in scoring: .* rows_in=999"),
        ({}, True, r"rows were lost: the part files .* hold \d+ rows but the manifest says"),
        ({"complete": False}, False, "not complete"),
    ],
)
def test_bad_manifest_fails_with_clear_message(tmp_path, patch, remove_part, match):
    """Guards against selecting from a partial scoring run (lost rows, crashed stage)."""
    scores, _ = write_pool(tmp_path, n=60, manifest_patch=patch)
    if remove_part:
        os.remove(os.path.join(scores, "part-00001.parquet"))
    with pytest.raises(sel.SelectionError, match=match):
        sel.run_selection(cfg_for(tmp_path))


def test_missing_manifest_fails_with_clear_message(tmp_path):
    """Guards against reading part files of a stage that never finished."""
    scores, _ = write_pool(tmp_path, n=20)
    os.remove(os.path.join(scores, "_manifest.json"))
    with pytest.raises(sel.SelectionError, match="no scores manifest"):
        sel.run_selection(cfg_for(tmp_path))


# ----------------------------------------------------------------------------- decide


@pytest.mark.parametrize(
    "kw",
    [
        dict(method="quality_gate", k=3),
        dict(method="worst_rank", k=3),
        dict(method="rank_mean", diversity=False),
        dict(method="quality_gate", features="gate", k=4, tau=0.1),
        dict(method="perplexity", ppl_band=[0.1, 0.9]),
        dict(method="random", seed=3),
        dict(method="worst_rank", calibration="cluster", calibration_k=4, diversity=False),
        dict(method="worst_rank", calibration={"gate": "cluster", "ifd": "both"}, k=3),
    ],
)
def test_decide_agrees_with_pool_selection(tmp_path, kw):
    """Guards against the endpoint scoring differently from the batch selection (a second
    code path, lost precision in reference.json, different cluster assignment)."""
    scores, _ = write_pool(tmp_path, n=300)
    cfg = cfg_for(tmp_path, report=False, budget_ratio=0.3, **kw)
    sel.run_selection(cfg)
    ref = Reference.load(os.path.join(tmp_path, "selection", "reference.json"))
    t = read_selection(tmp_path).to_pylist()
    stats = pool_samples(scores)
    got = sel.decide(ref, [stats[r["sample_id"]] for r in t])
    assert [g["selected"] for g in got] == [r["selected"] for r in t]
    assert [g["score"] for g in got] == [r["score"] for r in t]
    assert [g["q"] for g in got] == [r["q"] for r in t]
    if ref.diversity:
        assert [g["cluster"] for g in got] == [r["cluster"] for r in t]
    assert sum(r["selected"] for r in t) == 90
    margins = [g["margin"] for g in got if g["selected"]]
    assert min(margins) == 0.0  # the lowest selected sample sits exactly at its cutoff


def test_decide_rejects_samples_missing_needed_keys(tmp_path):
    """Guards against the endpoint silently scoring a sample without the stats it needs."""
    write_pool(tmp_path, n=80)
    sel.run_selection(cfg_for(tmp_path, method="worst_rank", k=2, report=False))
    ref = Reference.load(os.path.join(tmp_path, "selection", "reference.json"))
    with pytest.raises(sel.SelectionError, match=r"lacks \['nll'\]"):
        sel.decide(ref, [{"gate": [0.5] * L, "embedding": [1.0] * D, "ifd": 1.0}])


def test_null_ifd_rows_are_not_candidates_and_all_null_fails(tmp_path):
    """Guards against NaN IFD sorting to the top, and a silent ifd run without any ifd."""
    write_pool(tmp_path, n=200, ifd_null=0.2)
    with pytest.warns(UserWarning, match="budget 200 exceeds the 1[0-9][0-9] candidate rows"):
        s = sel.compute_selection(cfg_for(tmp_path, method="ifd", budget_ratio=1.0))
    t = s.table.to_pylist()
    assert all(not r["selected"] for r in t if r["ifd"] is None)
    assert s.reference.counts["candidates"] == sum(r["ifd"] is not None for r in t)
    write_pool(tmp_path / "none", n=50, ifd_null=1.0)
    with pytest.raises(sel.SelectionError, match="no scored row has an ifd value"):
        sel.compute_selection(cfg_for(tmp_path / "none", method="worst_rank"))


# ----------------------------------------------------------------------------- percentiles


def test_percentile_of_pool_sample_equals_its_rank():
    """Guards against a percentile table that maps pool samples off their rank (wrong
    direction, wrong interpolation), which would skew worst_rank."""
    rng = np.random.default_rng(2)
    v = rng.normal(size=5000)
    p = ranking.percentiles(v, ranking.quantile_table(v))
    rank = np.argsort(np.argsort(v)) / (v.size - 1)
    assert np.abs(p - rank).max() < 2e-3
    # Ties get the middle of their run; outside the table 0 and 1; NaN stays NaN.
    t = [0.0, 1.0, 1.0, 1.0, 2.0]
    np.testing.assert_allclose(
        ranking.percentiles([1.0, -5.0, 9.0, 0.5], t), [0.5, 0.0, 1.0, 0.125]
    )
    assert np.isnan(ranking.percentiles([np.nan], t)[0])


def test_worst_rank_score_is_min_of_signal_ranks(tmp_path):
    """Guards against worst_rank combining the wrong signals or the wrong direction
    (higher nll / higher ifd must rank lower)."""
    write_pool(tmp_path, n=400, ifd_null=0.0)
    s = sel.compute_selection(
        cfg_for(
            tmp_path,
            method="worst_rank",
            signals=["gate", "perplexity", "ifd"],
            calibration="pool",
            diversity=False,
        )
    )
    t = s.table.to_pydict()
    n = len(t["sample_id"])

    def rank(x):
        return np.argsort(np.argsort(x)) / (n - 1)

    want = {
        "gate": rank(np.asarray(t["q"])),
        "perplexity": rank(-np.asarray(t["nll"], dtype=float)),
        "ifd": rank(-np.asarray(t["ifd"], dtype=float)),
    }
    for name, r in want.items():
        assert np.abs(np.asarray(t[f"pct_{name}"]) - r).max() < 5e-3, name
    combined = np.minimum.reduce([np.asarray(t[f"pct_{k}"]) for k in want])
    np.testing.assert_array_equal(np.asarray(t["score"]), combined)


def _tasks(corpus):
    """sample_id -> the task write_pool gave the row."""
    with open(corpus) as f:
        return {r["id"]: r["task"] for r in map(json.loads, f.readlines()[1:])}


def test_cluster_calibration_ranks_within_prompt_clusters_and_keeps_every_task(tmp_path):
    """Guards against calibration: cluster ranking against the wrong group (the pool, the
    source, clusters of the whole text) or in the wrong direction: the prompt clusters are
    the tasks, each signal's percentile is the row's rank within its cluster, every task
    keeps its share of the budget (pool-wide ranking all but drops the hardest), and within
    a task the clean rows still rank above the noise."""
    scores, corpus = write_pool(tmp_path, n=800, ifd_null=0.0, task_offsets=TASK_OFFSETS)
    task = _tasks(corpus)
    kw = dict(method="worst_rank", signals=["gate", "ifd"], diversity=False, budget_ratio=0.3)
    s = sel.compute_selection(cfg_for(tmp_path, calibration="cluster", calibration_k=4, **kw))
    t = s.table.to_pydict()
    cl, tk = np.asarray(t["calibration_cluster"]), np.asarray([task[i] for i in t["sample_id"]])
    assert all(len(set(tk[cl == c])) == 1 for c in range(4))  # the clusters are the tasks
    assert len(s.reference.calibration_centroids) == 4
    for name, v in (("gate", np.asarray(t["q"])), ("ifd", -np.asarray(t["ifd"], dtype=float))):
        for c in range(4):
            i = np.flatnonzero(cl == c)
            rank = np.argsort(np.argsort(v[i])) / (i.size - 1)
            assert np.abs(np.asarray(t[f"pct_{name}"])[i] - rank).max() < 5e-3, (name, c)
    chosen = np.asarray(t["selected"])
    share = [chosen[tk == k].sum() / chosen.sum() / (tk == k).mean() for k in range(4)]
    assert min(share) > 0.8 and max(share) < 1.2, share
    with open(corpus) as f:
        labels = {r["id"]: r["noise"] for r in map(json.loads, f.readlines()[1:])}
    clean = np.asarray([labels[i] == "clean" for i in t["sample_id"]])
    assert clean[chosen].mean() > clean.mean() + 0.1
    sel.run_selection(cfg_for(tmp_path, calibration="cluster", calibration_k=4, **kw))
    out = tmp_path / "selection"
    assert (out / "prompt_clusters.png").exists()
    assert "cluster (4 prompt clusters)" in (out / "report.html").read_text()
    pooled = sel.compute_selection(cfg_for(tmp_path, calibration="pool", **kw)).table
    chosen = np.asarray(pooled.column("selected").to_pylist())
    assert chosen[tk == 3].sum() / chosen.sum() < 0.25 * (tk == 3).mean()


def test_cluster_calibration_needs_prompt_embeddings(tmp_path):
    """Guards against calibration: cluster silently falling back on scores made before the
    prompt_embedding column existed: it says what is missing and what to do."""
    write_pool(tmp_path, n=100, prompt_embedding=False)
    with pytest.raises(sel.SelectionError, match="prompt_embedding column.*score again"):
        sel.compute_selection(cfg_for(tmp_path, method="worst_rank", calibration="cluster"))


# ----------------------------------------------------------------------------- report, job


def test_report_and_label_metrics(tmp_path):
    """Guards against wrong AUROC direction or per-type masks, and a report missing plots."""
    write_pool(tmp_path, n=300)
    s = sel.run_selection(cfg_for(tmp_path, k=3))
    m = s["label_metrics"]
    t = read_selection(tmp_path).to_pylist()
    labels = {}
    with open(tmp_path / "pool.jsonl") as f:
        for line in f:
            if line.startswith('{"'):
                r = json.loads(line)
                labels[r["id"]] = r["noise"]

    def mann_whitney(pos, neg):  # P(clean scores above noisy), ties count half
        pos, neg = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
        return float(((pos > neg) + 0.5 * (pos == neg)).mean())

    clean = [r["score"] for r in t if labels[r["sample_id"]] == "clean"]
    for kind in NOISE:
        noisy = [r["score"] for r in t if labels[r["sample_id"]] == kind]
        assert m["auroc_by_type"][kind] == pytest.approx(mann_whitney(clean, noisy))
    noisy = [r["score"] for r in t if labels[r["sample_id"]] != "clean"]
    assert m["auroc"] == pytest.approx(mann_whitney(clean, noisy))
    assert m["auroc"] > 0.7  # clean rows have higher gates in this pool
    n_sel = sum(r["selected"] for r in t)
    noisy_sel = sum(r["selected"] and labels[r["sample_id"]] != "clean" for r in t)
    assert m["noise_share_selected"] == pytest.approx(noisy_sel / n_sel)
    out = tmp_path / "selection"
    html = (out / "report.html").read_text()
    import base64
    import re

    inlined = re.findall(r"src='data:image/png;base64,([^']+)'", html)
    pngs = ("score_hist.png", "clusters.png", "sources.png", "nll_vs_score.png", "signals.png")
    for png in pngs:
        assert (out / png).stat().st_size > 1000
        assert base64.b64encode((out / png).read_bytes()).decode() in inlined  # self-contained
    assert len(inlined) == len(pngs) and "src='score_hist.png'" not in html
    assert "AUROC" in html
    # samples: the rows just around the cutoff and per cluster, with text, HTML-escaped
    assert "Around the cutoff" in html and html.count("<h3>cluster ") == 3
    below = min((r for r in t if not r["selected"]), key=lambda r: -r["score"])
    assert below["sample_id"] in html
    assert "<script" not in html.lower()
    # numbers are rounded to 3 significant digits
    for num in re.findall(r"<td>-?([\d.]+)</td>", html):
        if "." in num:
            assert len(num.replace(".", "").lstrip("0")) <= 3, num


def test_job_entry_point_reads_yaml_and_overrides(tmp_path, capsys):
    """Guards against the thin entry point drifting from the config schema."""
    from jobs import select as job

    scores, corpus = write_pool(tmp_path, n=120)
    cfg_path = tmp_path / "select.yaml"
    cfg_path.write_text(
        f"scores: {scores}\ncorpus: [{corpus}]\noutput: {tmp_path / 'out'}\nmethod: rank_mean\n"
    )
    assert job.main(["--config", str(cfg_path), "budget_count=12", "k=2", "report=false"]) == 0
    out = capsys.readouterr().out
    assert "selection: 12/120 rows" in out and "method: rank_mean" in out
    cfg = load_config(SelectConfig, str(cfg_path), ["k=2"])
    assert cfg.method == "rank_mean" and cfg.k == 2
    assert (tmp_path / "out" / "reference.json").exists()


PROBE = """<pre id="qgate-probe"></pre><script>
const errors = [];
window.addEventListener("error", e => errors.push(String(e.message || e.type)), true);
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0);
  document.getElementById("qgate-probe").textContent = JSON.stringify(
    {images: imgs.length, decoded: ok.length, errors: errors});
});
</script>"""


def _chromium() -> str:
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    raise AssertionError(
        "the report test needs headless Chromium: `apt-get install chromium` (make install-dev"
        " installs it where apt is available)"
    )


def test_report_renders_in_a_real_browser(tmp_path):
    """Guards against a report that a browser cannot show: console errors, an image that does
    not decode, or a page that depends on files beside it (it is opened alone, elsewhere)."""
    import re
    import subprocess

    write_pool(tmp_path, n=300)
    sel.run_selection(cfg_for(tmp_path, k=3))
    html = (tmp_path / "selection" / "report.html").read_text()
    page = tmp_path / "elsewhere" / "report_probe.html"  # no PNG files beside it
    page.parent.mkdir()
    page.write_text(html.replace("</body>", PROBE + "</body>"))
    p = subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=10000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    m = re.search(r'<pre id="qgate-probe">(.*?)</pre>', p.stdout, re.S)
    assert m and m.group(1), p.stdout[-2000:]
    probe = json.loads(m.group(1))
    assert probe["images"] == 5 and probe["decoded"] == 5 and probe["errors"] == []
    console = [line for line in p.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console


def test_reference_round_trip_and_refusals(tmp_path):
    """Guards against reference.json losing a field between select and its readers (Serve,
    extend), or a reader silently accepting another version or a misspelt field."""
    write_pool(tmp_path, n=80)
    sel.run_selection(cfg_for(tmp_path, method="worst_rank", k=2, diversity=True, report=False))
    path = os.path.join(tmp_path, "selection", "reference.json")
    ref = Reference.load(path)
    assert ref.method == "worst_rank" and ref.k == 2 and len(ref.centroids) == 2
    assert Reference.from_dict(json.loads(ref.to_json())) == ref
    with open(path) as f:
        assert f.read() == ref.to_json()
    d = ref.to_dict()
    with pytest.raises(sel.SelectionError, match="version 2 is not supported"):
        Reference.from_dict(d | {"version": 2})
    with pytest.raises(sel.SelectionError, match=r"unknown reference fields \['cutof'\]"):
        Reference.from_dict(d | {"cutof": {}})


def test_a_selection_that_all_but_drops_a_source_is_warned_about():
    """Guards against pool-wide ranking silently emptying a task family: a source whose
    share of the selection falls below a quarter of its share of the pool is named."""
    sources = np.asarray(["a"] * 400 + ["b"] * 400 + ["hard"] * 200, dtype=object)
    candidate = np.ones(sources.size, dtype=bool)
    said: list[str] = []
    few_hard = np.r_[np.arange(0, 150), np.arange(400, 550), [800, 801]]  # 2 of 302 are 'hard'
    sel._warn_thin_sources(sources, candidate, few_hard, said.append)
    assert len(said) == 1
    assert "1 source(s)" in said[0] and "hard 0.7% (pool 20.0%)" in said[0]
    assert said[0].count("(pool ") == 1  # a and b kept their shares
    even = np.r_[np.arange(0, 120), np.arange(400, 520), np.arange(800, 860)]
    sel._warn_thin_sources(sources, candidate, even, said.append)
    assert len(said) == 1  # a proportional selection says nothing
