"""The dedup stage: exact and near-duplicate removal over a corpus, as a Ray Data job.

1. Signatures, in parallel Ray tasks, one shard (file, row range) per task: each valid row's
   exact key (:func:`qgate.minhash.exact_key`) and MinHash signature go to
   ``signatures/part-<shard>.parquet``; rows that fail validation go to
   ``rejects/ingest-<shard>.parquet`` with their reason. A ``_shards/<shard>.json`` marker
   makes the pass resumable, like the score stage.
2. Clusters, on the driver, from compact arrays (16 + 4*num_perm bytes per row, no text):
   rows with equal exact keys form a ``duplicate_text`` cluster; the clusters' kept rows are
   then LSH-banded, candidate pairs in a band bucket are verified (estimated Jaccard >=
   threshold) and their connected components form ``near_duplicate`` clusters.
3. Each cluster keeps one member: the best score (``keep: best`` with ``keep_scores``, a
   selection.parquet), else the first in input order. ``kept.parquet`` lists the kept rows;
   ``rejects/dedup.parquet`` the others with the reason and ``kept_id``. rows in = kept +
   rejected, checked before ``_manifest.json`` is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qgate.atomic import remove_stale_temps, write_json, write_parquet
from qgate.config import DedupConfig, MinHash, stage_dir
from qgate.config_io import to_dict
from qgate.data import (
    DUPLICATE_TEXT,
    NEAR_DUPLICATE,
    UNREADABLE_ROW,
    expand_paths,
    iter_raw,
    source_name,
    validate,
)
from qgate.minhash import band_keys, exact_key, sample_text, signatures
from qgate.readers import plan_shards
from qgate.scores import MANIFEST_FILE, PLAN_FILE, REJECTS_DIR, SHARDS_DIR

SIGNATURES_DIR = "signatures"
KEPT_FILE = "kept.parquet"
DEDUP_REJECTS_FILE = "dedup.parquet"


class DedupError(RuntimeError):
    """The dedup job cannot finish safely (lost rows, a plan from another corpus)."""


REJECT_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("source", pa.string()),
        ("path", pa.string()),
        ("row_index", pa.int64()),
        ("reason", pa.string()),
        ("kept_id", pa.string()),
        ("similarity", pa.float32()),
        ("detail", pa.string()),
    ]
)
KEPT_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("source", pa.string()),
        ("path", pa.string()),
        ("row_index", pa.int64()),
        ("order", pa.int64()),
        ("cluster_size", pa.int32()),
    ]
)


def signature_schema(num_perm: int) -> pa.Schema:
    """One signed row: ids, position in its file, exact key and MinHash signature."""
    return pa.schema(
        [
            ("sample_id", pa.string()),
            ("source", pa.string()),
            ("row_index", pa.int64()),
            ("key", pa.binary(16)),
            ("minhash", pa.list_(pa.uint32(), num_perm)),
        ]
    )


# ----------------------------------------------------------------------------- pass 1


def sign_shard(item: dict, out: str, st: MinHash) -> dict:
    """Sign one shard's valid rows and write its ingest rejects; never raises on a row."""
    src = source_name(item["path"])
    ids, sources, index, keys, texts, rejects = [], [], [], [], [], []
    for i, raw in iter_raw(item["path"], int(item["start"]), int(item["stop"])):
        got = validate(raw, src, i)
        if not isinstance(got, dict):
            rejects.append((got.sample_id, got.source, i, got.reason, got.detail))
            continue
        try:
            key, text = exact_key(got["messages"]), sample_text(got["messages"])
        except Exception as e:  # one odd row, never the shard
            rejects.append((got["sample_id"], got["source"], i, UNREADABLE_ROW, repr(e)[:500]))
            continue
        ids.append(got["sample_id"])
        sources.append(got["source"])
        index.append(i)
        keys.append(bytes.fromhex(key))
        texts.append(text)
    sig = signatures(texts, st)
    schema = signature_schema(st.num_perm)
    table = pa.table(
        {
            "sample_id": pa.array(ids, pa.string()),
            "source": pa.array(sources, pa.string()),
            "row_index": pa.array(index, pa.int64()),
            "key": pa.array(keys, pa.binary(16)),
            "minhash": pa.FixedSizeListArray.from_arrays(
                pa.array(sig.reshape(-1), pa.uint32()), st.num_perm
            ),
        },
        schema=schema,
    )
    shard = str(item["shard"])
    write_parquet(table, os.path.join(out, SIGNATURES_DIR, f"part-{shard}.parquet"))
    rej = {
        name: [r[j] for r in rejects]
        for j, name in enumerate(("sample_id", "source", "row_index", "reason", "detail"))
    }
    rej |= {"path": [item["path"]] * len(rejects), "kept_id": [None] * len(rejects)}
    rej["similarity"] = [None] * len(rejects)
    write_parquet(
        pa.table({f.name: pa.array(rej[f.name], f.type) for f in REJECT_SCHEMA}),
        os.path.join(out, REJECTS_DIR, f"ingest-{shard}.parquet"),
    )
    info = {"shard": shard, "rows": len(ids) + len(rejects), "signed": len(ids)}
    info["rejected"] = len(rejects)
    write_json(os.path.join(out, SHARDS_DIR, f"{shard}.json"), info, indent=None)
    return info


def _sign_batch(batch: dict, out: str, settings: dict) -> dict:
    """Ray Data task body: sign every shard descriptor in the batch."""
    st = MinHash.from_dict(settings)
    infos = []
    for j in range(len(batch["shard"])):
        item = {k: batch[k][j] for k in ("shard", "path", "start", "stop")}
        infos.append(json.dumps(sign_shard(item, out, st)))
    return {"info": np.array(infos, dtype=object)}


# ----------------------------------------------------------------------------- pass 2


def priority(order: np.ndarray, score: np.ndarray | None) -> np.ndarray:
    """Each row's rank in the keep rule (0 = kept first): higher score first (rows without
    a score last), then input order."""
    if score is None:
        return np.asarray(order, dtype=np.int64)  # order is the input position already
    s = np.where(np.isfinite(score), score, -np.inf)
    ranked = np.lexsort((order, -s))
    prio = np.empty(order.size, dtype=np.int64)
    prio[ranked] = np.arange(order.size)
    return prio


def _representatives(group: np.ndarray, prio: np.ndarray) -> np.ndarray:
    """For each row, the row of its group with the lowest priority rank."""
    if group.size == 0:
        return np.zeros(0, dtype=np.int64)
    ranked = np.lexsort((prio, group))  # by group, then priority
    g = group[ranked]
    first = ranked[np.r_[True, g[1:] != g[:-1]]]  # each group's best row, groups ascending
    best = np.empty(int(group.max()) + 1, dtype=np.int64)
    best[group[first]] = first
    return best[group]


def near_components(sig: np.ndarray, st: MinHash) -> np.ndarray:
    """Component label per row: connected components of verified LSH candidate pairs.

    In every band, rows with an equal key are compared with the bucket's first row (a star,
    so a bucket of m rows costs m comparisons); pairs at or above the threshold are edges.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = sig.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    keys = band_keys(sig, st)
    src, dst = [], []
    for band in range(keys.shape[1]):
        order = np.argsort(keys[:, band], kind="stable")
        k = keys[order, band]
        starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
        head = np.repeat(order[starts], np.diff(np.r_[starts, n]))
        pair = head != order
        a, b = head[pair], order[pair]
        if a.size:
            ok = (sig[a] == sig[b]).mean(axis=1) >= st.threshold
            src.append(a[ok])
            dst.append(b[ok])
    if not src:
        return np.arange(n)
    a, b = np.concatenate(src), np.concatenate(dst)
    graph = coo_matrix((np.ones(a.size, dtype=np.int8), (a, b)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def cluster(
    keys: np.ndarray,
    sig: np.ndarray,
    prio: np.ndarray,
    st: MinHash,
    exact: bool = True,
    near: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(kept row per row, reason code per row: 0 kept, 1 duplicate_text, 2 near_duplicate).

    Exact clusters first; their kept rows are then clustered by similarity. A row's kept
    row is always the final survivor (an exact copy of a near-duplicate points past it).
    """
    n = keys.shape[0]
    rep = np.arange(n)
    if exact and n:
        _, group = np.unique(keys, return_inverse=True)
        rep = _representatives(group.reshape(-1), prio)
    code = np.where(rep != np.arange(n), 1, 0).astype(np.int8)
    if near and n:
        alive = np.flatnonzero(code == 0)
        comp = near_components(sig[alive], st)
        sub_rep = alive[_representatives(comp, prio[alive])]
        final = np.arange(n)
        final[alive] = sub_rep
        code[alive[sub_rep != alive]] = 2
        rep = final[rep]
    return rep, code


# ----------------------------------------------------------------------------- driver


def _keep_scores(path: str | None, ids: np.ndarray) -> np.ndarray | None:
    """Per row, the ``score`` of its sample_id in a selection.parquet (NaN: none)."""
    if not path:
        return None
    t = pq.read_table(path, columns=["sample_id", "score"])
    lookup = dict(
        zip(t.column("sample_id").to_pylist(), t.column("score").to_pylist(), strict=True)
    )
    return np.array([np.nan if lookup.get(s) is None else lookup[s] for s in ids], np.float64)


def _read_signatures(out: str, shards: list[dict], num_perm: int) -> dict:
    """The signed rows of every shard in input order, as compact arrays."""
    cols: dict[str, list] = {"sample_id": [], "source": [], "row_index": [], "key": [], "sig": []}
    shard_of: list[np.ndarray] = []
    for si, s in enumerate(shards):
        t = pq.read_table(os.path.join(out, SIGNATURES_DIR, f"part-{s['shard']}.parquet"))
        cols["sample_id"].append(np.asarray(t.column("sample_id").to_pylist(), dtype=object))
        cols["source"].append(np.asarray(t.column("source").to_pylist(), dtype=object))
        cols["row_index"].append(t.column("row_index").to_numpy())
        flat = t.column("key").combine_chunks()
        cols["key"].append(np.frombuffer(flat.buffers()[1], dtype="S16", count=len(flat)))
        mh = t.column("minhash").combine_chunks()
        cols["sig"].append(mh.flatten().to_numpy().reshape(-1, num_perm))
        shard_of.append(np.full(t.num_rows, si, dtype=np.int32))
    if not shards:
        return {
            "sample_id": np.zeros(0, object),
            "source": np.zeros(0, object),
            "row_index": np.zeros(0, np.int64),
            "key": np.zeros(0, "S16"),
            "sig": np.zeros((0, num_perm), np.uint32),
            "shard": np.zeros(0, np.int32),
        }
    arrays = {k: np.concatenate(v) for k, v in cols.items()}
    arrays["shard"] = np.concatenate(shard_of)
    return arrays


def run_dedup(cfg: DedupConfig) -> dict:
    """Dedup the corpus into RUN/dedup (or cfg.output); resumable; returns the manifest."""
    t0 = time.time()
    out = os.path.abspath(cfg.output or stage_dir(cfg.run_dir, "dedup"))
    for d in (SIGNATURES_DIR, REJECTS_DIR, SHARDS_DIR):
        os.makedirs(os.path.join(out, d), exist_ok=True)
    st = cfg.minhash
    paths = expand_paths(cfg.corpus)
    shards = plan_shards(paths, cfg.rows_per_shard)
    plan = {"shards": shards, "minhash": st.to_dict()}
    plan_path = os.path.join(out, PLAN_FILE)
    if os.path.isfile(plan_path):
        with open(plan_path) as f:
            if json.load(f) != plan:
                raise DedupError(
                    f"{out} holds a dedup run of another corpus or minhash settings; use a new"
                    " output path (or delete it)"
                )
    else:
        write_json(plan_path, plan)
    done = {p[:-5] for p in os.listdir(os.path.join(out, SHARDS_DIR)) if p.endswith(".json")}
    todo = [s for s in shards if s["shard"] not in done]
    print(
        f"[dedup] {len(shards)} shards, {len(done)} already signed, {len(todo)} to sign", flush=True
    )
    if todo:
        _sign(cfg, out, todo, t0)
    t_sign = time.time() - t0

    arrays = _read_signatures(out, shards, st.num_perm)
    n = arrays["key"].shape[0]
    order = np.arange(n)
    score = _keep_scores(cfg.keep_scores, arrays["sample_id"]) if cfg.keep == "best" else None
    rep, code = cluster(
        arrays["key"], arrays["sig"], priority(order, score), st, cfg.exact, cfg.near
    )
    t_cluster = time.time() - t0 - t_sign
    shard_path = np.asarray([s["path"] for s in shards], dtype=object)
    arrays["path"] = shard_path[arrays["shard"]] if n else np.zeros(0, object)
    _write_outcome(out, arrays, rep, code)
    return _finish(cfg, out, shards, paths, n, int((code == 0).sum()), t0, t_sign, t_cluster)


def _sign(cfg: DedupConfig, out: str, todo: list[dict], t0: float) -> None:
    """Sign the shards still to do with Ray Data tasks, printing progress per shard."""
    import ray.data

    from qgate.watchdog import shard_summaries

    ds = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
        _sign_batch,
        fn_kwargs={"out": out, "settings": cfg.minhash.to_dict()},
        batch_size=1,
        num_cpus=cfg.num_cpus,
    )
    n_rows, rows_done = sum(s["stop"] - s["start"] for s in todo), 0
    with contextlib.closing(shard_summaries(ds, "dedup")) as summaries:
        for info in summaries:
            rows_done += info["rows"]
            rate = rows_done / max(time.time() - t0, 1e-9)
            print(f"[dedup] signed {rows_done}/{n_rows} rows ({rate:.0f} rows/s)", flush=True)


def _write_outcome(out: str, arrays: dict, rep, code) -> None:
    """kept.parquet (each cluster's representative, with its cluster size) and the dedup
    rejects file (every other member, with the kept id, its similarity and a reason)."""
    n = rep.shape[0]
    sizes = np.bincount(rep, minlength=n)
    kept = code == 0
    write_parquet(
        pa.table(
            {
                "sample_id": pa.array(arrays["sample_id"][kept], pa.string()),
                "source": pa.array(arrays["source"][kept], pa.string()),
                "path": pa.array(arrays["path"][kept], pa.string()),
                "row_index": pa.array(arrays["row_index"][kept], pa.int64()),
                "order": pa.array(np.flatnonzero(kept), pa.int64()),  # input position
                "cluster_size": pa.array(sizes[kept], pa.int32()),
            },
            schema=KEPT_SCHEMA,
        ),
        os.path.join(out, KEPT_FILE),
    )
    dup = np.flatnonzero(~kept)
    reasons = np.array(["", DUPLICATE_TEXT, NEAR_DUPLICATE], dtype=object)[code[dup]]
    sim = (arrays["sig"][dup] == arrays["sig"][rep[dup]]).mean(axis=1) if dup.size else []
    kept_ids = arrays["sample_id"][rep[dup]]
    details = [
        f"{r}: same text as {k!r}" if r == DUPLICATE_TEXT else f"{r}: similarity {s:.2f} to {k!r}"
        for r, k, s in zip(reasons, kept_ids, sim, strict=True)
    ]
    write_parquet(
        pa.table(
            {
                "sample_id": pa.array(arrays["sample_id"][dup], pa.string()),
                "source": pa.array(arrays["source"][dup], pa.string()),
                "path": pa.array(arrays["path"][dup], pa.string()),
                "row_index": pa.array(arrays["row_index"][dup], pa.int64()),
                "reason": pa.array(reasons, pa.string()),
                "kept_id": pa.array(kept_ids, pa.string()),
                "similarity": pa.array(np.asarray(sim, np.float32), pa.float32()),
                "detail": pa.array(details, pa.string()),
            },
            schema=REJECT_SCHEMA,
        ),
        os.path.join(out, REJECTS_DIR, DEDUP_REJECTS_FILE),
    )


def _finish(cfg, out, shards, paths, n_signed, n_kept, t0, t_sign, t_cluster) -> dict:
    """Count, check rows in = kept + rejected, remove the temp files a killed writer of an
    earlier run left, and write the manifest."""
    rej_dir = os.path.join(out, REJECTS_DIR)
    dirs = ("", SIGNATURES_DIR, REJECTS_DIR, SHARDS_DIR)
    stale = sum(remove_stale_temps(os.path.join(out, d), t0) for d in dirs)
    if stale:
        print(f"[dedup] removed {stale} temp file(s) a killed writer left", flush=True)
    reasons: Counter = Counter()
    for p in sorted(os.listdir(rej_dir)):
        if p.endswith(".parquet"):
            reasons.update(
                pq.read_table(os.path.join(rej_dir, p), columns=["reason"])
                .column("reason")
                .to_pylist()
            )
    rows_in = sum(s["stop"] - s["start"] for s in shards)
    rejected = sum(reasons.values())
    if rows_in != n_kept + rejected:
        raise DedupError(f"rows lost: {rows_in} rows in, {n_kept} kept + {rejected} rejected")
    manifest = {
        "complete": True,
        "rows_in": rows_in,
        "signed": n_signed,
        "kept": n_kept,
        "rejected": rejected,
        "rejects_by_reason": dict(sorted(reasons.items())),
        "minhash": cfg.minhash.to_dict(),
        "bands": list(cfg.minhash.bands),
        "keep": cfg.keep,
        "inputs": paths,
        "config": to_dict(cfg),
        "wall_s": round(time.time() - t0, 3),
        "sign_s": round(t_sign, 3),
        "cluster_s": round(t_cluster, 3),
        "driver_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    write_json(os.path.join(out, MANIFEST_FILE), manifest)
    manifest["output"] = out
    return manifest


def read_manifest(dedup_dir: str) -> dict:
    """A finished dedup run's manifest (raises if the run is missing or incomplete)."""
    path = os.path.join(dedup_dir, MANIFEST_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no finished dedup run at {dedup_dir} (no {MANIFEST_FILE})")
    with open(path) as f:
        return json.load(f)


def dropped_rows(dedup_dir: str) -> dict[str, dict[int, tuple[str, str]]]:
    """Rows a dedup run rejected as copies: ``{path: {row_index: (reason, detail)}}``."""
    t = pq.read_table(
        os.path.join(dedup_dir, REJECTS_DIR, DEDUP_REJECTS_FILE),
        columns=["path", "row_index", "reason", "detail"],
    )
    out: dict[str, dict[int, tuple[str, str]]] = {}
    for p, i, r, d in zip(*(t.column(c).to_pylist() for c in t.column_names), strict=True):
        out.setdefault(p, {})[int(i)] = (r, d)
    return out
