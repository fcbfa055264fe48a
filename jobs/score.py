"""Stage 2: score every corpus row with the gated model on a Ray Data actor pool.

    python -m jobs.score --config jobs/configs/score.yaml [key=value ...]

Re-launching with the same output path skips completed shards (exactly-once output).
"""

from __future__ import annotations

import sys

from jobs.common import init_ray, parse, stage_run
from qgate.batch_scoring import ScoringError, run_scoring
from qgate.config import ScoreConfig
from qgate.model import UnsupportedModelError

EXPECTED = (FileNotFoundError, ValueError, UnsupportedModelError, ScoringError)


def summary_lines(m: dict) -> list[str]:
    """Human summary of a scores manifest."""
    rate = (
        f"{m['tokens_per_s']:.0f} tok/s"
        if m.get("tokens_per_s")
        else "all shards were already done"
    )
    lines = [
        f"rows in {m['rows_in']}  scored {m['scored']}  rejected {m['rejected']}",
        f"tokens {m['tokens']}  {rate}  wall {m['wall_s']:.1f}s",
    ]
    lines += [f"  reject {reason}: {n}" for reason, n in m["rejects_by_reason"].items()]
    if m.get("head_negatives"):
        h = m["head_negatives"]
        lines.append(f"the gate head's negatives: {h['scored']} scored, {h['rejected']} rejected")
    lines.append(f"output {m['output']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    cfg = parse(ScoreConfig, argv, __doc__)
    try:
        with stage_run(cfg.run_dir, "score", EXPECTED):
            init_ray()
            manifest = run_scoring(cfg)
    except EXPECTED as e:
        print(f"score: {e}", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(manifest)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
