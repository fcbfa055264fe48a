"""Stage 3: LoRA-finetune a target model on the selection (qgate.finetune), on Ray Train.

python -m jobs.finetune --config jobs/configs/finetune.yaml [key=value ...]
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
