"""Stage 1: train the quality gates of a frozen base model on Ray Train.

python -m jobs.warmup --config jobs/configs/warmup.yaml [key=value ...]
"""

from __future__ import annotations

import sys

from jobs.common import parse, stage_run
from qgate.config import WarmupConfig
from qgate.warmup import run


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    cfg = parse(WarmupConfig, argv, __doc__)
    try:
        with stage_run(cfg.run_dir, "warmup"):
            s = run(cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"warmup: {e}", file=sys.stderr)
        return 2
    last = s["last"]
    print(
        f"warmup done: {s['steps']} steps on {s['rows']} rows (+{s['targets']} target) in "
        f"{s['wall_s']:.1f}s; lm {last.get('lm_loss', float('nan')):.4f} "
        f"quality {last.get('quality_loss', float('nan')):.4f} "
        f"{last.get('tokens_per_s', 0):.0f} tok/s -> {s['out_dir']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
