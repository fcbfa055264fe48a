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

import sys

from jobs.common import parse, stage_run
from qgate.config import FinetuneConfig
from qgate.finetune import run


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
