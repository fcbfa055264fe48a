"""Write a gated model directory (fresh gates + qgate.json) from a HF checkpoint directory.

python -m jobs.convert --base /path/to/Qwen3-0.6B --out models/qwen3-gated --mode probe
"""

from __future__ import annotations

import argparse
import sys

from qgate.model import UnsupportedModelError, convert


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", choices=["probe", "mix"], default="probe")
    ap.add_argument("--bias-init", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    try:
        out = convert(a.base, a.out, mode=a.mode, bias_init=a.bias_init, seed=a.seed)
    except (UnsupportedModelError, FileNotFoundError) as e:
        print(f"convert: {e}", file=sys.stderr)
        return 2
    print(f"gated model written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
