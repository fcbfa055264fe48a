"""Generate the synthetic labelled corpus (pool with noise, target, test, pretrain).

python -m jobs.synth --out data/synth --n-pool 2000 --seed 0
"""

from __future__ import annotations

import argparse
import json

from qgate.synthetic import generate_corpus


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-pool", type=int, default=2000)
    ap.add_argument("--n-target", type=int, default=200)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--n-pretrain", type=int, default=2000)
    ap.add_argument("--noise-ratio", type=float, default=0.3)
    ap.add_argument("--families", nargs="*", default=None)
    a = ap.parse_args(argv)
    paths = generate_corpus(
        a.out,
        seed=a.seed,
        n_pool=a.n_pool,
        n_target=a.n_target,
        n_test=a.n_test,
        n_pretrain=a.n_pretrain,
        noise_ratio=a.noise_ratio,
        families=a.families,
    )
    print(json.dumps(paths, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
