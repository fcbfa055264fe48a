"""Tests for the labelled synthetic corpus and the tiny stand-in base model."""

from __future__ import annotations

import collections
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qgate import chat, data, stand_in, synthetic

N_POOL = 1400


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, list[dict]]:
    paths = synthetic.generate_corpus(
        tmp_path_factory.mktemp("corpus"), seed=3, n_pool=N_POOL, n_pretrain=600
    )
    return {split: synthetic.read_rows(path) for split, path in paths.items()}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, corpus) -> str:
    out = tmp_path_factory.mktemp("tiny")
    return stand_in.build_tiny_model(out, stand_in.row_texts(corpus["pretrain"]), vocab_size=512)


def _user(row: dict) -> str:
    return row["messages"][0]["content"]


def _reply(row: dict) -> str:
    return row["messages"][1]["content"]


def test_generator_is_deterministic(tmp_path):
    """Guards against hidden global or unseeded randomness: benchmarks must be reproducible,
    and seeds / family sets must really change the corpus (generalisation benchmark)."""
    kw = {"n_pool": 300, "n_target": 30, "n_test": 30, "n_pretrain": 100}
    a = synthetic.generate_corpus(tmp_path / "a", seed=7, **kw)
    b = synthetic.generate_corpus(tmp_path / "b", seed=7, **kw)
    c = synthetic.generate_corpus(tmp_path / "c", seed=8, **kw)
    fams = synthetic.FAMILIES[3:]
    d = synthetic.generate_corpus(tmp_path / "d", seed=7, families=fams, **kw)
    assert list(a) == ["pool", "target", "test", "pretrain"]
    for split in a:
        assert Path(a[split]).read_bytes() == Path(b[split]).read_bytes()
        assert Path(a[split]).read_bytes() != Path(c[split]).read_bytes()
        assert Path(a[split]).read_bytes() != Path(d[split]).read_bytes()
    assert {r["family"] for r in synthetic.read_rows(d["pool"])} == set(fams)
    # test and pretrain do not move when only the pool grows: the base model and the eval
    # set stay fixed across pool sizes.
    e = synthetic.generate_corpus(tmp_path / "e", seed=7, **{**kw, "n_pool": 500})
    for split in ("test", "target", "pretrain"):
        assert Path(a[split]).read_bytes() == Path(e[split]).read_bytes()


def test_noise_labels_match_rows(corpus):
    """Guards against labels that lie: a row labelled X must really show defect X, and a
    clean row must be exactly the answer, or every AUROC and exact-match number is wrong."""
    pool = corpus["pool"]
    answers = {r["answer"] for split in corpus.values() for r in split}
    texts = {r["answer"] for r in pool} | {_user(r) for r in pool}
    clean_by_norm = {" ".join(_user(r).lower().split()): r for r in pool if r["noise"] == "clean"}
    seen = collections.Counter()
    for row in pool:
        label, reply, answer = row["noise"], _reply(row), row["answer"]
        seen[label] += 1
        assert reply.strip(), row
        if label == "clean":
            assert reply == answer
        elif label == "wrong_answer":
            assert reply != answer
        elif label == "truncated":
            assert answer.startswith(reply) and 0 < len(reply) < len(answer)
        elif label == "repetition":
            words = reply.split()
            grams = collections.Counter(
                tuple(words[i : i + n]) for n in (1, 2, 3) for i in range(len(words) - n + 1)
            )
            assert max(grams.values()) >= 3, reply
            assert reply != answer
        elif label == "refusal":
            assert reply in synthetic.REFUSALS
        elif label == "copied":
            assert reply in texts and reply not in (answer, _user(row))
        elif label == "gibberish":
            assert reply not in answers
            assert any(ch in synthetic.GIBBERISH_SYMBOLS for ch in reply)
        elif label == "near_duplicate":
            src = clean_by_norm[" ".join(_user(row).lower().split())]
            assert _user(src) != _user(row)  # a near copy, not an exact one
            assert reply == _reply(src) == answer and row["family"] == src["family"]
        else:
            pytest.fail(f"unknown label {label}")
    assert set(seen) == {"clean", *synthetic.NOISE_TYPES}


def test_noise_share_ids_and_sizes(corpus):
    """Guards against a skewed benchmark: noise share must be the requested ratio, spread
    evenly over types; ids unique; every family present; rows short for the tiny model."""
    pool = corpus["pool"]
    counts = collections.Counter(r["noise"] for r in pool)
    assert len(pool) == N_POOL
    assert N_POOL - counts["clean"] == round(N_POOL * 0.3)
    per_type = [counts[t] for t in synthetic.NOISE_TYPES]
    assert max(per_type) - min(per_type) <= 1
    assert {r["family"] for r in pool} == set(synthetic.FAMILIES)
    assert len(synthetic.FAMILIES) >= 8
    ids = [r["id"] for split in corpus.values() for r in split]
    assert len(ids) == len(set(ids))
    for split in corpus.values():
        for r in split:
            assert r["source"] == f"synth/{r['family']}"
            assert len(r["answer"]) <= 40 and len(_user(r)) <= 120


def test_splits_are_disjoint_and_labelled(corpus):
    """Guards against test leakage (a test prompt seen in pool or pretraining inflates
    exact-match) and against noisy rows in the clean splits."""
    prompts = {split: {_user(r) for r in rows} for split, rows in corpus.items()}
    for a in prompts:
        for b in prompts:
            if a < b:
                assert not prompts[a] & prompts[b], (a, b)
    assert all(r["noise"] == "clean" and _reply(r) == r["answer"] for r in corpus["test"])
    assert {r["family"] for r in corpus["test"]} == set(synthetic.FAMILIES)
    assert {r["family"] for r in corpus["target"]} == set(synthetic.FAMILIES[:3])
    assert all(r["noise"] == "clean" for r in corpus["target"])
    pre = collections.Counter(r["noise"] for r in corpus["pretrain"])
    assert pre["clean"] == 600 and len(corpus["pretrain"]) == 600 + 150
    assert set(pre) == {"clean", *synthetic.PRETRAIN_NOISE_TYPES}


def test_rows_are_accepted_by_the_reader(tmp_path):
    """Guards against a corpus the project's own reader rejects (empty turns, bad shape) or
    whose ids it does not keep."""
    paths = synthetic.generate_corpus(tmp_path, n_pool=200, n_target=20, n_test=20, n_pretrain=50)
    rows, rejects = data.read_corpus(paths["pool"])
    assert rejects == []
    assert [r["sample_id"] for r in rows] == [r["id"] for r in synthetic.read_rows(paths["pool"])]


def test_noise_types_and_families_are_selectable(tmp_path):
    """Guards against ignored or silently misspelt options."""
    paths = synthetic.generate_corpus(
        tmp_path,
        n_pool=100,
        n_target=10,
        n_test=10,
        n_pretrain=10,
        noise_ratio=0.5,
        noise_types=["refusal", "gibberish"],
    )
    counts = collections.Counter(r["noise"] for r in synthetic.read_rows(paths["pool"]))
    assert counts == {"clean": 50, "refusal": 25, "gibberish": 25}
    with pytest.raises(ValueError, match="noise_types"):
        synthetic.generate_corpus(tmp_path, noise_types=["typo"])
    with pytest.raises(ValueError, match="families"):
        synthetic.generate_corpus(tmp_path, families=["poetry"])


def test_tokenizer_round_trip_and_chat_template(tiny_dir):
    """Guards against a tokenizer that loses text, splits special tokens, or renders a
    template the stages disagree on (the original project's format mismatch)."""
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    text = "Reverse the word 'tamori'.\n  x ü 42 — ok"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    for special in stand_in.SPECIAL_TOKENS:
        assert len(tok.encode(special, add_special_tokens=False)) == 1
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "42"}]
    rendered = chat.render_chat(tok, messages)
    assert rendered == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n42<|im_end|>\n"
    prompt = chat.render_chat(tok, messages[:1], add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(rendered, add_special_tokens=False)
    assert ids.count(tok.eos_token_id) == 2
    assert tok.decode(ids) == rendered
    # offsets work, so the project's loss mask finds the answer and its closing eos
    enc = chat.tokenize_messages(tok, messages, max_length=64)
    assert tok.decode([t for t in enc["labels"] if t != -100]) == "42<|im_end|>"


def test_tiny_model_round_trips(tiny_dir, corpus, tmp_path):
    """Guards against a checkpoint that does not reload exactly (missing tied weights, lost
    config) and against seeding that leaks into torch's global RNG."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    cfg = model.config
    shape = (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim)
    assert shape == ("qwen3", 64, 2, 16)
    assert cfg.vocab_size == 512 and cfg.eos_token_id == 2 and cfg.pad_token_id == 0
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    n_params = sum(p.numel() for p in model.parameters())
    assert 50_000 < n_params < 2_000_000
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(3, 512, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    state = torch.get_rng_state()
    texts = stand_in.row_texts(corpus["pretrain"])
    other = stand_in.build_tiny_model(tmp_path / "same", texts, vocab_size=512)
    assert torch.equal(torch.get_rng_state(), state)
    same = AutoModelForCausalLM.from_pretrained(other).state_dict()
    assert all(torch.equal(same[k], v) for k, v in model.state_dict().items())


def _held_out_loss(model_dir: str, rows: list[dict]) -> float:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    texts = [chat.render_chat(tok, r["messages"]) for r in rows]
    enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    with torch.no_grad():
        return model(**enc, labels=labels).loss.item()


def test_pretrain_lowers_held_out_loss(corpus, tmp_path):
    """Guards against a pretraining loop that does not learn (wrong labels, no optimizer
    step, nothing saved): loss on unseen test rows must drop far below random init."""
    out = stand_in.build_tiny_model(tmp_path, stand_in.row_texts(corpus["pretrain"]))
    before = _held_out_loss(out, corpus["test"][:64])
    stats = stand_in.pretrain(out, corpus["pretrain"], epochs=2, max_steps=60, log_every=10)
    after = _held_out_loss(out, corpus["test"][:64])
    assert before > math.log(1024) - 1.0  # random init: about uniform over the vocab
    assert after < before - 2.0, (before, after)
    assert stats["steps"] == 60 and stats["tokens_per_s"] > 0
    assert stats["final_loss"] < before - 2.0


def test_build_stand_in_routes_arguments(corpus, tmp_path):
    """Guards against keyword arguments silently dropped or sent to the wrong step."""
    out = stand_in.build_stand_in(
        tmp_path, corpus["pretrain"][:64], hidden_size=32, num_layers=1, max_steps=2
    )
    cfg = AutoModelForCausalLM.from_pretrained(out).config
    assert (cfg.hidden_size, cfg.num_hidden_layers) == (32, 1)
    assert '"steps": 2' in (Path(out) / "pretrain_stats.json").read_text()
    with pytest.raises(TypeError, match="hiden_size"):
        stand_in.build_stand_in(tmp_path, corpus["pretrain"][:8], hiden_size=32)
