"""Load test of the scoring endpoint on loopback: latency and throughput, batching on vs off.

python bench/serve_load.py [--requests 200] [--concurrency 1 8 32] [--max-batch-size 32]
                           [--hidden-size 128 --num-layers 4] [--run-dir RUN] [--keep DIR]

It builds its own stand-in (synthetic corpus, a random tiny Qwen3 of the shape the quality
notes used, hidden 128 x 4 layers; RUN/scores and RUN/selection from the library functions;
not timed) unless --run-dir points at existing
artifacts. Then, for batching on (--max-batch-size) and off (max_batch_size=1), it deploys the
app (serve/app.py) on 127.0.0.1 and sends --requests POST /v1/score requests at each
concurrency (asyncio + httpx; each of `c` workers sends its next request when the previous
reply arrives). It prints p50/p99 latency, requests/s, samples/s and errors per setting (plus
the mean batch size, the mean time a request spends in the model replica and the mean time of
one batch's score_batch + decide, from the replica's counters), the
batched/unbatched throughput ratio at the highest concurrency, and p50 at concurrency 1 next
to a direct in-process score_batch call on the same samples with the same thread count.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shlex
import socket
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def build_artifacts(work: str, hidden: int, layers: int, n_pool: int, max_length: int) -> str:
    """Corpus, random stand-in, RUN/scores and RUN/selection; returns RUN."""
    from qgate.batch_scoring import run_scoring
    from qgate.config import ScoreConfig, SelectConfig
    from qgate.selection import run_selection
    from qgate.stand_in import build_tiny_model, row_texts
    from qgate.synthetic import generate_corpus, read_rows

    data = generate_corpus(
        os.path.join(work, "data"), seed=0, n_pool=n_pool, n_target=10, n_test=10, n_pretrain=300
    )
    model = build_tiny_model(
        os.path.join(work, "model"),
        row_texts(read_rows(data["pretrain"])),
        vocab_size=1024,
        hidden_size=hidden,
        num_layers=layers,
        seed=0,
    )
    run = os.path.join(work, "run")
    run_scoring(
        ScoreConfig(
            run_dir=run,
            base_model=model,
            corpus=[data["pool"]],
            max_length=max_length,
            batch_tokens=max(4096, max_length),
            rows_per_shard=n_pool,
        )
    )
    run_selection(SelectConfig(run_dir=run, corpus=[data["pool"]], k=4, report=False))
    return run


def pool_rows(run: str) -> list[dict]:
    """The corpus rows the score stage accepted (so every request should score cleanly)."""
    import pyarrow.parquet as pq

    from qgate.data import iter_raw

    scored = set(pq.read_table(os.path.join(run, "scores"), columns=["sample_id"])[0].to_pylist())
    with open(os.path.join(run, "scores", "_manifest.json")) as f:
        inputs = json.load(f)["inputs"]
    rows = [raw for path in inputs for _, raw in iter_raw(path)]
    return [r for r in rows if isinstance(r, dict) and str(r.get("id")) in scored]


async def drive(url: str, bodies: list[dict] | None, n: int, concurrency: int) -> dict:
    """n requests from `concurrency` closed-loop workers; latencies in seconds.

    bodies=None sends GET /healthz instead: Serve's HTTP path with no model work."""
    import httpx

    lat: list[float] = []
    errors = 0
    next_i = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker():
            nonlocal next_i, errors
            while next_i < n:
                i = next_i
                next_i += 1
                t = time.perf_counter()
                try:
                    if bodies is None:
                        r = await client.get("/healthz")
                        ok = r.status_code == 200
                    else:
                        r = await client.post("/v1/score", json=bodies[i % len(bodies)])
                        ok = r.status_code == 200 and r.json()["n_errors"] == 0
                except httpx.HTTPError:
                    ok = False
                lat.append(time.perf_counter() - t)
                errors += not ok

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    samples = sum(len(bodies[i % len(bodies)]["samples"]) for i in range(n)) if bodies else 0
    ms = np.asarray(lat) * 1000
    return {
        "requests": n,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "req_s": n / wall,
        "samples_s": samples / wall,
        "errors": errors,
        "wall_s": wall,
    }


def direct(run: str, rows: list[dict], threads: int, batch: int) -> dict:
    """In-process score_batch on the same samples with the same thread count: p50 of one
    sample per call, and the per-sample cost of `batch` samples per call (the most that
    batching could gain here, with no serving overhead at all)."""
    from qgate.config import ServeConfig
    from qgate.data import validate
    from qgate.scorer import Scorer, ScoringSettings
    from qgate.serving import resolve_artifacts

    art = resolve_artifacts(ServeConfig(run_dir=run))
    scorer = Scorer(
        art["base_model"], art["gates"], ScoringSettings.from_dict(art["scoring"]), threads=threads
    )
    only, full, encs = [], [], []
    for raw in rows:
        msgs = validate(raw, "bench")["messages"]
        t = time.perf_counter()
        enc = scorer.tokenize(msgs)
        t1 = time.perf_counter()
        scorer.score([enc])
        t2 = time.perf_counter()
        only.append(t2 - t1)
        full.append(t2 - t)
        encs.append(enc)
    t = time.perf_counter()
    groups = [encs[i : i + batch] for i in range(0, len(encs), batch)]
    for g in groups:
        scorer.score(g)
    per_sample_batched = (time.perf_counter() - t) / len(encs)
    return {
        "score_batch_p50_ms": 1000 * statistics.median(only),
        "tokenize_score_p50_ms": 1000 * statistics.median(full),
        "single_mean_ms": 1000 * statistics.fmean(only),
        "batched_per_sample_ms": 1000 * per_sample_batched,
    }


def commit_cost(url: str, work: str, n: int, k: int) -> dict:
    """POST /v1/select at c=1 with and without ``commit`` on fresh samples (a corpus of
    another seed, so selected ones really append rather than being refused as copies of the
    pool); the first commit, which loads the pool's signatures, apart."""
    import httpx

    from qgate.synthetic import generate_corpus

    fresh = generate_corpus(
        os.path.join(work, "fresh"),
        seed=99,
        n_pool=2 * n * k + k,
        n_target=2,
        n_test=2,
        n_pretrain=0,
    )
    with open(fresh["pool"]) as f:
        rows = [json.loads(line) for line in f]

    def body(i: int, tag: str, commit: bool) -> dict:
        chunk = [rows[(i * k + j) % len(rows)] for j in range(k)]
        return {
            "samples": [dict(r, id=f"{tag}-{i}-{j}") for j, r in enumerate(chunk)],
            "commit": commit,
        }

    with httpx.Client(base_url=url, timeout=120) as c:
        t = time.perf_counter()
        first = c.post("/v1/select", json=body(0, "first", True)).json()
        first_s = time.perf_counter() - t
        out = {"first_commit_ms": 1000 * first_s}
        for commit in (False, True):
            lat, committed = [], 0
            for i in range(n):
                t = time.perf_counter()
                r = c.post("/v1/select", json=body(i, f"c{int(commit)}", commit)).json()
                lat.append(time.perf_counter() - t)
                committed += r.get("n_committed") or 0
            out["commit" if commit else "plain"] = {
                "mean_ms": 1000 * statistics.mean(lat),
                "p50_ms": 1000 * statistics.median(lat),
                "committed": committed,
            }
    plain, com = out["plain"], out["commit"]
    out["extra_ms_per_request"] = com["mean_ms"] - plain["mean_ms"]
    out["extra_ms_per_committed_sample"] = (
        out["extra_ms_per_request"] * n / com["committed"] if com["committed"] else None
    )
    out["first_committed"] = first.get("n_committed")
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=200, help="requests per setting")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--batch-wait-timeout-s", type=float, default=0.0)
    ap.add_argument("--samples-per-request", type=int, default=1)
    ap.add_argument("--hidden-size", type=int, default=128)
    ap.add_argument("--num-layers", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--n-pool", type=int, default=300)
    ap.add_argument("--model-num-cpus", type=float, default=1.0, help="also torch threads")
    ap.add_argument("--run-dir", help="existing RUN with scores + selection (skip the build)")
    ap.add_argument("--keep", help="build into this directory and keep it")
    ap.add_argument("--commit-requests", type=int, default=50, help="per commit setting")
    args = ap.parse_args(argv)
    print("$ python " + " ".join(shlex.quote(a) for a in sys.argv), flush=True)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray
    from ray import serve

    from qgate.config import ServeConfig
    from serve.app import build

    ray.init(include_dashboard=False, log_to_driver=False)
    work = args.keep or tempfile.mkdtemp(prefix="qgate-serve-bench-")
    t = time.time()
    run = args.run_dir or build_artifacts(
        work, args.hidden_size, args.num_layers, args.n_pool, args.max_length
    )
    rows = pool_rows(run)
    with open(os.path.join(run, "selection", "reference.json")) as f:
        ms = json.load(f)["scoring"]
    print(
        f"artifacts: {run} ({len(rows)} pool rows; hidden {ms['hidden_size']}, "
        f"{ms['num_layers']} layers, max_length {ms['max_length']}, ifd {ms['ifd']}; "
        f"{time.time() - t:.0f}s to build)",
        flush=True,
    )
    k = args.samples_per_request
    bodies = [{"samples": rows[i : i + k]} for i in range(0, len(rows) - k + 1, k)]
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 120})
    base = ServeConfig(
        run_dir=run,
        api_key_env=None,
        model_num_cpus=args.model_num_cpus,
        batch_wait_timeout_s=args.batch_wait_timeout_s,
        max_samples=max(64, k),
    )
    settings = [("batched", args.max_batch_size), ("unbatched", 1)]
    results: dict[tuple[str, int], dict] = {}
    header = (
        f"{'setting':<10} {'max_bs':>6} {'conc':>4} {'reqs':>5} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'req/s':>8} {'samples/s':>9} {'errors':>6} {'mean batch':>10} {'replica ms':>10} "
        f"{'batch ms':>8}"
    )
    lines = [header]
    print(header, flush=True)
    for name, mbs in settings:
        cfg = dataclasses.replace(base, max_batch_size=mbs)
        serve.run(build(cfg), name="qgate", route_prefix="/", blocking=False)
        asyncio.run(drive(url, bodies, 20, 4))  # warm-up (not reported)
        if name == "batched":
            floor = asyncio.run(drive(url, None, args.requests, 1))
        for c in args.concurrency:
            import httpx

            before = httpx.get(f"{url}/v1/info").json()["batching"]
            r = asyncio.run(drive(url, bodies, args.requests, c))
            after = httpx.get(f"{url}/v1/info").json()["batching"]
            nb = after["batches"] - before["batches"]
            r["mean_batch"] = (after["samples"] - before["samples"]) / max(nb, 1)
            calls = max(after["calls"] - before["calls"], 1)
            r["replica_ms"] = 1000 * (after["call_s"] - before["call_s"]) / calls
            r["compute_ms"] = 1000 * (after["compute_s"] - before["compute_s"]) / max(nb, 1)
            results[(name, c)] = r
            line = (
                f"{name:<10} {mbs:>6} {c:>4} {r['requests']:>5} {r['p50_ms']:>8.1f} "
                f"{r['p99_ms']:>8.1f} {r['req_s']:>8.1f} {r['samples_s']:>9.1f} "
                f"{r['errors']:>6} {r['mean_batch']:>10.1f} {r['replica_ms']:>10.1f} "
                f"{r['compute_ms']:>8.1f}"
            )
            lines.append(line)
            print(line, flush=True)
        if name == "batched":
            cc = commit_cost(url, work, args.commit_requests, k)
    serve.shutdown()

    c1_rows = [rows[i % len(rows)] for i in range(min(args.requests, len(rows)))]
    d = direct(run, c1_rows, max(1, int(args.model_num_cpus)), args.max_batch_size)
    cmax = max(args.concurrency)
    ratio = results[("batched", cmax)]["samples_s"] / results[("unbatched", cmax)]["samples_s"]
    errors = sum(r["errors"] for r in results.values())
    print()
    print(
        f"direct score_batch, no serving: {d['single_mean_ms']:.1f} ms/sample one at a time,"
        f" {d['batched_per_sample_ms']:.1f} ms/sample {args.max_batch_size} at a time"
        f" (in-process batching gain {d['single_mean_ms'] / d['batched_per_sample_ms']:.2f}x)"
    )
    load1, load5, _ = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPUs, load average {load1:.1f} (1 min) {load5:.1f} (5 min)")
    print(
        f"throughput at c={cmax}: batched/unbatched = {ratio:.2f}x (target >= 3x): "
        f"{'PASS' if ratio >= 3 else 'FAIL'}"
    )
    print(f"errors over all settings: {errors} (target 0): {'PASS' if errors == 0 else 'FAIL'}")
    per = cc["extra_ms_per_committed_sample"]
    print(
        f"commit (c=1, {args.commit_requests} requests of {k}): /v1/select p50"
        f" {cc['plain']['p50_ms']:.1f} ms plain, {cc['commit']['p50_ms']:.1f} ms with commit"
        f" ({cc['commit']['committed']} samples appended); +{cc['extra_ms_per_request']:.1f} ms"
        f" per request, {'n/a' if per is None else f'{per:.1f}'} ms per committed sample; first"
        f" commit (opens the log, loads the pool's {len(rows)} signatures) {cc['first_commit_ms']:.0f} ms"
    )
    print(
        f"Serve HTTP floor: GET /healthz at c=1 p50 {floor['p50_ms']:.1f} ms"
        " (proxy + ingress, no model call)"
    )
    if 1 in args.concurrency:
        for name, _ in settings:
            p50 = results[(name, 1)]["p50_ms"]
            gap = p50 - d["score_batch_p50_ms"]
            print(
                f"p50 at c=1 ({name}) {p50:.1f} ms vs direct score_batch "
                f"{d['score_batch_p50_ms']:.1f} ms (tokenize + score_batch "
                f"{d['tokenize_score_p50_ms']:.1f} ms): {gap:+.1f} ms (target <= +20 ms): "
                f"{'PASS' if gap <= 20 else 'FAIL'}"
            )
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
