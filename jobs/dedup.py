"""Dedup: remove exact and near-duplicate rows from a corpus before scoring (Ray Data).

    python -m jobs.dedup --config jobs/configs/dedup.yaml corpus=[a.jsonl] output=DIR

Writes DIR/kept.parquet and DIR/rejects/*.parquet (sample_id, reason, kept_id, ...); point
the score stage at it with ``dedup=DIR``. Re-launching with the same output resumes.
"""

from __future__ import annotations

import sys

from jobs.common import init_ray, parse, stage_run
from qgate.config import DedupConfig
from qgate.dedup import DedupError, run_dedup

EXPECTED = (FileNotFoundError, ValueError, DedupError)


def summary_lines(m: dict) -> list[str]:
    """Human summary of a dedup manifest."""
    lines = [
        f"rows in {m['rows_in']}  kept {m['kept']}  rejected {m['rejected']}",
        f"wall {m['wall_s']:.1f}s (signatures {m['sign_s']:.1f}s, clusters {m['cluster_s']:.1f}s)"
        f"  driver peak RSS {m['driver_peak_rss_mib']:.0f} MiB",
    ]
    lines += [f"  reject {reason}: {n}" for reason, n in m["rejects_by_reason"].items()]
    lines.append(f"output {m['output']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    cfg = parse(DedupConfig, argv, __doc__)
    try:
        with stage_run(cfg.run_dir, "dedup", EXPECTED):
            init_ray()
            manifest = run_dedup(cfg)
    except EXPECTED as e:
        print(f"dedup: {e}", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(manifest)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
