"""Selection at scale: time and peak memory of the selection core on 100k and 1M rows.

python bench/select_scale.py [--rows 100000 1000000] [--method quality_gate | --shipped] [--keep DIR]

For each size it writes a synthetic RUN/scores (L=28 gate layers, D=256 embeddings and prompt
embeddings, parts of 100k rows; not timed), then times qgate.selection.compute_selection in a
fresh subprocess: the streaming column stats, q, k-means (k by silhouette) fitted on a seeded
sample and assigned to every row, and the round-robin budget. ``--shipped`` times
jobs/configs/select.yaml instead (worst_rank within prompt clusters: one k-means of 256
clusters at 1M rows, fitted on 50k prompt embeddings, and per-cluster percentile tables). The corpus join and the report are not
timed. Peak RSS is the child's ru_maxrss, so each size is measured on its own (the parent
stays small: data are written by subprocesses as well).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time

import numpy as np

L, D = 28, 256
PART_ROWS = 100_000
CENTRES = 24
TASKS = 300
"""Distinct kinds of prompt in the synthetic prompt embeddings."""


def write_scores(out_dir: str, n: int, seed: int = 0) -> None:
    """Synthetic scores with the version-1 schema, written part by part (bounded memory)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(CENTRES, D)).astype(np.float32)
    tasks = rng.normal(size=(TASKS, D)).astype(np.float32)
    layer_mean = rng.uniform(0.2, 0.8, L).astype(np.float32)
    os.makedirs(out_dir, exist_ok=True)
    for j, start in enumerate(range(0, n, PART_ROWS)):
        m = min(PART_ROWS, n - start)
        quality = rng.normal(size=(m, 1)).astype(np.float32)
        gate = np.clip(layer_mean + 0.05 * quality + 0.05 * rng.normal(size=(m, L)), 0, 1)
        emb = centres[rng.integers(0, CENTRES, m)] + rng.normal(size=(m, D)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        prompt = tasks[rng.integers(0, TASKS, m)] + 0.3 * rng.normal(size=(m, D)).astype(np.float32)
        prompt /= np.linalg.norm(prompt, axis=1, keepdims=True)
        ifd = rng.uniform(0.3, 1.5, m).astype(np.float32)
        table = pa.table(
            {
                "sample_id": pa.array([f"row-{i:09d}" for i in range(start, start + m)]),
                "source": pa.array(rng.choice(["web", "books", "code", "chat"], m).tolist()),
                "n_tokens": pa.array(rng.integers(20, 1024, m), pa.int32()),
                "n_loss_tokens": pa.array(rng.integers(5, 512, m), pa.int32()),
                "truncated": pa.array(np.zeros(m, dtype=bool)),
                "nll": pa.array(rng.gamma(2.0, 1.0, m).astype(np.float32)),
                "gate": pa.FixedSizeListArray.from_arrays(
                    pa.array(gate.astype(np.float32).ravel()), L
                ),
                "gate_mean": pa.FixedSizeListArray.from_arrays(
                    pa.array(gate.astype(np.float32).ravel()), L
                ),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), D),
                "prompt_embedding": pa.FixedSizeListArray.from_arrays(pa.array(prompt.ravel()), D),
                "ifd": pa.array(ifd, mask=rng.random(m) < 0.01),
            }
        )
        pq.write_table(table, os.path.join(out_dir, f"part-{j:05d}.parquet"))
    manifest = {
        "version": 1,
        "complete": True,
        "rows_in": n,
        "scored": n,
        "rejected": 0,
        "rejects_by_reason": {},
        "model_digest": "bench",
        "gates_digest": "bench",
        "scoring": {"num_layers": L, "embedding_dim": D},
        "config": {},
    }
    with open(os.path.join(out_dir, "_manifest.json"), "w") as f:
        json.dump(manifest, f)


def child(scores_dir: str, method: str) -> None:
    """Run the selection core once and print one JSON line (time, peak RSS, result);
    ``method`` 'shipped' runs jobs/configs/select.yaml."""
    from qgate.config import SelectConfig
    from qgate.config_io import load_config
    from qgate.selection import compute_selection

    if method == "shipped":
        shipped = os.path.join(os.path.dirname(__file__), "..", "jobs", "configs", "select.yaml")
        cfg = load_config(SelectConfig, shipped, [f"scores={scores_dir}", "report=false"])
    else:
        cfg = SelectConfig(scores=scores_dir, method=method)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    result = compute_selection(cfg)
    seconds = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    ref = result.reference
    out = {
        "seconds": seconds,
        "peak_rss_mb": r1.ru_maxrss / 1024,
        "rss_before_mb": r0.ru_maxrss / 1024,
        "cpu_seconds": (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime),
        "rows": ref.counts["scored"],
        "selected": ref.counts["selected"],
        "k": ref.k or len(ref.calibration_centroids or []) or None,
        "steps": result.timings,
    }
    print(json.dumps(out))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--method", default="quality_gate")
    ap.add_argument("--shipped", action="store_true", help="time jobs/configs/select.yaml")
    ap.add_argument("--keep", help="write score tables here and keep them (default: a temp dir)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--write", nargs=2, metavar=("DIR", "ROWS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.shipped:
        args.method = "shipped"
    if args.child:
        child(args.child, args.method)
        return 0
    if args.write:
        write_scores(args.write[0], int(args.write[1]))
        return 0

    print("$ python " + " ".join(shlex.quote(a) for a in sys.argv))
    print(f"machine: {os.cpu_count()} CPUs; L={L}, D={D}, method={args.method}, defaults otherwise")
    root = args.keep or tempfile.mkdtemp(prefix="qgate-select-bench-")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    results = {}
    for n in args.rows:
        scores = os.path.join(root, f"scores_{n}")
        if not os.path.exists(os.path.join(scores, "_manifest.json")):
            # In a subprocess too: a forked child inherits its parent's peak RSS on Linux.
            t0 = time.perf_counter()
            me = [sys.executable, os.path.abspath(__file__)]
            subprocess.run([*me, "--write", scores, str(n)], env=env, check=True)
            print(f"wrote {n:,} rows in {time.perf_counter() - t0:.1f}s (not timed)")
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--child",
            scores,
            "--method",
            args.method,
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results[n] = r
        print(
            f"rows={n:>9,}  time={r['seconds']:7.2f}s  cpu={r['cpu_seconds']:6.1f}s  peak_rss={r['peak_rss_mb']:7.0f} MiB"
            f" (after imports {r['rss_before_mb']:.0f})  k={r['k']}  selected={r['selected']:,}"
            f"  steps={r['steps']}"
        )
    sizes = sorted(results)
    if len(sizes) >= 2:
        a, b = sizes[0], sizes[-1]
        ratio = results[b]["seconds"] / results[a]["seconds"]
        cpu = results[b]["cpu_seconds"] / results[a]["cpu_seconds"]
        print(
            f"time ratio {b:,}/{a:,} rows = {ratio:.2f} (cpu-time ratio {cpu:.2f});"
            f" rows x{b / a:g}, target <= 12 for x10"
        )
        print(f"load average at the end: {os.getloadavg()[0]:.2f} (other work skews wall time)")
    if not args.keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
