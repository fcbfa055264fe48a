"""bench/quality.py at CI size: every stage runs and the table has one row per method."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    """Import bench/quality.py (bench/ is a folder of scripts, not a package)."""
    path = os.path.join(REPO, "bench", "quality.py")
    name = "qgate_bench_quality"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_tiny_bench_writes_one_row_per_method(ray_session, tmp_path):
    """Guards against the bench breaking as the stages change (a config key renamed, a stage
    output moved), a method silently missing from the table, AUROC/shares out of range, or
    --measure-only measuring something else than the run whose scores it reads."""
    bench = _bench()
    out = tmp_path / "quality"
    assert bench.main(["--tiny", "--out", str(out), "--budgets", "0.1", "0.3"]) == 0

    table = (out / "quality.md").read_text()
    names = [m.name for m in bench.METHODS if m.gate not in bench.OPT_IN_GATES]  # not asked for
    selection = table.split("| noise without dedup |")[0].rsplit("\n", 1)[0]  # not the dedup table
    rows = [line for line in selection.splitlines() if line.startswith("| A realistic |")]
    assert "| noise without dedup |" in table  # the dedup table follows
    assert [r.split(" | ")[1] for r in rows] == ["*pool*", *names]
    for r in rows[1:]:
        auroc = float(r.split(" | ")[2])
        assert 0.0 <= auroc <= 1.0

    result = json.loads((out / "quality.json").read_text())
    (cond,) = result["conditions"]  # --tiny: one corpus, realistic base only
    assert cond["condition"] == "A realistic"
    assert [r["method"] for r in cond["rows"]] == names
    n_pool = result["settings"]["n_pool"]
    for r in cond["rows"]:
        assert 0.0 <= r["auroc"] <= 1.0
        assert set(r["auroc_by_type"]) == set(bench.NOISE_ORDER)
        for b in ("0.1", "0.3"):
            sel = r["budgets"][b]
            assert 0.0 <= sel["noise_share"] <= 1.0
            # shares are of the selection: types and clean add up to it
            assert 0.0 <= sum(sel["type_share"].values()) <= 1.0 + 1e-9
            assert abs(sel["noise_share"] - sum(sel["type_share"].values())) < 1e-9
            assert 0 < sel["selected"] <= n_pool
    assert result["downstream"] is None
    # a random selection at 30% is close to the pool's noise share (the table's sanity line)
    random_row = next(r for r in cond["rows"] if r["method"] == "random")
    assert abs(random_row["budgets"]["0.3"]["noise_share"] - cond["pool_noise_share"]) < 0.12

    # the same scores measured again, nothing trained or scored: the same figures
    assert (
        bench.main(["--tiny", "--out", str(out), "--budgets", "0.1", "0.3", "--measure-only"]) == 0
    )
    (again,) = json.loads((out / "quality.json").read_text())["conditions"]
    assert [r["method"] for r in again["rows"]] == names
    for r, s in zip(cond["rows"], again["rows"], strict=True):
        assert s["auroc"] == r["auroc"] and s["warmup_s"] is None

    # the downstream oracle arm: the budget's share of the scored rows, every one labelled clean
    corpus = bench._condition_corpus(cond)
    oracle = bench._oracle_arm(cond, corpus, str(out / "downstream"), 0.3)
    with open(oracle["data"]) as f:
        picked = [json.loads(line)["sample_id"] for line in f]
    with open(corpus["pool"]) as f:
        noise = {r["id"]: r["noise"] for r in map(json.loads, f)}
    scored = sum(r["budgets"]["0.3"]["selected"] for r in cond["rows"] if r["method"] == "random")
    assert len(picked) == len(set(picked)) == oracle["selected"] == scored
    assert {noise[i] for i in picked} == {"clean"}


# ----------------------------------------------------------------------------- calibration


def _two_source_scores(root, n_per=300, seed=0):
    """RUN/scores where source 'hard' has nll 4 nats above source 'easy' (L=2, D=4)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    n = 2 * n_per
    ids = [f"s{i:05d}" for i in range(n)]
    source = np.asarray(["easy"] * n_per + ["hard"] * n_per)
    nll = rng.gamma(2.0, 0.5, n) + 4.0 * (source == "hard")
    ifd = rng.uniform(0.3, 1.2, n)
    gate = rng.uniform(0.2, 0.8, (n, 2)).astype(np.float32)
    emb = rng.normal(size=(n, 4)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    scores = os.path.join(root, "scores")
    os.makedirs(scores)
    table = pa.table(
        {
            "sample_id": pa.array(ids),
            "source": pa.array(source.tolist()),
            "n_tokens": pa.array(np.full(n, 20), pa.int32()),
            "n_loss_tokens": pa.array(np.full(n, 8), pa.int32()),
            "truncated": pa.array(np.zeros(n, bool)),
            "nll": pa.array(nll, pa.float32()),
            "gate": pa.FixedSizeListArray.from_arrays(pa.array(gate.ravel()), 2),
            "gate_mean": pa.FixedSizeListArray.from_arrays(pa.array(gate.ravel()), 2),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), 4),
            "ifd": pa.array(ifd, pa.float32()),
        }
    )
    pq.write_table(table, os.path.join(scores, "part-00000.parquet"))
    manifest = {"complete": True, "rows_in": n, "scored": n, "rejected": 0}
    manifest["scoring"] = {"num_layers": 2}
    with open(os.path.join(scores, "_manifest.json"), "w") as f:
        json.dump(manifest, f)
    return scores, table.to_pylist()


def test_source_calibration_ranks_each_signal_within_its_source(tmp_path):
    """Guards against calibration=source ranking against the whole pool (then the 'hard'
    source, whose nll is higher by construction, would be dropped wholesale), and against the
    endpoint's decide() disagreeing with the pool selection for such a reference."""
    import numpy as np

    from qgate.config import SelectConfig
    from qgate.reference import Reference
    from qgate.selection import compute_selection, decide

    scores, rows = _two_source_scores(tmp_path)
    kw = dict(scores=scores, method="worst_rank", signals=["perplexity", "ifd"], diversity=False)
    pool = compute_selection(SelectConfig(**kw, calibration="pool"))
    cal = compute_selection(SelectConfig(**kw, calibration="source", calibration_min_rows=100))

    def hard_share(s):
        t = s.table.to_pydict()
        return np.mean([src == "hard" for src, x in zip(t["source"], t["selected"]) if x])

    assert hard_share(pool) < 0.2  # pool-wide ranks: the 'hard' source is rarely taken
    assert 0.35 < hard_share(cal) < 0.65  # within-source ranks: both sources are taken alike

    t = cal.table.to_pydict()
    src = np.asarray(t["source"])
    nll = np.asarray(t["nll"], dtype=float)
    for name in ("easy", "hard"):
        m = src == name
        rank = np.argsort(np.argsort(-nll[m])) / (m.sum() - 1)  # low nll ranks high
        assert np.abs(np.asarray(t["pct_perplexity"])[m] - rank).max() < 5e-3
    assert set(cal.reference.quantiles_by_source) == {"easy", "hard"}

    ref = Reference.from_dict(json.loads(cal.reference.to_json()))  # as reference.json stores it
    by_id = {r["sample_id"]: r for r in rows}
    got = decide(ref, [by_id[i] for i in t["sample_id"]])
    assert [g["score"] for g in got] == t["score"]
    assert [g["selected"] for g in got] == t["selected"]
    # without its source a sample is ranked against the whole pool, as documented
    bare = [{k: v for k, v in by_id[i].items() if k != "source"} for i in t["sample_id"]]
    want = decide(pool.reference, bare)
    assert [g["score"] for g in decide(ref, bare)] == [g["score"] for g in want]


def test_both_calibration_takes_the_lower_of_source_and_pool_percentiles(tmp_path):
    """Guards against calibration=both using only one of its two rankings (then a source
    whose rows all rank low in the pool would still get its share of the budget), and
    against decide() ranking new samples differently from the pool selection."""
    import numpy as np

    from qgate.config import SelectConfig
    from qgate.reference import Reference
    from qgate.selection import compute_selection, decide

    scores, rows = _two_source_scores(tmp_path)
    kw = dict(scores=scores, method="worst_rank", signals=["perplexity", "ifd"], diversity=False)
    kw |= dict(calibration_min_rows=100)
    pool = compute_selection(SelectConfig(**kw, calibration="pool")).table.to_pydict()
    src = compute_selection(SelectConfig(**kw, calibration="source")).table.to_pydict()
    both = compute_selection(SelectConfig(**kw, calibration="both"))
    t = both.table.to_pydict()
    assert t["sample_id"] == pool["sample_id"] == src["sample_id"]
    for s in ("perplexity", "ifd"):
        want = np.minimum(pool[f"pct_{s}"], src[f"pct_{s}"])
        assert np.allclose(t[f"pct_{s}"], want)
    assert np.allclose(t["score"], np.minimum(t["pct_perplexity"], t["pct_ifd"]))
    # the 'hard' source ranks low pool-wide, so it no longer gets half of the budget (as with
    # calibration=source), nor as little as pool-wide ranks alone give it

    def hard_share(tab):
        return np.mean([s == "hard" for s, x in zip(tab["source"], tab["selected"]) if x])

    assert hard_share(pool) < hard_share(t) < 0.4 < hard_share(src)

    ref = Reference.from_dict(json.loads(both.reference.to_json()))
    by_id = {r["sample_id"]: r for r in rows}
    got = decide(ref, [by_id[i] for i in t["sample_id"]])
    assert [g["score"] for g in got] == t["score"]
    assert [g["selected"] for g in got] == t["selected"]


def test_calibration_per_signal_ranks_each_signal_its_own_way(tmp_path):
    """Guards against a per-signal calibration mapping being applied to the wrong signal,
    to every signal, or to none (signals it does not name rank within their source), and
    against decide() disagreeing with the pool selection for such a reference."""
    import numpy as np

    from qgate.config import ConfigError, SelectConfig
    from qgate.reference import Reference
    from qgate.selection import compute_selection, decide

    scores, rows = _two_source_scores(tmp_path)
    kw = dict(scores=scores, method="worst_rank", signals=["perplexity", "ifd"], diversity=False)
    kw |= dict(calibration_min_rows=100)
    src = compute_selection(SelectConfig(**kw, calibration="source")).table.to_pydict()
    both = compute_selection(SelectConfig(**kw, calibration="both")).table.to_pydict()
    mixed = compute_selection(SelectConfig(**kw, calibration={"ifd": "both"}))
    t = mixed.table.to_pydict()
    assert np.allclose(t["pct_perplexity"], src["pct_perplexity"])  # unnamed: within source
    assert not np.allclose(t["pct_perplexity"], both["pct_perplexity"])
    assert np.allclose(t["pct_ifd"], both["pct_ifd"])
    pool = compute_selection(SelectConfig(**kw, calibration={"perplexity": "pool"}))
    p = pool.table.to_pydict()
    assert np.allclose(p["pct_ifd"], src["pct_ifd"])
    assert not np.allclose(p["pct_perplexity"], src["pct_perplexity"])  # pool-wide ranks

    ref = Reference.from_dict(json.loads(mixed.reference.to_json()))
    assert ref.calibration == {"ifd": "both"}
    by_id = {r["sample_id"]: r for r in rows}
    got = decide(ref, [by_id[i] for i in t["sample_id"]])
    assert [g["score"] for g in got] == t["score"]
    with pytest.raises(ConfigError, match="unknown signal"):
        SelectConfig(**kw, calibration={"ppl": "both"})


def _check_heldout_splits(split_rows: dict, noise: tuple, families: tuple) -> None:
    """The contract of a held-out corpus written with n_pool=600, n_test=60, n_target=30:
    30% of the pool noisy and even over the kinds, prompts unique across splits, test and
    target clean with the right answer, target from the first three families."""
    kinds = [r["noise"] for r in split_rows["pool"]]
    assert sum(k != "clean" for k in kinds) == 180  # 30% of 600, spread evenly
    assert {k: kinds.count(k) for k in noise} == dict.fromkeys(noise, 30)
    prompts = [r["messages"][0]["content"] for rows in split_rows.values() for r in rows]
    assert len(prompts) == len(set(prompts)) == 690
    for split in ("test", "target"):
        for r in split_rows[split]:
            assert r["noise"] == "clean" and r["messages"][1]["content"] == r["answer"]
    assert {r["family"] for r in split_rows["target"]} <= set(families[:3])


def test_heldout_corpus_c_is_labelled_unique_and_made_of_its_own_kinds(tmp_path):
    """Corpus C (bench/heldout_corpus.py) is the bench's check on data no setting was chosen
    on: its noise kinds and families must be its own, every pool row labelled, prompts unique
    across splits, test/target clean with the right answer in the assistant turn, and the
    file the same for the same seed. The table's columns follow the kinds a corpus holds."""
    _bench()  # puts the repository on sys.path
    from bench.heldout_corpus import HELDOUT_FAMILIES, HELDOUT_NOISE, generate_heldout
    from qgate.synthetic import FAMILIES, NOISE_TYPES, read_rows

    assert not set(HELDOUT_NOISE) & set(NOISE_TYPES)
    assert not set(HELDOUT_FAMILIES) & set(FAMILIES)
    paths = generate_heldout(str(tmp_path / "a"), n_pool=600, n_test=60, n_target=30)
    again = generate_heldout(str(tmp_path / "b"), n_pool=600, n_test=60, n_target=30)
    split_rows = {s: read_rows(p) for s, p in paths.items()}
    assert split_rows["pool"] == read_rows(again["pool"])
    pool = split_rows["pool"]
    _check_heldout_splits(split_rows, HELDOUT_NOISE, HELDOUT_FAMILIES)
    assert len({r["source"] for r in pool}) == 3
    for r in pool:
        content = r["messages"][1]["content"]
        assert (content == r["answer"]) == (r["noise"] == "clean") or r["noise"] == "placeholder"
    q = _bench()
    labels = {r["id"]: r["noise"] for r in pool}
    assert q.noise_kinds(labels) == sorted(HELDOUT_NOISE)
    assert q.noise_kinds({"a": "refusal", "b": "gibberish", "c": "zzz", "d": "clean"}) == [
        "gibberish",
        "refusal",
        "zzz",
    ]


@pytest.mark.parametrize("tag", ["d", "e"])
def test_weighted_heldout_corpus_is_labelled_unique_weighted_and_made_of_its_own_kinds(
    tmp_path, tag
):
    """Corpora D and E (bench/heldout_corpus_{d,e}.py) are checks on data no setting was
    chosen on: their noise kinds and families must be their own (none of A's, C's or each
    other's), every pool row labelled, every noisy row's answer different from the right one,
    the noise share exact and even over the kinds, prompts unique across splits, test/target
    clean with the right answer in the assistant turn, families drawn with their weights, a
    family spread over two sources, and the file the same for the same seed."""
    import importlib

    _bench()  # puts the repository on sys.path
    from bench.heldout_corpus import HELDOUT_FAMILIES, HELDOUT_NOISE
    from qgate.synthetic import FAMILIES, NOISE_TYPES, read_rows

    corpus = importlib.import_module(f"bench.heldout_corpus_{tag}")
    noise = getattr(corpus, f"HELDOUT_{tag.upper()}_NOISE")
    families = getattr(corpus, f"HELDOUT_{tag.upper()}_FAMILIES")
    generate = getattr(corpus, f"generate_heldout_{tag}")
    other_noise, other_families = (
        set(NOISE_TYPES) | set(HELDOUT_NOISE),
        {*FAMILIES, *HELDOUT_FAMILIES},
    )
    if tag == "e":
        from bench.heldout_corpus_d import HELDOUT_D_FAMILIES, HELDOUT_D_NOISE

        other_noise |= set(HELDOUT_D_NOISE)
        other_families |= set(HELDOUT_D_FAMILIES)
    assert len(noise) == 6 and len(families) == 8
    assert not set(noise) & other_noise
    assert not set(families) & other_families
    paths = generate(str(tmp_path / "a"), n_pool=600, n_test=60, n_target=30)
    again = generate(str(tmp_path / "b"), n_pool=600, n_test=60, n_target=30)
    split_rows = {s: read_rows(p) for s, p in paths.items()}
    for split, path in again.items():
        assert split_rows[split] == read_rows(path)
    assert split_rows["pretrain"] == []
    pool = split_rows["pool"]
    assert {r["noise"] for r in pool} <= {"clean", *noise}
    _check_heldout_splits(split_rows, noise, families)
    for r in pool:
        content = r["messages"][1]["content"]
        assert (content == r["answer"]) == (r["noise"] == "clean")
        assert r["source"] in dict(corpus.SOURCES[r["family"]])
    sources = {r["source"] for r in pool}
    assert len(sources) >= 4
    weights = corpus.WEIGHTS
    assert any(len({r["source"] for r in pool if r["family"] == f}) > 1 for f in weights)
    counts = {f: sum(r["family"] == f for r in pool) for f in families}
    common = [f for f in families if weights[f] == max(weights.values())]
    rare = [f for f in families if weights[f] == min(weights.values())]
    assert min(counts[f] for f in common) > 1.5 * max(counts[f] for f in rare)  # not uniform
    other = generate(str(tmp_path / "c"), seed=9, n_pool=600, n_test=60, n_target=30)
    assert read_rows(other["pool"]) != pool


def test_corpus_e_tasks_are_right_and_its_wrong_rule_is_wrong():
    """Corpus E's answers are checked against independent computations, and its
    ``wrong_rule`` answer differs from the right one for every draw."""
    import random

    _bench()
    from bench.heldout_corpus_e import GENERATORS, to_roman

    assert [to_roman(n) for n in (4, 9, 14, 40, 90, 399)] == [
        "IV",
        "IX",
        "XIV",
        "XL",
        "XC",
        "CCCXCIX",
    ]
    rng = random.Random(0)
    for family, gen in GENERATORS.items():
        for _ in range(300):
            item = gen(rng)
            assert item.answer and item.wrong_rule != item.answer, (family, item)
    item = GENERATORS["remainder"](random.Random(1))
    a, b = (int(x) for x in item.prompt.replace("?", "").replace(".", "").split() if x.isdigit())
    assert item.answer == str(a % b)


def test_corpus_f_breaks_the_prompt_and_keeps_the_right_answer(tmp_path):
    """Corpus F (bench/heldout_corpus_f.py) is E's families with noise in the prompt: a
    prompt-noise row keeps the right answer under a question it no longer asks (garbled,
    cut before its operands, a placeholder, or about missing material); an answer-noise row
    keeps its own question. The kinds are even, the clean prompts unique across splits, and
    the files the same for the same seed."""
    _bench()
    from bench.heldout_corpus_e import HELDOUT_E_FAMILIES
    from bench.heldout_corpus_f import (
        HELDOUT_F_FAMILIES,
        HELDOUT_F_NOISE,
        PROMPT_NOISE,
        generate_heldout_f,
    )
    from qgate.synthetic import read_rows

    assert HELDOUT_F_FAMILIES == HELDOUT_E_FAMILIES
    paths = generate_heldout_f(str(tmp_path / "a"), n_pool=600, n_test=60, n_target=30)
    again = generate_heldout_f(str(tmp_path / "b"), n_pool=600, n_test=60, n_target=30)
    split_rows = {s: read_rows(p) for s, p in paths.items()}
    assert all(split_rows[s] == read_rows(p) for s, p in again.items())
    pool = split_rows["pool"]
    kinds = [r["noise"] for r in pool]
    assert {k: kinds.count(k) for k in HELDOUT_F_NOISE} == dict.fromkeys(HELDOUT_F_NOISE, 30)
    clean_prompts = [
        r["messages"][0]["content"]
        for rows in split_rows.values()
        for r in rows
        if r["noise"] not in PROMPT_NOISE
    ]
    assert len(clean_prompts) == len(set(clean_prompts)) == 690 - 30 * len(PROMPT_NOISE)
    clean = {
        r["messages"][0]["content"]
        for rows in split_rows.values()
        for r in rows
        if r["noise"] == "clean"
    }
    for r in pool:
        prompt, content = (m["content"] for m in r["messages"])
        if r["noise"] in PROMPT_NOISE:
            assert content == r["answer"] and prompt not in clean
        else:
            assert (content == r["answer"]) == (r["noise"] == "clean")
