"""Dedup at scale: wall time, driver memory and recall/precision of planted copies.

    python bench/dedup_scale.py [--rows 100000 1000000] [--out runs/bench_dedup]

For each size, writes a JSONL corpus of instruction rows (random words from a 5,000-word
vocabulary, prompt 8-40 words, answer 3-30 words), of which 5% are exact copies of an
earlier row up to case and whitespace and 5% near copies (one or two words of the prompt
or answer replaced). Then runs the dedup stage (jobs/configs/dedup.yaml settings) on an
embedded Ray and reports wall time, rows/s, the signature and cluster phases, the driver's
peak RSS, and how many planted copies were found (recall) and how many rejects were not
planted copies (false positives). Run it alone: it uses every core.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import resource
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def make_corpus(path: str, n: int, seed: int = 0) -> None:
    """Write ``n`` rows, and ``<path>.planted.json``: {copy id: original id}."""
    rng = random.Random(seed)
    vocab = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
        for _ in range(5000)
    ]
    planted: dict[str, str] = {}
    originals: list[tuple[str, str, str]] = []
    with open(path, "w") as f:
        for i in range(n):
            sid = f"r{i:08d}"
            u = rng.random()
            if originals and u < 0.05:
                oid, p, a = rng.choice(originals)
                p = "  ".join(w.upper() if rng.random() < 0.3 else w for w in p.split(" "))
                planted[sid] = oid
            elif originals and u < 0.10:
                oid, p, a = rng.choice(originals)
                words = (p + " || " + a).split(" ")
                for _ in range(rng.randint(1, 2)):
                    j = rng.randrange(len(words))
                    if words[j] != "||":
                        words[j] = rng.choice(vocab)
                p, a = " ".join(words).split(" || ", 1)
                planted[sid] = oid
            else:
                p = " ".join(rng.choice(vocab) for _ in range(rng.randint(8, 40)))
                a = " ".join(rng.choice(vocab) for _ in range(rng.randint(3, 30)))
                if len(originals) < 200000:
                    originals.append((sid, p, a))
            row = {
                "id": sid,
                "messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}],
            }
            f.write(json.dumps(row) + "\n")
    with open(path + ".planted.json", "w") as f:
        json.dump(planted, f)


def measure(n: int, out: str) -> dict:
    """Build the corpus, dedup it, compare with the planted copies."""
    import pyarrow.parquet as pq

    from qgate.config import DedupConfig
    from qgate.config_io import load_config
    from qgate.dedup import run_dedup

    os.makedirs(out, exist_ok=True)
    corpus = os.path.join(out, f"corpus_{n}.jsonl")
    t0 = time.perf_counter()
    gen = mp.get_context("fork").Process(target=make_corpus, args=(corpus, n))
    gen.start()  # in a child, so the driver's peak RSS below is the dedup job's own
    gen.join()
    with open(corpus + ".planted.json") as f:
        planted = json.load(f)
    t_gen = time.perf_counter() - t0
    dd = os.path.join(out, f"dedup_{n}")
    shutil.rmtree(dd, ignore_errors=True)
    cfg = load_config(
        DedupConfig,
        os.path.join(REPO, "jobs/configs/dedup.yaml"),
        [f"corpus=[{corpus}]", f"output={dd}"],
    )
    m = run_dedup(cfg)
    rej = pq.read_table(
        os.path.join(dd, "rejects", "dedup.parquet"), columns=["sample_id", "reason"]
    ).to_pylist()
    found = {r["sample_id"] for r in rej}
    hits = len(found & set(planted))
    return {
        "rows": n,
        "corpus_mb": round(os.path.getsize(corpus) / 2**20, 1),
        "generate_s": round(t_gen, 1),
        "wall_s": m["wall_s"],
        "sign_s": m["sign_s"],
        "cluster_s": m["cluster_s"],
        "rows_per_s": round(n / m["wall_s"]),
        "driver_peak_rss_mib": m["driver_peak_rss_mib"],
        "kept": m["kept"],
        "rejects_by_reason": m["rejects_by_reason"],
        "planted_copies": len(planted),
        "recall": round(hits / max(len(planted), 1), 4),
        "not_planted_rejects": len(found - set(planted)),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the sizes and print one table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[100000, 1000000])
    ap.add_argument("--out", default=os.path.join(REPO, "runs", "bench_dedup"))
    args = ap.parse_args(argv)
    import ray

    print(f"$ python bench/dedup_scale.py {' '.join(sys.argv[1:])}".rstrip())
    print(
        f"load average before: {'/'.join(f'{x:.1f}' for x in os.getloadavg())}, "
        f"{os.cpu_count()} CPUs",
        flush=True,
    )
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = [measure(n, args.out) for n in args.rows]
    ray.shutdown()
    print(
        "\n| rows | corpus MB | wall s | signatures s | clusters s | rows/s | driver peak RSS MiB "
        "| kept | exact / near rejects | planted copies | recall | rejects not planted |"
    )
    print("|" + "---|" * 12)
    for r in rows:
        rb = r["rejects_by_reason"]
        print(
            f"| {r['rows']:,} | {r['corpus_mb']} | {r['wall_s']:.1f} | {r['sign_s']:.1f} | "
            f"{r['cluster_s']:.1f} | {r['rows_per_s']:,} | {r['driver_peak_rss_mib']:.0f} | "
            f"{r['kept']:,} | {rb.get('duplicate_text', 0):,} / {rb.get('near_duplicate', 0):,} | "
            f"{r['planted_copies']:,} | {r['recall']:.3f} | {r['not_planted_rejects']:,} |"
        )
    print(
        f"\nload average after: {'/'.join(f'{x:.1f}' for x in os.getloadavg())}; "
        f"bench process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
    )
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
