"""Evaluation: the local lm-eval task (format, offline data, exact match), runs with and
without a PEFT adapter through lm-eval's Python API, results.json, and the shipped config."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

from jobs import evaluate as job
from qgate.chat import render_chat
from qgate.config import EvaluateConfig
from qgate.config_io import load_config
from qgate.evaluation import eval_dtype, evaluate, write_local_task

LIMIT, GEN = 8, 6


def _samples(out_dir):
    with open(os.path.join(out_dir, "samples_qgate_synth.jsonl")) as f:
        return [json.loads(line) for line in f]


def _results(out_dir):
    with open(os.path.join(out_dir, "results.json")) as f:
        return json.load(f)


def _test_rows(path, n=LIMIT):
    with open(path) as f:
        return [json.loads(line) for line in f][:n]


def _overrides(tiny_model, test_data, out, *extra):
    return [
        f"model={tiny_model}",
        f"test_data={test_data}",
        f"output={out}",
        f"limit={LIMIT}",
        f"max_gen_toks={GEN}",
        "batch_size=8",
        "device=cpu",
        *extra,
    ]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model):
    """A PEFT LoRA adapter on the tiny model with random (non-zero) A and B, so that it
    visibly changes generations; built directly with PEFT (no training needed here)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("adapter")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        lcfg = LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            init_lora_weights=False,  # B random too, not zero
            task_type="CAUSAL_LM",
        )
        get_peft_model(base, lcfg).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tiny_model, corpus):
    """lm-eval on the tiny model alone (adapter=null); returns the output directory."""
    out = tmp_path_factory.mktemp("eval_base")
    cfg = load_config(
        EvaluateConfig, None, _overrides(tiny_model, corpus["test"], out, "adapter=null")
    )
    evaluate(cfg)
    return str(out)


def test_local_task_prompt_is_the_training_format(tmp_path, tiny_model, corpus):
    """Guards against the eval prompt drifting from what finetune trains on (another
    template, a missing generation prompt, the answer leaking into the prompt), generation
    not stopping at <|im_end|>, and a task that would need a download."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    path = write_local_task(corpus["test"], tok, str(tmp_path / "tasks"), max_gen_toks=12)
    with open(path) as f:
        task = yaml.safe_load(f)
    assert task["task"] == "qgate_synth" and task["output_type"] == "generate_until"
    assert task["dataset_path"] == "json" and task["test_split"] == "test"
    assert task["generation_kwargs"]["until"] == ["<|im_end|>"]
    assert task["generation_kwargs"]["do_sample"] is False
    assert task["generation_kwargs"]["max_gen_toks"] == 12
    assert [m["metric"] for m in task["metric_list"]] == ["exact_match"]
    data = task["dataset_kwargs"]["data_files"]["test"]
    assert os.path.dirname(data) == str(tmp_path / "tasks")  # a local copy, no hub id
    with open(data) as f:
        docs = [json.loads(line) for line in f]
    rows = _test_rows(corpus["test"], n=10**9)
    assert len(docs) == len(rows)
    for doc, row in zip(docs, rows):
        user, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        assert doc["prompt"] == f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        assert doc["prompt"] == render_chat(tok, row["messages"][:1], add_generation_prompt=True)
        assert render_chat(tok, row["messages"]).startswith(doc["prompt"] + answer + "<|im_end|>")
        assert (doc["answer"], doc["user"], doc["sample_id"]) == (row["answer"], user, row["id"])


def test_base_model_results(base_run, tiny_model, corpus):
    """Guards against results.json missing the metric, the model used or the limit, an
    exact_match that is not the per-doc comparison of generation and answer, and lm-eval
    seeing a prompt other than the one rendered by qgate.chat.render_chat."""
    from transformers import AutoTokenizer

    res = _results(base_run)
    task = res["tasks"]["qgate_synth"]
    assert 0.0 <= task["exact_match"] <= 1.0
    assert (task["n_docs"], task["n_docs_total"]) == (LIMIT, 40)
    assert (res["model"], res["adapter"], res["limit"]) == (os.path.abspath(tiny_model), None, 8)
    assert res["wall_s"] > 0 and res["device"] == "cpu" and res["dtype"] == "float32"
    assert "peft=" not in res["lm_eval_command"] and "--limit 8" in res["lm_eval_command"]

    tok = AutoTokenizer.from_pretrained(tiny_model)
    samples = _samples(base_run)
    rows = _test_rows(corpus["test"])
    assert [s["sample_id"] for s in samples] == [r["id"] for r in rows]
    for s, r in zip(samples, rows):
        assert s["prompt"] == render_chat(tok, r["messages"][:1], add_generation_prompt=True)
        assert s["target"] == r["answer"]
        assert "<|im_end|>" not in s["generation"]
    hits = [s["generation"].strip() == s["target"] for s in samples]
    assert task["exact_match"] == pytest.approx(sum(hits) / LIMIT)


def test_adapter_changes_generations_and_scores(
    base_run, adapter, tiny_model, corpus, tmp_path, capsys
):
    """Guards against the adapter being silently ignored (peft= not reaching lm-eval), the
    CLI entry point failing, and an exact_match that stays 0 when answers do match: with
    answers set to the adapter's own outputs on half the docs, the score is exactly known."""
    out = tmp_path / "eval_adapter"
    argv = _overrides(tiny_model, corpus["test"], out, f"adapter={adapter}")
    assert job.main(argv) == 0
    assert "qgate_synth: exact_match" in capsys.readouterr().out
    res = _results(out)
    assert res["adapter"] == os.path.abspath(adapter)
    assert f"peft={os.path.abspath(adapter)}" in res["lm_eval_command"]
    assert 0.0 <= res["tasks"]["qgate_synth"]["exact_match"] <= 1.0
    assert os.path.isfile(out / "config.yaml")
    gens = [s["generation"] for s in _samples(out)]
    base_gens = [s["generation"] for s in _samples(base_run)]
    assert gens != base_gens

    # Same prompts, answers replaced by the adapter's own output on docs 0-3.
    rows = _test_rows(corpus["test"])
    for i in range(4):
        rows[i]["answer"] = gens[i].strip()
    crafted = tmp_path / "crafted.jsonl"
    crafted.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out2 = tmp_path / "eval_crafted"
    assert job.main(_overrides(tiny_model, crafted, out2, f"adapter={adapter}")) == 0
    expected = sum(g.strip() == r["answer"] for g, r in zip(gens, rows)) / LIMIT
    assert expected >= 0.5
    assert _results(out2)["tasks"]["qgate_synth"]["exact_match"] == pytest.approx(expected)
    assert [s["generation"] for s in _samples(out2)] == gens  # greedy: deterministic


def test_chat_template_mode_gives_the_same_prompts(base_run, tiny_model, corpus, tmp_path):
    """Guards against apply_chat_template=true double-wrapping the local task or rendering
    it differently from the pre-rendered prompts (lm-eval's template path vs render_chat)."""
    out = tmp_path / "eval_chat"
    extra = ("adapter=null", "apply_chat_template=true")
    evaluate(load_config(EvaluateConfig, None, _overrides(tiny_model, corpus["test"], out, *extra)))
    chat, plain = _samples(out), _samples(base_run)
    assert [s["prompt"] for s in chat] == [s["prompt"] for s in plain]
    assert [s["generation"] for s in chat] == [s["generation"] for s in plain]
    assert _results(out)["apply_chat_template"] is True


def test_missing_inputs_fail_with_clear_messages(tmp_path, tiny_model, corpus):
    """Guards against evaluating the bare base when the adapter is missing (a silent
    fallback), and bad test rows surfacing as an lm-eval stack trace."""
    cfg = load_config(EvaluateConfig, None, [f"run_dir={tmp_path}", f"model={tiny_model}"])
    with pytest.raises(FileNotFoundError, match=r"finetune.adapter.*set adapter=null"):
        evaluate(cfg)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "t1", "messages": [{"role": "user", "content": "q"}]}\n')
    argv = [f"run_dir={tmp_path}", f"model={tiny_model}", "adapter=null", f"test_data={bad}"]
    with pytest.raises(ValueError, match=r"(?s)1 bad test row.*t1: missing_assistant"):
        evaluate(load_config(EvaluateConfig, None, argv))


def test_shipped_evaluate_config_loads():
    """Guards against jobs/configs/evaluate.yaml drifting from EvaluateConfig or losing its
    run-command header and demo paths."""
    path = os.path.join(os.path.dirname(__file__), "..", "jobs", "configs", "evaluate.yaml")
    with open(path) as f:
        assert f.readline().startswith(
            "# python -m jobs.evaluate --config jobs/configs/evaluate.yaml"
        )
    cfg = load_config(EvaluateConfig, path)
    a = os.path.abspath  # relative config paths resolve against the cwd (or $QGATE_ROOT)
    assert (cfg.model, cfg.adapter_dir) == (a("runs/demo/base"), a("runs/demo/finetune/adapter"))
    assert (cfg.test_path, cfg.out_dir) == (a("runs/demo/data/test.jsonl"), a("runs/demo/eval"))
    assert cfg.tasks == ["qgate_synth"] and cfg.offline is True


def test_eval_dtype_rule():
    """Guards against evaluation silently following the scoring dtype rule onto a bf16 CPU
    (exact match then shifts against earlier fp32 figures), and a forced dtype being ignored."""
    assert eval_dtype("auto", "cpu") == "float32"
    assert eval_dtype("bfloat16", "cpu") == "bfloat16"
    assert eval_dtype("float32", "cuda:0") == "float32"
    with pytest.raises(ValueError, match="dtype must be one of"):
        eval_dtype("fp16", "cpu")
