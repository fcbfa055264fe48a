"""Stage 1 on Ray Train: only gates train, losses fall, outputs reload, faults resume."""

from __future__ import annotations

import json
import os

import pytest
import torch

from jobs import warmup as job
from qgate import losses
from qgate import model as M
from qgate import warmup as stage
from qgate.chat import tokenize_messages
from qgate.config import ConfigError, WarmupConfig
from qgate.config_io import load_config
from qgate.data import read_corpus

SMALL = ["batch_size=4", "max_length=96", "scaling.resources_per_worker={CPU: 0.5}", "lr=0.01"]


def open_text(*parts) -> str:
    """Read a text file's contents."""
    with open(os.path.join(*parts)) as f:
        return f.read()


def _cfg(tiny_model, corpus, run_dir, *extra):
    args = [f"base_model={tiny_model}", f"corpus={corpus['pool']}", f"run_dir={run_dir}"]
    return load_config(WarmupConfig, None, args + SMALL + list(extra))


def _gate_means(model, tok, rows):
    """Per-sample masked mean gate (B, L) over assistant tokens, via the one forward."""
    out = []
    for r in rows:
        enc = tokenize_messages(tok, r["messages"], 96)
        ids = torch.tensor([enc["input_ids"]])
        with torch.no_grad():
            _, g = M.forward(model, ids, torch.ones_like(ids))
        out.append(losses.gate_means(g, torch.tensor([enc["labels"]]) != -100)[0])
    return torch.stack(out)


@pytest.fixture(scope="module")
def probe_run(tiny_model, corpus, ray_session, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("warmup_probe")
    cfg = _cfg(tiny_model, corpus, run_dir, "max_steps=16", "report_every=2", "checkpoint_every=8")
    return cfg, stage.run(cfg)


def test_two_worker_run_trains_only_gates(probe_run, tiny_model):
    """Guards against base weights moving, gates not training, or the loss not falling."""
    cfg, summary = probe_run
    out = os.path.join(cfg.run_dir, "warmup")
    assert sorted(os.listdir(out)) == [
        "config.yaml",
        "gates.safetensors",
        "metrics.jsonl",
        "qgate.json",
    ]
    meta = json.loads(open_text(out, "qgate.json"))
    fresh, _, _ = M.load_gated_model(tiny_model, mode="probe", seed=cfg.seed)
    assert meta["extra"]["base_digest"] == M.base_digest(fresh)  # base bit-identical
    trained, _, _ = M.load_gated_model(tiny_model, gates=out)
    a, b = M.gate_parameters(fresh), M.gate_parameters(trained)
    assert all(not torch.equal(a[k], b[k]) for k in a)  # every gate tensor changed
    hist = [json.loads(line) for line in open_text(out, "metrics.jsonl").splitlines()]
    assert [h["step"] for h in hist] == list(range(2, 17, 2))
    assert hist[-1]["quality_loss"] < hist[0]["quality_loss"] - 0.02
    assert len(hist[-1]["gate_mean"]) == 2 and hist[-1]["tokens_per_s"] > 0
    assert summary["steps"] == 16


def test_saved_gates_reproduce_gate_outputs(probe_run, tiny_model, corpus):
    """Guards against saved gates that reload into different per-layer gate values."""
    cfg, _ = probe_run
    model, tok, _ = M.load_gated_model(tiny_model, gates=os.path.join(cfg.run_dir, "warmup"))
    again, _, _ = M.load_gated_model(tiny_model, gates=os.path.join(cfg.run_dir, "warmup"))
    rows = read_corpus(corpus["pool"])[0][:4]
    g1, g2 = _gate_means(model, tok, rows), _gate_means(again, tok, rows)
    assert torch.equal(g1, g2)
    fresh, _, _ = M.load_gated_model(tiny_model, mode="probe")
    assert not torch.allclose(g1, _gate_means(fresh, tok, rows))


def test_target_balanced_opens_gates_on_target(tiny_model, corpus, ray_session, tmp_path):
    """Guards against target_balanced ignoring the target set (or inverting its sign)."""
    cfg = _cfg(
        tiny_model,
        corpus,
        tmp_path,
        "loss=target_balanced",
        f"target={corpus['target']}",
        "max_steps=20",
        "report_every=10",
        "checkpoint_every=20",
        "scaling.num_workers=1",
        "batch_size=8",
        "lr=0.03",
    )
    stage.run(cfg)
    model, tok, _ = M.load_gated_model(tiny_model, gates=os.path.join(tmp_path, "warmup"))
    pool = [r for r in read_corpus(corpus["pool"])[0][:24]]
    target = read_corpus(corpus["target"])[0][:24]
    assert _gate_means(model, tok, target).mean() > _gate_means(model, tok, pool).mean() + 0.01


def test_killed_worker_resumes_from_checkpoint(tiny_model, corpus, ray_session, tmp_path):
    """Guards against a worker crash restarting from step 0 or repeating steps in metrics."""
    fault = {"kill_at_step": 7, "marker": str(tmp_path / "killed")}
    cfg = _cfg(
        tiny_model,
        corpus,
        tmp_path,
        "max_steps=10",
        "report_every=1",
        "checkpoint_every=5",
        "max_failures=2",
    )
    summary = stage.run(cfg, fault=fault)
    assert (tmp_path / "killed").exists()  # the fault really fired
    steps = [h["step"] for h in summary["history"]]
    assert steps == list(range(1, 11))  # no repeated or skipped step
    assert [h["resumed_from"] for h in summary["history"]] == [0] * 5 + [5] * 5


def test_bad_configs_fail_fast(tiny_model, corpus, tmp_path, capsys):
    """Guards against bad inputs surfacing only after workers start (or not at all)."""
    with pytest.raises(ConfigError, match="unknown config key.*bogus"):
        _cfg(tiny_model, corpus, tmp_path, "bogus=1")
    with pytest.raises(ConfigError, match="scaling.num_workers"):
        _cfg(tiny_model, corpus, tmp_path, "scaling.num_workers=two")
    args = SMALL + [f"run_dir={tmp_path}"]
    assert job.main([f"base_model={tiny_model}", f"corpus={tmp_path}/missing.jsonl", *args]) == 2
    assert "corpus file not found" in capsys.readouterr().err
    (tmp_path / "enc").mkdir()
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            vocab_size=50,
        )
    ).save_pretrained(tmp_path / "enc")
    assert job.main([f"base_model={tmp_path}/enc", f"corpus={corpus['pool']}", *args]) == 2
    assert "not a decoder causal LM" in capsys.readouterr().err
    assert not (tmp_path / "warmup").exists()  # nothing ran


def test_workers_that_take_every_cpu_fail_fast(tiny_model, corpus, ray_session, tmp_path):
    """Guards against a run that hangs forever: workers holding all CPUs starve the Ray Data
    tokenizing tasks that feed them (the seed-parity config did this on a 2-core box)."""
    cpus = ray_session.cluster_resources()["CPU"]
    cfg = _cfg(
        tiny_model,
        corpus,
        tmp_path,
        "max_steps=2",
        "scaling.num_workers=2",
        f"scaling.resources_per_worker={{CPU: {cpus / 2}}}",
    )
    with pytest.raises(ValueError, match=r"the run would hang.*resources_per_worker\.CPU"):
        stage.run(cfg)
    assert not os.path.exists(os.path.join(tmp_path, "warmup", "qgate.json"))
