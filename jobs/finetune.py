"""Stage 3: LoRA-finetune a target model on the selection, on Ray Train (the warmup loop).

python -m jobs.finetune --config jobs/configs/finetune.yaml [key=value ...]

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
import sys

from jobs.common import init_ray, parse, stage_run, write_config
from qgate.config import FinetuneConfig


def prepare(cfg: FinetuneConfig) -> tuple[FinetuneConfig, list[dict]]:
    """Validate everything that can fail before Ray starts; return (config, rows).

    The target model path is made absolute: Ray workers need not share the driver's cwd,
    and the adapter records it as its base.
    """
    from qgate.training import _tokenizer, check_target_model, load_finetune_rows, make_plan

    target = cfg.target_model if "://" in cfg.target_model else os.path.abspath(cfg.target_model)
    check_target_model(target)
    cfg = dataclasses.replace(cfg, target_model=target)
    rows = load_finetune_rows(cfg, _tokenizer(target))
    make_plan(cfg, len(rows))  # enough rows for the workers
    return cfg, rows


def run(cfg: FinetuneConfig) -> dict:
    """Run the finetune stage and return fit's summary (plus ``merged`` when merging)."""
    from qgate.training import ADAPTER_DIR, MERGED_DIR, fit, merge_adapter

    cfg, rows = prepare(cfg)
    init_ray()
    summary = fit("finetune", cfg, rows, tokenizer_path=cfg.target_model)
    adapter = os.path.join(cfg.out_dir, ADAPTER_DIR)
    summary["adapter"] = adapter
    merged = os.path.join(cfg.out_dir, MERGED_DIR)
    if cfg.merge:
        summary["merged"] = merge_adapter(cfg.target_model, adapter, merged)
    elif os.path.isdir(merged):
        print(f"finetune: note: {merged} is left from an earlier run (merge=false now)")
    write_config(cfg, cfg.out_dir)
    return summary


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    cfg = parse(FinetuneConfig, argv, __doc__)
    try:
        with stage_run(cfg.run_dir, "finetune"):
            s = run(cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"finetune: {e}", file=sys.stderr)
        return 2
    last = s["last"]
    merged = f"; merged -> {s['merged']}" if s.get("merged") else ""
    print(
        f"finetune done: {s['steps']} steps on {s['rows']} rows in {s['wall_s']:.1f}s; "
        f"lm {last.get('lm_loss', float('nan')):.4f} {last.get('tokens_per_s', 0):.0f} tok/s "
        f"-> {s['adapter']}{merged}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
