"""Evaluation with lm-eval: a model, optionally with a PEFT adapter, on named tasks.

:func:`evaluate` runs ``lm_eval.simple_evaluate(model="hf", ...)`` in-process and writes
OUTPUT/results.json (per-task metrics, the model and adapter used, limit, wall time, and
the equivalent ``lm_eval`` command line) plus samples_<task>.jsonl (every prompt and
generation).

The local task ``qgate_synth`` needs no download: :func:`write_local_task` turns a JSONL
of chat rows (the synthetic generator's ``test`` split) into an lm-eval task YAML with
``dataset_path: json`` and a data file beside it. It is zero-shot ``generate_until`` with
greedy decoding stopped at the tokenizer's eos (``<|im_end|>`` for ChatML), scored by
exact match against the row's ``answer`` (else its last assistant turn), ignoring leading
and trailing whitespace. Its prompt is the conversation before the last assistant turn,
rendered by :func:`qgate.chat.render_chat` with the generation prompt: the same
formatting finetune trained on. With ``apply_chat_template=True`` lm-eval renders it
instead, from the raw user turn, through the same tokenizer template.

Standard tasks, for machines with hub access (``offline: false``): ``mmlu`` (57 subjects,
multiple choice, loglikelihood), ``gsm8k`` (5-shot generate_until, exact match on the final
number), ``bbh_cot_fewshot`` (BIG-Bench Hard), e.g. ``tasks=[gsm8k] offline=false
apply_chat_template=true`` for an instruct model. Their datasets download from the hub
on first use; lm-eval caches them under ~/.cache/huggingface.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time

import yaml

from qgate.atomic import atomic_path, write_text
from qgate.config import LOCAL_TASK, EvaluateConfig
from qgate.config_io import to_dict

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


# ----------------------------------------------------------------------------- local task


def read_test_rows(path: str) -> list[dict]:
    """Test rows as ``{sample_id, context, answer}``; raise ValueError naming bad rows.

    ``context`` is the conversation before the last assistant turn; ``answer`` is the raw
    row's ``answer`` when it is a string, else that assistant turn's content.
    """
    from qgate.data import Reject, iter_raw, source_name, validate

    src = source_name(path)
    rows, bad = [], []
    for i, raw in iter_raw(path):
        item = validate(raw, src, i)
        if isinstance(item, Reject):
            bad.append(f"{item.sample_id}: {item.detail}")
            continue
        msgs = item["messages"]
        last = max(j for j, m in enumerate(msgs) if m["role"] == "assistant")
        context = msgs[:last]
        if not any(m["role"] == "user" for m in context):
            bad.append(f"{item['sample_id']}: no user turn before the last assistant turn")
            continue
        given = raw.get("answer")
        answer = given if isinstance(given, str) else msgs[last]["content"]
        rows.append({"sample_id": item["sample_id"], "context": context, "answer": answer})
    if bad:
        shown = "\n".join(f"  - {b}" for b in bad[:20])
        raise ValueError(f"{len(bad)} bad test row(s) in {path}:\n{shown}")
    if not rows:
        raise ValueError(f"no test rows in {path}")
    return rows


def local_task_config(data_file: str, eos: str, max_gen_toks: int, chat: bool, name: str) -> dict:
    """The lm-eval task YAML (as a dict) of the local exact-match task."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": os.path.abspath(data_file)}},
        "test_split": "test",
        "output_type": "generate_until",
        # chat: lm-eval wraps the raw user turn in the chat template; else the prompt is
        # already rendered by qgate.chat.render_chat.
        "doc_to_text": "{{user}}" if chat else "{{prompt}}",
        "doc_to_target": "{{answer}}",
        "target_delimiter": "",
        "num_fewshot": 0,
        "generation_kwargs": {
            "until": [eos],
            "do_sample": False,
            "temperature": 0.0,
            "max_gen_toks": max_gen_toks,
        },
        "metric_list": [
            {
                "metric": "exact_match",
                "aggregation": "mean",
                "higher_is_better": True,
                "regexes_to_ignore": ["^\\s+", "\\s+$"],
            }
        ],
        "metadata": {"version": 1.0},
    }


def write_local_task(
    test_path: str,
    tokenizer,
    task_dir: str,
    *,
    max_gen_toks: int = 64,
    chat: bool = False,
    name: str = LOCAL_TASK,
) -> str:
    """Write ``<name>.yaml`` and its data file into ``task_dir``; return the YAML path.

    The data file name carries a digest of its content, so lm-eval's dataset cache can never
    serve a stale copy when the test file or the tokenizer changes.
    """
    from qgate.chat import render_chat

    rows = read_test_rows(test_path)
    if chat:
        multi = [r["sample_id"] for r in rows if len(r["context"]) != 1]
        if multi:
            raise ValueError(
                f"apply_chat_template=true sends lm-eval only the user turn, but {len(multi)} "
                f"test row(s) have a longer context (e.g. {multi[:3]}); use "
                "apply_chat_template=false (prompts pre-rendered with the chat template)"
            )
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "apply_chat_template=true needs a tokenizer with a chat template; this one "
                "has none (qgate then uses its fallback format): use apply_chat_template=false"
            )
    docs = [
        {
            "sample_id": r["sample_id"],
            "prompt": render_chat(tokenizer, r["context"], add_generation_prompt=True),
            "user": r["context"][-1]["content"],
            "answer": r["answer"],
        }
        for r in rows
    ]
    blob = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
    digest = hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]
    os.makedirs(task_dir, exist_ok=True)
    for old in os.listdir(task_dir):
        if old.startswith(f"{name}-") and old.endswith(".jsonl"):
            os.remove(os.path.join(task_dir, old))
    data_file = os.path.join(task_dir, f"{name}-{digest}.jsonl")
    write_text(data_file, blob)
    if not tokenizer.eos_token:
        raise ValueError("the tokenizer has no eos token to stop generation at")
    task = local_task_config(data_file, tokenizer.eos_token, max_gen_toks, chat, name)
    path = os.path.join(task_dir, f"{name}.yaml")
    header = f"# written by qgate.evaluation from {os.path.abspath(test_path)}\n"
    write_text(path, header + yaml.safe_dump(task, sort_keys=False, allow_unicode=True))
    return path


# ----------------------------------------------------------------------------- running


def set_offline() -> None:
    """Make HF libraries refuse network access (call before they are imported)."""
    for key in OFFLINE_ENV:
        os.environ[key] = "1"
    import sys

    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None and not hub.HF_HUB_OFFLINE:
        log.warning(
            "huggingface_hub was imported before offline mode was set; lm-eval may still try "
            "the network (set HF_HUB_OFFLINE=1 in the environment)"
        )


def resolve_model(cfg: EvaluateConfig) -> tuple[str, str | None]:
    """(model directory, adapter directory or None), checked to exist."""
    adapter = cfg.adapter_dir
    if adapter is not None:
        if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
            hint = " (run the finetune stage first, or set adapter=null)" if cfg.adapter else ""
            raise FileNotFoundError(f"no PEFT adapter (adapter_config.json) in {adapter}{hint}")
        adapter = os.path.abspath(adapter)
    model = cfg.model
    if not model:
        with open(os.path.join(adapter, "adapter_config.json")) as f:
            model = json.load(f).get("base_model_name_or_path") or ""
        if not model:
            raise ValueError(f"model is not set and {adapter} records no base model")
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise FileNotFoundError(f"model directory not found (no config.json): {model}")
    return os.path.abspath(model), adapter


def _device(name: str) -> str:
    """lm-eval's device string for a config value (qgate.hardware's one 'auto' rule)."""
    from qgate.hardware import resolve_device

    return str(resolve_device(name))


def cli_command(model_args: dict, cfg: EvaluateConfig, device: str, include: list[str]) -> str:
    """The equivalent ``lm_eval`` command line (recorded in results.json)."""
    args = ",".join(f"{k}={v}" for k, v in model_args.items())
    parts = ["lm_eval", "--model hf", f"--model_args {args}", f"--tasks {','.join(cfg.tasks)}"]
    parts += [f"--include_path {p}" for p in include]
    parts += [f"--device {device}", f"--batch_size {cfg.batch_size}", f"--seed {cfg.seed}"]
    if cfg.limit is not None:
        parts.append(f"--limit {cfg.limit}")
    if cfg.num_fewshot is not None:
        parts.append(f"--num_fewshot {cfg.num_fewshot}")
    if cfg.apply_chat_template:
        parts.append("--apply_chat_template")
    return " ".join(parts)


def _task_manager(tasks: list[str], include: list[str]):
    """A TaskManager over ``include``; lm-eval's own index (seconds to build) only if needed."""
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=include or None, include_defaults=False)
    if all(t in tm.all_tasks for t in tasks):
        return tm
    tm = TaskManager(include_path=include or None, include_defaults=True)
    missing = [t for t in tasks if t not in tm.all_tasks]
    if missing:
        raise ValueError(f"unknown lm-eval task(s) {missing}; check the names or include_path")
    return tm


def _flat_metrics(task_result: dict) -> dict:
    """lm-eval's ``"metric,filter"`` keys -> ``metric`` (filter 'none') or ``metric,filter``."""
    out = {}
    for key, value in task_result.items():
        if key == "alias" or "," not in key:
            continue
        metric, filt = key.split(",", 1)
        name = metric if filt == "none" else key
        out[name] = float(value) if isinstance(value, int | float) else None  # "N/A" -> None
    return out


def eval_dtype(dtype: str, device: str) -> str:
    """The dtype lm-eval loads the model in: a forced one, else bf16 on a GPU with bf16 and
    fp32 on CPU, where bf16 hardly speeds up generation and shifts exact match (config.py)."""
    from qgate.hardware import dtype_name, resolve_dtype

    if dtype == "auto" and not device.startswith("cuda"):
        return "float32"
    return dtype_name(resolve_dtype(dtype, device))


def evaluate(cfg: EvaluateConfig) -> dict:
    """Run lm-eval on ``cfg.tasks`` and write OUTPUT/results.json; return its content."""
    if cfg.offline:
        set_offline()
    model, adapter = resolve_model(cfg)
    out_dir = cfg.out_dir
    task_dir = cfg.task_dir or os.path.join(out_dir, "tasks")
    include = [os.path.abspath(p) for p in cfg.include_path]
    test_path = _write_local_task(cfg, model, task_dir)
    if test_path:
        include.insert(0, os.path.abspath(task_dir))

    import lm_eval

    device = _device(cfg.device)
    model_args = {"pretrained": model}
    if adapter:
        model_args["peft"] = adapter
    model_args["dtype"] = eval_dtype(cfg.dtype, device)
    t0 = time.time()
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=list(cfg.tasks),
        num_fewshot=cfg.num_fewshot,
        batch_size=cfg.batch_size,
        device=device,
        limit=cfg.limit,
        log_samples=cfg.log_samples,
        apply_chat_template=cfg.apply_chat_template,
        task_manager=_task_manager(cfg.tasks, include),
        random_seed=cfg.seed,
        numpy_random_seed=cfg.seed,
        torch_random_seed=cfg.seed,
        fewshot_random_seed=cfg.seed,
    )
    wall = time.time() - t0
    if out is None:  # only non-zero ranks of a distributed run get None
        raise RuntimeError("lm-eval returned no results")

    results = {
        "model": model,
        "adapter": adapter,
        "tasks": _task_results(out),
        "limit": cfg.limit,
        "num_fewshot": cfg.num_fewshot,
        "apply_chat_template": cfg.apply_chat_template,
        "device": device,
        "dtype": model_args["dtype"],
        "wall_s": round(wall, 3),
        "test_data": os.path.abspath(test_path) if test_path else None,
        "task_dir": os.path.abspath(task_dir) if test_path else None,
        "lm_eval_version": lm_eval.__version__,
        "lm_eval_command": cli_command(model_args, cfg, device, include),
        "config": to_dict(cfg),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    os.makedirs(out_dir, exist_ok=True)
    if cfg.log_samples:
        for name, samples in (out.get("samples") or {}).items():
            _write_samples(os.path.join(out_dir, f"samples_{name}.jsonl"), samples)
    write_text(
        os.path.join(out_dir, RESULTS_FILE), json.dumps(results, indent=2, default=str) + "\n"
    )
    return results


def _write_local_task(cfg: EvaluateConfig, model: str, task_dir: str) -> str | None:
    """Write the local exact-match task over the test split into task_dir when cfg.tasks
    names it; returns the test file's path (None when the local task is not asked for)."""
    if LOCAL_TASK not in cfg.tasks:
        return None
    from transformers import AutoTokenizer

    test_path = cfg.test_path
    if not os.path.isfile(test_path):
        raise FileNotFoundError(
            f"test data for {LOCAL_TASK} not found: {test_path} (set test_data=, e.g. the "
            "synthetic generator's test.jsonl)"
        )
    write_local_task(
        test_path,
        AutoTokenizer.from_pretrained(model),
        task_dir,
        max_gen_toks=cfg.max_gen_toks,
        chat=cfg.apply_chat_template,
    )
    return test_path


def _task_results(out: dict) -> dict:
    """Per task: lm-eval's metrics flattened, with the documents it evaluated."""
    tasks = {}
    for name, res in out["results"].items():
        entry = _flat_metrics(res)
        n = out.get("n-samples", {}).get(name)
        if n:
            entry["n_docs"] = n.get("effective")
            entry["n_docs_total"] = n.get("original")
        tasks[name] = entry
    return tasks


def _write_samples(path: str, samples: list[dict]) -> None:
    """One line per doc: id, prompt, generation, target and per-doc metrics."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for s in samples:
            args = s.get("arguments") or [[None]]
            first = args[0] if isinstance(args, list | tuple) else args
            prompt = first[0] if isinstance(first, list | tuple) else first
            row = {
                "doc_id": s.get("doc_id"),
                "sample_id": (s.get("doc") or {}).get("sample_id"),
                "prompt": prompt,
                "generation": (s.get("filtered_resps") or [None])[0],
                "target": s.get("target"),
            }
            row.update({k: s[k] for k in s.get("metrics", []) if k in s})
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
