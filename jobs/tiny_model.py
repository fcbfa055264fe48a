"""Build the tiny stand-in Qwen3 base (BPE tokenizer + model), optionally pretrained.

python -m jobs.tiny_model --out models/tiny --corpus data/synth/pretrain.jsonl --epochs 2
"""

from __future__ import annotations

import argparse
import json
import os

from qgate.stand_in import build_stand_in, build_tiny_model, row_texts
from qgate.synthetic import read_rows


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--corpus", required=True, help="JSONL rows to train the tokenizer (and pretrain) on"
    )
    ap.add_argument("--hidden-size", type=int, default=64)
    ap.add_argument("--num-layers", type=int, default=2)
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=0, help="pretraining epochs (0: random weights)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    kw = dict(
        hidden_size=a.hidden_size, num_layers=a.num_layers, vocab_size=a.vocab_size, seed=a.seed
    )
    if a.epochs > 0:
        build_stand_in(a.out, a.corpus, epochs=a.epochs, **kw)
        with open(os.path.join(a.out, "pretrain_stats.json")) as f:
            print(json.dumps(json.load(f)))
    else:
        build_tiny_model(a.out, row_texts(read_rows(a.corpus)), **kw)
    print(f"tiny model written to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
