"""Incremental selection: decide newly scored rows under the current reference and append
the passing ones to the selection log (RUN/selection/log.jsonl), which feeds finetune.

    python -m jobs.extend --config jobs/configs/extend.yaml scores=[NEW/scores] [key=value ...]

Score the new rows first (``qgate score`` with the reference's model, gates and settings,
into a new output). Copies of pool rows or of logged samples are refused; a retried run
appends nothing twice.
"""

from __future__ import annotations

import sys

from jobs.common import parse, stage_run
from qgate.config import ExtendConfig
from qgate.incremental import run_extend


def summary_lines(s: dict) -> list[str]:
    """Human summary of an extend run."""
    lines = [
        f"new rows {s['new_rows']}  passed {s['passed']}  committed {s['committed']}"
        f"  (log now {s['log_rows']} samples: {s['log']})",
        "  " + "  ".join(f"{k} {v}" for k, v in s["statuses"].items()),
    ]
    lines += [f"recalibrate: {r}; re-run `qgate select` with more_scores" for r in s["recalibrate"]]
    return lines


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    cfg = parse(ExtendConfig, argv, __doc__)
    try:
        with stage_run(cfg.run_dir, "extend") as fig:
            s = run_extend(cfg)
            fig["figures"] = (
                f"committed {s['committed']} of {s['new_rows']} new rows; log {s['log_rows']}"
            )
    except (FileNotFoundError, ValueError) as e:
        print(f"extend: {e}", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(s)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
