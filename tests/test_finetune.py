"""Stage 3 finetune: LoRA on Ray Train through the shared loop, adapter export, merge,
resume after a killed worker, and input validation before Ray starts."""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from jobs import finetune as job
from qgate import finetune as stage
from qgate.config import FinetuneConfig
from qgate.config_io import load_config
from qgate.model import model_digest

# Kill two steps after a checkpoint: Ray Train V2 registers a checkpoint only once the
# controller has polled every rank's report of that step (queue depth 1, polled every ~2 s),
# and a rank cannot finish step CKPT+2 before its step-CKPT report was consumed. A kill one
# step after the checkpoint may lose it and resume from the one before.
MAX_STEPS, CKPT_EVERY, KILL_AT = 6, 2, 4
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def _cfg(run_dir, model, data, *extra):
    return load_config(
        FinetuneConfig,
        None,
        [
            f"run_dir={run_dir}",
            f"target_model={model}",
            f"data=[{data}]",
            f"max_steps={MAX_STEPS}",
            "batch_size=4",
            "max_length=128",
            "lr=0.01",
            "lora.r=4",
            "lora.alpha=8",
            f"checkpoint_every={CKPT_EVERY}",
            "report_every=1",
            "max_failures=1",
            "merge=true",
            "scaling.num_workers=2",
            "scaling.resources_per_worker={CPU: 0.5}",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, tiny_model, corpus, ray_session):
    """One 2-worker LoRA run whose last rank dies once at step KILL_AT (after the step-2
    checkpoint, before the step-4 one); returns (summary, config, base digest before)."""
    root = tmp_path_factory.mktemp("finetune")
    with open(corpus["pool"]) as f:
        rows = [json.loads(line) for line in f][:48]
    data = _write_jsonl(root / "selected.jsonl", rows)
    cfg = _cfg(root / "run", tiny_model, data)
    digest = model_digest(tiny_model)
    summary = stage.run(cfg, fault={"kill_at_step": KILL_AT, "marker": str(root / "killed")})
    assert os.path.exists(root / "killed"), "the fault was never injected"
    return summary, stage.prepare(cfg)[0], digest


def _final_state(cfg: FinetuneConfig) -> dict:
    """The training state (state.pt) of the checkpoint at the last step."""
    for path in glob.glob(os.path.join(cfg.run_dir, "ray_train", "*", "checkpoint_*", "state.pt")):
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state["step"] == MAX_STEPS:
            return state
    raise AssertionError("no checkpoint at the last step")


def _batch(tok, corpus):
    from qgate.chat import render_chat

    with open(corpus["test"]) as f:
        rows = [json.loads(line) for line in f][:4]
    texts = [render_chat(tok, r["messages"]) for r in rows]
    return tok(texts, return_tensors="pt", padding=True)


def test_worker_killed_mid_run_resumes_from_checkpoint(killed_run):
    """Guards against a worker failure restarting training from step 0, repeating or
    dropping steps in the metric history, or ending before max_steps."""
    summary, cfg, _ = killed_run
    with open(os.path.join(cfg.out_dir, "metrics.jsonl")) as f:
        history = [json.loads(line) for line in f]
    steps = [m["step"] for m in history]
    assert steps == list(range(1, MAX_STEPS + 1))  # report_every=1: no gap, no repeat
    # Steps up to the checkpoint come from the first attempt; every later one was trained
    # by the restarted group, which resumed from the step-2 checkpoint, not from scratch.
    resumed = [m["resumed_from"] for m in history]
    assert resumed == [0] * CKPT_EVERY + [CKPT_EVERY] * (MAX_STEPS - CKPT_EVERY)
    assert summary["steps"] == MAX_STEPS and summary["last"]["step"] == MAX_STEPS
    assert all(torch.isfinite(torch.tensor(m["lm_loss"])) for m in history)


def test_lora_run_trains_only_lora_and_adapter_reloads_exactly(killed_run, tiny_model, corpus):
    """Guards against base weights moving during finetune, non-LoRA tensors leaking into the
    adapter, an adapter that does not reload with plain PEFT, and an adapter (or merged
    model) whose logits differ from the trained state at the last step."""
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qgate.lora import lora_config

    summary, cfg, digest = killed_run
    adapter = os.path.join(cfg.out_dir, "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(adapter))
    assert summary["adapter"] == adapter
    assert model_digest(tiny_model) == digest  # the target checkpoint is untouched

    # The adapter holds exactly A and B for each targeted projection of each layer.
    tensors = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    n_layers = base.config.num_hidden_layers
    assert len(tensors) == n_layers * len(TARGETS) * 2
    assert all("lora_A" in k or "lora_B" in k for k in tensors)
    assert {k.split(".")[-3] for k in tensors} == set(TARGETS)
    lora_b = [v for k, v in tensors.items() if "lora_B" in k]
    assert all(v.abs().max() > 0 for v in lora_b)  # B starts at zero: it trained
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        acfg = json.load(f)
    assert (acfg["r"], acfg["lora_alpha"], acfg["base_model_name_or_path"]) == (
        4,
        8.0,
        os.path.abspath(tiny_model),
    )

    # Logits at the end of training: the last checkpoint's trainable state on a fresh build.
    tok = AutoTokenizer.from_pretrained(tiny_model)
    batch = _batch(tok, corpus)
    state = _final_state(cfg)
    assert state["trainable"] and all("lora_" in k for k in state["trainable"])
    trained = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), lora_config(cfg)
    )
    missing, unexpected = trained.load_state_dict(state["trainable"], strict=False)
    assert not unexpected and all("lora_" not in k for k in missing)
    trained.eval()
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), adapter
    ).eval()
    merged = AutoModelForCausalLM.from_pretrained(summary["merged"], dtype=torch.float32).eval()
    with torch.no_grad():
        ref = trained(**batch).logits
        got = reloaded(**batch).logits
        merged_logits = merged(**batch).logits
        base_logits = base.eval()(**batch).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(merged_logits, ref, rtol=1e-4, atol=1e-4)
    assert (got - base_logits).abs().max() > 1e-3  # the adapter changes the model

    # Merged weights differ from the base only in the adapted projections.
    base_sd, merged_sd = base.state_dict(), merged.state_dict()
    assert base_sd.keys() == merged_sd.keys()
    changed = {k for k in base_sd if not torch.equal(base_sd[k], merged_sd[k])}
    expected = {f"model.layers.{i}.self_attn.{m}.weight" for i in range(n_layers) for m in TARGETS}
    assert changed == expected
    assert os.path.isfile(os.path.join(summary["merged"], "tokenizer.json"))


def test_bad_rows_are_refused_before_ray(tmp_path, tiny_model, capsys):
    """Guards against a selection with broken rows being trained on silently (or crashing
    inside a Ray worker): every bad row is named with its reason, and nothing runs."""
    good = {"id": "ok-1", "messages": [{"role": "user", "content": "hi"}]}
    good["messages"].append({"role": "assistant", "content": "hello"})
    rows = [
        good,
        {"id": "no-answer", "messages": [{"role": "user", "content": "hi"}]},
        {"id": "bad-role", "messages": [{"role": "bot", "content": "x"}]},
        dict(good),  # same id again
    ]
    path = _write_jsonl(tmp_path / "selected.jsonl", rows)
    with open(path, "a") as f:
        f.write("{not json\n")
    argv = [f"run_dir={tmp_path / 'run'}", f"target_model={tiny_model}", f"data=[{path}]"]
    assert job.main(argv) == 2
    err = capsys.readouterr().err
    assert "4 bad row(s)" in err
    for sample_id, reason in [
        ("no-answer", "missing_assistant"),
        ("bad-role", "unknown_role"),
        ("ok-1", "duplicate_id"),
        ("selected#row4", "malformed_json"),
    ]:
        assert f"{sample_id} (selected): {reason}" in err
    assert not os.path.exists(tmp_path / "run")  # refused before anything was written

    # A row whose answer is cut off by max_length has no loss token: refused too.
    long = {"id": "long", "messages": [{"role": "user", "content": "word " * 200}]}
    long["messages"].append({"role": "assistant", "content": "answer"})
    path = _write_jsonl(tmp_path / "long.jsonl", [good, long])
    cfg = load_config(FinetuneConfig, None, argv[:2] + [f"data=[{path}]", "max_length=32"])
    with pytest.raises(ValueError, match=r"long \(long\): no_answer_after_truncation"):
        stage.prepare(cfg)


def test_empty_or_missing_selection_is_an_error(tmp_path, tiny_model, capsys):
    """Guards against an empty selection finishing as a silent no-op with no adapter, and a
    missing default selected.jsonl being reported as anything but a missing file."""
    empty = tmp_path / "selected.jsonl"
    empty.write_text("\n")
    argv = [f"run_dir={tmp_path / 'run'}", f"target_model={tiny_model}"]
    assert job.main([*argv, f"data=[{empty}]"]) == 2
    assert "selection is empty" in capsys.readouterr().err

    assert job.main(argv) == 2  # default data: RUN/selection/selected.jsonl
    err = capsys.readouterr().err
    assert os.path.join(str(tmp_path / "run"), "selection", "selected.jsonl") in err

    not_lm = tmp_path / "not_a_model"
    not_lm.mkdir()
    assert job.main([f"run_dir={tmp_path / 'run'}", f"target_model={not_lm}"]) == 2
    assert "not a HF model directory" in capsys.readouterr().err


def test_shipped_finetune_configs_load():
    """Guards against shipped YAMLs drifting from FinetuneConfig (unknown or mistyped keys,
    a YAML 1.1 float like 2e-5 read as a string) or losing their run-command header."""
    here = os.path.join(os.path.dirname(__file__), "..", "jobs", "configs")
    for name, lr, r in [("finetune.yaml", 0.002, 16), ("finetune_recipe.yaml", 2e-5, 128)]:
        path = os.path.join(here, name)
        with open(path) as f:
            first = f.readline()
        assert first.startswith(f"# python -m jobs.finetune --config jobs/configs/{name}")
        cfg = load_config(FinetuneConfig, path)
        assert (cfg.lr, cfg.lora.r, cfg.loss_on) == (lr, r, "assistant")
    recipe = load_config(FinetuneConfig, os.path.join(here, "finetune_recipe.yaml"))
    assert (recipe.lora.alpha, recipe.lora.dropout, recipe.epochs) == (512.0, 0.1, 4.0)
    assert (recipe.warmup_ratio, recipe.schedule, recipe.max_length) == (0.03, "linear", 1024)


def test_index_dropout_keeps_torch_rate_and_repeats_under_a_seed():
    from qgate.lora import IndexDropout

    x = torch.ones(1000, 1000, requires_grad=True)
    for p in (0.05, 0.1, 0.3):
        y = IndexDropout(p).train()(x)
        dropped = (y == 0).float().mean().item()
        assert abs(dropped - p) < 0.003, (p, dropped)  # binomial sd <= 0.0005 at n = 1e6
        assert abs(y.mean().item() - 1.0) < 0.005  # kept elements scaled by 1 / (1 - p)
        assert torch.all((y == 0) | torch.isclose(y, torch.tensor(1 / (1 - p))))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(x * mask)/dx is the mask itself
    drop = IndexDropout(0.05).train()
    torch.manual_seed(3)
    a = drop(torch.ones(64, 128))
    torch.manual_seed(3)
    assert torch.equal(a, drop(torch.ones(64, 128)))  # resume-exact: torch's generator
    small = torch.ones(4, 4)
    assert torch.equal(drop.eval()(small), small)  # eval: the identity


def test_lora_dropout_impl_swaps_only_where_asked(tiny_model, tmp_path):
    from qgate.config import Lora
    from qgate.lora import IndexDropout, build_finetune

    for impl, want in (("auto", IndexDropout), ("indices", IndexDropout), ("torch", None)):
        cfg = FinetuneConfig(
            run_dir=str(tmp_path), target_model=tiny_model, lora=Lora(r=4, dropout_impl=impl)
        )
        model, *_ = build_finetune(cfg, torch.device("cpu"))
        drops = [
            d
            for m in model.modules()
            if hasattr(m, "lora_dropout")
            for d in m.lora_dropout.values()
        ]
        assert drops and all(type(d) is (want or torch.nn.Dropout) for d in drops), impl
    with pytest.raises(ValueError, match="lora.dropout_impl"):
        Lora(dropout_impl="fast")
