"""Micro-batching side by side: cutting greedily at the token cap against the least-compute
partition that `qgate.scoring.micro_batches` now makes, on the same windows, alternating.

    python bench/micro_batches.py --model-dir models/smollm2 --windows 64 256 1000

Each window size takes that many rows of a corpus whose lengths are log-uniform in 16-512
tokens (bench/score_throughput.py's corpus), scores them with `score_batch` under each rule
(a few rounds, the order swapped each round) and prints padded tokens, forward calls,
tokens/s and the largest score difference between the rules (a row's scores must not
depend on its batch-mates). Run alone: it prints the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def greedy_at_cap(lengths: list[int], batch_tokens: int, call_tokens: int = 0) -> list[list[int]]:
    """The rule before: longest first, a new group only when the token cap would be passed."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups, cur = [], []
    for i in order:
        width = lengths[cur[0]] if cur else lengths[i]
        if cur and width * (len(cur) + 1) > batch_tokens:
            groups.append(cur)
            cur = []
        cur.append(i)
    if cur:
        groups.append(cur)
    return groups


def padded(groups: list[list[int]], lengths: list[int]) -> int:
    """Token positions the groups compute, padding included."""
    return sum(len(g) * max(lengths[i] for i in g) for g in groups)


def main(argv=None) -> int:
    """Time both rules on each window size; print what was measured."""
    import score_throughput as B

    import qgate.scoring as S
    from qgate.model import load_gated_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--windows", type=int, nargs="+", default=[64, 256, 1000])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"$ python {' '.join(sys.argv)}\nload average before: {os.getloadavg()}")
    model, tok, _ = load_gated_model(a.model_dir, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        pairs = B.pair_pool(tmp, a.seed)
        path = os.path.join(tmp, "corpus.jsonl")
        B.write_corpus(path, max(a.windows), pairs, tok, 16, 512, a.seed)
        samples = B.tokenize_corpus(path, tok, 1024)[0]
    new_rule = S.micro_batches
    rules = {"greedy at cap": greedy_at_cap, "least compute": new_rule}
    per_call = S.device_call_tokens("cpu")
    for n in a.windows:
        window = samples[:n]
        lengths = [len(s["input_ids"]) for s in window]
        secs = dict.fromkeys(rules, 0.0)
        out = {}
        for r in range(a.rounds):
            for name in list(rules)[:: 1 if r % 2 == 0 else -1]:
                S.micro_batches = rules[name]
                t = time.perf_counter()
                out[name] = S.score_batch(model, window, pad_id=tok.pad_token_id)
                secs[name] += time.perf_counter() - t
        S.micro_batches = new_rule
        tokens = sum(lengths)
        print(f"window of {n} rows, {tokens} tokens:")
        for name, rule in rules.items():
            groups = rule(lengths, a.batch_tokens, per_call)
            print(
                f"  {name:14s} {len(groups):4d} calls, padded {padded(groups, lengths) / tokens:.2f}x"
                f" its tokens, {a.rounds * tokens / secs[name]:6.0f} tok/s"
            )
        nll = max(abs(x["nll"] - y["nll"]) for x, y in zip(*out.values()))
        emb = max(np.abs(x["embedding"] - y["embedding"]).max() for x, y in zip(*out.values()))
        print(
            f"  speed-up {secs['greedy at cap'] / secs['least compute']:.2f}x;"
            f" max |d nll| {nll:.1e}, max |d embedding| {emb:.1e}"
        )
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
