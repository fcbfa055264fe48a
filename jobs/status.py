"""Run status: one table of every stage's state, rows, time and key figures.

    qgate status RUN [--json]

States: done, partial (a re-launch resumes it), running, failed (with the error line from
the stage ledger RUN/_status/), not run.
"""

from __future__ import annotations

import argparse
import json
import sys

from qgate.status import format_status, run_status


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("run_dir", nargs="?", default="runs/demo")
    ap.add_argument("--json", action="store_true", help="print the entries as JSON")
    args = ap.parse_args(argv)
    try:
        rows = run_status(args.run_dir)
    except FileNotFoundError as e:
        print(f"status: {e}", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=1) if args.json else format_status(args.run_dir, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
