"""Stage 3, finetune: LoRA-finetune a target model on the selection, on Ray Train (the warmup loop).

Reads RUN/selection/selected.jsonl (or ``data``), refuses bad rows and empty selections
before Ray starts, trains PEFT LoRA adapters with the shared loop of qgate.training, and
writes RUN/finetune/adapter/ (adapter_config.json + adapter_model.safetensors, loadable with
``PeftModel.from_pretrained(base, dir)`` and ``lm_eval --model_args
pretrained=BASE,peft=DIR``), metrics.jsonl, config.yaml, and with ``merge=true`` a merged full
model in RUN/finetune/merged/. A re-launch with the same run name resumes from the last
checkpoint.
"""

from __future__ import annotations

import dataclasses
import os

from qgate import cluster
from qgate.config import FinetuneConfig
from qgate.config_io import write_config


def prepare(cfg: FinetuneConfig) -> tuple[FinetuneConfig, list[dict]]:
    """Validate everything that can fail before Ray starts; return (config, rows).

    The target model path is made absolute: Ray workers need not share the driver's cwd,
    and the adapter records it as its base.
    """
    from qgate.chat import load_tokenizer
    from qgate.lora import check_target_model, load_finetune_rows
    from qgate.training import make_plan

    target = cfg.target_model if "://" in cfg.target_model else os.path.abspath(cfg.target_model)
    check_target_model(target)
    cfg = dataclasses.replace(cfg, target_model=target)
    rows = load_finetune_rows(cfg, load_tokenizer(target))
    make_plan(cfg, len(rows))  # enough rows for the workers
    return cfg, rows


def run(cfg: FinetuneConfig, fault: dict | None = None) -> dict:
    """Run the finetune stage and return fit's summary (plus ``merged`` when merging;
    ``fault``: tests only, see fit)."""
    from qgate.lora import ADAPTER_DIR, MERGED_DIR, merge_adapter
    from qgate.training import fit

    cfg, rows = prepare(cfg)
    cluster.init(log_to_driver=True)  # after the checks: bad inputs fail before Ray starts
    summary = fit("finetune", cfg, rows, tokenizer_path=cfg.target_model, fault=fault)
    adapter = os.path.join(cfg.out_dir, ADAPTER_DIR)
    summary["adapter"] = adapter
    merged = os.path.join(cfg.out_dir, MERGED_DIR)
    if cfg.merge:
        summary["merged"] = merge_adapter(cfg.target_model, adapter, merged)
    elif os.path.isdir(merged):
        print(f"finetune: note: {merged} is left from an earlier run (merge=false now)")
    write_config(cfg, cfg.out_dir)
    return summary
