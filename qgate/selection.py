"""Selection: per-sample scores -> quality score -> (diversity clusters) -> budget.

The pipeline reads RUN/scores (``part-*.parquet`` + ``_manifest.json``) in streaming passes
over pyarrow record batches, so the corpus never has to fit in one process:

1. scalars (sample_id, source, nll, ifd, n_loss_tokens) and the streaming column stats of
   the gate matrix S: ``a_l = min``, ``b_l = max``, ``mu_l = mean`` (:func:`column_stats`);
2. with diversity: the features of a seeded sample of rows, to fit k-means on;
3. per batch: ``q`` (:func:`gate_quality`: DESIGN.md's formula, or the gate head) and the
   cluster of every row.

Every method turns per-sample values into one score where higher is better; a row without a
score (null IFD, outside the perplexity band) is never a candidate. Rows are then taken by
round-robin over clusters (or by global rank) until the budget is met.

``reference.json`` holds everything needed to score and decide on a new sample exactly as the
pool was: :func:`decide` runs the same functions (``gate_quality``, ``percentiles``,
``method_scores``, ``assign_clusters``) on new samples that the pool went through.

Everything here is numpy/pyarrow/scikit-learn: no Ray and no torch.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from qgate import data
from qgate.budget import budget_rows, quota_cap, round_robin_rows
from qgate.clustering import assign_clusters, choose_k, fit_centroids, normalize_rows
from qgate.config import SelectConfig, stage_dir
from qgate.config_io import to_dict
from qgate.gate_head import describe_gate_score, head_from_scores
from qgate.ranking import (
    CLUSTER_MIN_ROWS,
    COMBINED_METHODS,
    SIGNAL_COLUMNS,
    ColumnStats,
    StatsAccumulator,
    gate_quality,
    method_scores,
    method_signals,
    quantile_table,
    signal_values,
    source_quantile_tables,
)
from qgate.reference import Reference
from qgate.scores import (
    SCALAR_COLUMNS,
    SelectionError,
    _is_uri,
    _parquet,
    iter_score_batches,
    list_matrix,
    merge_manifest,
    read_manifest,
    score_parts,
)

log = logging.getLogger(__name__)

PROMPT_FEATURES = "prompt_embedding"
"""The scores column calibration=cluster clusters: what each row asks."""
ROWS_PER_CALIBRATION_CLUSTER = 64
"""calibration_k None: one prompt cluster per this many scored rows (2 to 256). Measured on
five synthetic corpora of 2,000 rows, noise share, AUROC and family balance were flat from
k = 24 to 100 (BENCHMARKS.md, "Ranking within prompt clusters")."""


# ----------------------------------------------------------------------------- the pipeline


@dataclass
class Selection:
    """The result of :func:`compute_selection` (nothing written yet)."""

    table: pa.Table
    """Every scored sample, sorted by sample_id (the selection.parquet rows)."""
    order: np.ndarray
    """Row indices into ``table`` of the selected samples, in selection order."""
    reference: Reference
    manifest: dict
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per step: read_stats, fit, score_assign, rank."""


@dataclass
class _Pool:
    ids: pa.Array  # sorted sample_ids
    cols: dict  # sorted-order arrays: sample_id (np object), source, nll, ifd, n_loss_tokens
    order: np.ndarray  # sorted position -> file position
    inv: np.ndarray  # file position -> sorted position
    stats: ColumnStats


def _read_pool(parts: list[str], manifest: dict) -> _Pool:
    """Pass 1: scalar columns and the column stats of the gate matrix."""
    acc = StatsAccumulator()
    chunks: dict[str, list] = {c: [] for c in SCALAR_COLUMNS}
    for _, batch in iter_score_batches(parts, (*SCALAR_COLUMNS, "gate")):
        acc.update(list_matrix(batch.column("gate"), "gate"))
        for c in SCALAR_COLUMNS:
            chunks[c].append(batch.column(c))
    stats = acc.result()
    layers = (manifest.get("scoring") or {}).get("num_layers")
    if layers is not None and layers != stats.a.shape[0]:
        raise SelectionError(
            f"gate vectors have {stats.a.shape[0]} layers but the manifest says num_layers={layers}"
        )
    ids_file = pa.chunked_array(chunks["sample_id"]).cast(pa.string()).combine_chunks()
    if ids_file.null_count:
        raise SelectionError("sample_id has null values; the scores are corrupt")
    order = pc.sort_indices(ids_file).to_numpy()
    inv = np.empty_like(order)
    inv[order] = np.arange(order.size)
    ids = ids_file.take(pa.array(order))
    if len(ids) > 1 and pc.any(pc.equal(ids[1:], ids[:-1])).as_py():
        dup = pc.filter(ids[1:], pc.equal(ids[1:], ids[:-1]))[0].as_py()
        raise SelectionError(f"sample_id {dup!r} is scored more than once; the scores are corrupt")

    def col(name, dtype):
        arr = pa.chunked_array(chunks[name]).combine_chunks().take(pa.array(order))
        return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=dtype)

    cols = {
        "sample_id": np.asarray(ids.to_numpy(zero_copy_only=False), dtype=object),
        "source": col("source", object),
        "nll": col("nll", np.float64),
        "ifd": col("ifd", np.float64),  # nulls -> NaN
        "n_loss_tokens": col("n_loss_tokens", np.int64),
    }
    return _Pool(ids, cols, order, inv, stats)


def _gather_features(parts, column: str, pool: _Pool, sorted_rows: np.ndarray) -> np.ndarray:
    """Pass 2: normalised features of the rows at ``sorted_rows`` (sorted positions)."""
    slot = np.full(pool.order.size, -1, dtype=np.int64)
    slot[pool.order[sorted_rows]] = np.arange(sorted_rows.size)  # file position -> sample slot
    out = None
    for start, batch in iter_score_batches(parts, (column,)):
        s = slot[start : start + batch.num_rows]
        take = s >= 0
        if not take.any():
            continue
        X = list_matrix(batch.column(column), column)[take]
        if out is None:
            out = np.empty((sorted_rows.size, X.shape[1]), dtype=np.float64)
        out[s[take]] = normalize_rows(X)
    return out


def _score_and_assign(parts, pool: _Pool, ref: Reference, features: str | None):
    """Pass 3: q for every row, its diversity cluster when centroids are given, and its
    prompt cluster when the reference calibrates by cluster (sorted order; -1 if not)."""
    n = pool.order.size
    q = np.empty(n, dtype=np.float64)
    cluster = np.zeros(n, dtype=np.int32)
    calib = np.full(n, -1, dtype=np.int32)
    columns = {"gate"} | ({features} if features not in (None, "gate") else set())
    C = np.asarray(ref.centroids, dtype=np.float64) if features else None
    P = ref.calibration_centroids
    if P is not None:
        columns.add(PROMPT_FEATURES)
        P = np.asarray(P, dtype=np.float64)
    for start, batch in iter_score_batches(parts, tuple(sorted(columns))):
        pos = pool.inv[start : start + batch.num_rows]
        S = list_matrix(batch.column("gate"), "gate")
        q[pos] = gate_quality(S, ref)
        if features:
            X = S if features == "gate" else list_matrix(batch.column(features), features)
            cluster[pos] = assign_clusters(normalize_rows(X), C)
        if P is not None:
            X = list_matrix(batch.column(PROMPT_FEATURES), PROMPT_FEATURES)
            calib[pos] = assign_clusters(normalize_rows(X), P)
    return q, cluster, calib


def calibration_k(cfg: SelectConfig, n: int) -> int:
    """The number of prompt clusters: ``calibration_k``, else one per 64 rows, 2 to 256."""
    if cfg.calibration_k is not None:
        return max(1, min(cfg.calibration_k, n))
    return int(np.clip(n // ROWS_PER_CALIBRATION_CLUSTER, 2, 256)) if n >= 2 else 1


def _fit_calibration_clusters(cfg: SelectConfig, parts, pool: _Pool, ref: Reference) -> None:
    """Fit k-means on a seeded sample of the prompt embeddings; centroids into the reference."""
    missing = [p for p in parts if PROMPT_FEATURES not in _parquet(p).schema_arrow.names]
    if missing:
        raise SelectionError(
            f"calibration: cluster needs the scores' {PROMPT_FEATURES} column, which {missing[0]}"
            " lacks (scored by an older qgate): score again, or use calibration: source or both"
        )
    n = pool.order.size
    m = min(cfg.fit_sample, n)
    rng = np.random.default_rng(cfg.seed)
    rows = np.arange(n) if m == n else np.sort(rng.choice(n, m, replace=False))
    X = _gather_features(parts, PROMPT_FEATURES, pool, rows)
    ref.calibration_centroids = fit_centroids(X, calibration_k(cfg, m), cfg.seed).tolist()


def _fit_diversity(cfg: SelectConfig, parts, pool: _Pool, ref: Reference, warn) -> None:
    """Fit k-means on a seeded sample (positions in sample_id order) of the features; k and
    the centroids (and the silhouette search, when k is chosen) go into the reference."""
    n = pool.order.size
    m = min(cfg.fit_sample, n)
    rng = np.random.default_rng(cfg.seed)
    rows = np.arange(n) if m == n else np.sort(rng.choice(n, m, replace=False))
    X = _gather_features(parts, cfg.features, pool, rows)
    if cfg.k is not None:
        k = cfg.k
        if k > m:
            warn(f"k={k} is more than the {m} rows to cluster; using k={m}")
            k = m
    else:
        k, sil = choose_k(X, cfg.k_min, cfg.k_max, cfg.seed)
        ref.silhouette = {str(kk): v for kk, v in sorted(sil.items())}
    ref.k = k
    ref.centroids = fit_centroids(X, k, cfg.seed).tolist()
    del X


def _pool_tables(cfg: SelectConfig, cols: dict, ref: Reference, signals: list[str]) -> None:
    """Put the pool's percentile tables (and the perplexity band) into the reference, so the
    pool is then scored through the reference exactly as a new sample will be."""
    method = cfg.method
    if method in COMBINED_METHODS:
        ref.quantiles = {s: quantile_table(signal_values(s, cols), s) for s in signals}
        if cfg.calibrates_by_cluster():
            ref.quantiles_by_cluster = source_quantile_tables(
                cols, signals, CLUSTER_MIN_ROWS, group="calibration_cluster"
            )
        if cfg.calibrates_by_source():
            ref.quantiles_by_source = source_quantile_tables(
                cols, signals, cfg.calibration_min_rows
            )
            small = sorted(set(cols["source"].astype(str)) - set(ref.quantiles_by_source))
            if small:
                log.info(
                    "sources with fewer than %d rows use pool-wide percentiles: %s",
                    cfg.calibration_min_rows,
                    small[:10],
                )
    if method == "perplexity" and cfg.ppl_band is not None:
        lo, hi = cfg.ppl_band
        finite = cols["nll"][np.isfinite(cols["nll"])]
        ref.ppl_band = {
            "lo_quantile": lo,
            "hi_quantile": hi,
            "nll_lo": float(np.quantile(finite, lo)),
            "nll_hi": float(np.quantile(finite, hi)),
        }


def _pick(cfg, score, cluster, sources, budget: int, n_cand: int, warn) -> tuple:
    """(selected row positions in pick order, rank per row): round-robin over clusters (one
    cluster without diversity) under the source quotas."""
    if budget > n_cand:
        warn(f"budget {budget} exceeds the {n_cand} candidate rows; taking all of them")
    codes, caps = None, None
    if cfg.source_quotas:
        names, codes = np.unique(sources.astype(str), return_inverse=True)
        names = names.tolist()
        caps = {
            names.index(s): quota_cap(share, budget)
            for s, share in sorted(cfg.source_quotas.items())
            if s in names
        }
        unknown = sorted(set(cfg.source_quotas) - set(names))
        if unknown:
            warn(f"source_quotas name sources with no scored rows: {unknown}")
    sel, rank = round_robin_rows(score, cluster, budget, codes, caps)
    if sel.size < min(budget, n_cand):
        warn(f"source quotas left the selection at {sel.size} rows, below the budget {budget}")
    _warn_thin_sources(sources, np.isfinite(score), sel, warn)
    return sel, rank


THIN_SOURCE = 0.25
"""A source whose share of the selection falls below this fraction of its share of the
candidates is named in a warning (only sources of at least 1% of the candidates)."""


def _warn_thin_sources(sources, candidate, sel, warn) -> None:
    """Warn when the selection all but drops some sources. Pool-wide ranking (calibration
    ``pool`` or ``both``) can empty a whole task family whose rows are just harder (higher
    perplexity), not worse; a user should see that and choose (``calibration: source`` or
    ``source_quotas``)."""
    names, codes = np.unique(sources.astype(str), return_inverse=True)
    if names.size < 2 or sel.size == 0:
        return
    pool = np.bincount(codes[candidate], minlength=names.size) / max(candidate.sum(), 1)
    taken = np.bincount(codes[sel], minlength=names.size) / sel.size
    thin = [
        i for i in np.argsort(pool)[::-1] if pool[i] >= 0.01 and taken[i] < THIN_SOURCE * pool[i]
    ]
    if thin:
        shares = ", ".join(f"{names[i]} {taken[i]:.1%} (pool {pool[i]:.1%})" for i in thin[:8])
        warn(
            f"the selection keeps little of {len(thin)} source(s), share of the selection"
            f" against the candidates: {shares}. If they are harder rather than worse,"
            " calibration: source gives every source its share of the budget"
        )


def _record_outcome(ref, manifest, sources, score, cluster, sel, budget: int, n_cand: int) -> None:
    """Cutoffs, budget and counts of the finished selection, into the reference."""
    n = score.size
    diversity = bool(ref.diversity)
    k = ref.k or 1
    avail = np.bincount(cluster[np.isfinite(score)], minlength=k)
    taken = np.bincount(cluster[sel], minlength=k)
    if diversity:
        cut = np.full(k, np.inf)
        np.minimum.at(cut, cluster[sel], score[sel])
        per_cluster = [float(c) if np.isfinite(c) else None for c in cut]
    else:
        per_cluster = None
    src_names, src_sel = np.unique(sources[sel].astype(str), return_counts=True)
    ref.cutoffs = {
        "per_cluster": per_cluster,
        "global": float(score[sel].min()) if sel.size else None,
    }
    ref.budget = budget
    ref.counts = {
        "rows_in": manifest["rows_in"],
        "scored": n,
        "rejected": manifest["rejected"],
        "candidates": n_cand,
        "selected": int(sel.size),
        "per_cluster_available": avail.tolist() if diversity else None,
        "per_cluster_selected": taken.tolist() if diversity else None,
        "per_source_selected": dict(zip(src_names.tolist(), src_sel.tolist(), strict=True)),
    }


def _selection_table(pool, cols, q, score, pct, cluster, rank, sel, diversity: bool) -> pa.Table:
    """selection.parquet: one row per scored sample, in sample_id order."""
    n = score.size
    calib = cols["calibration_cluster"]
    selected = np.zeros(n, dtype=bool)
    selected[sel] = True
    position = np.full(n, -1, dtype=np.int64)
    position[sel] = np.arange(sel.size)

    def nullable(values, valid, dtype):
        return pa.array(values, type=dtype, mask=~valid)

    finite = np.isfinite(score)
    columns = {
        "sample_id": pool.ids,
        "source": pa.array(cols["source"], type=pa.string()),
        "score": nullable(np.where(finite, score, 0.0), finite, pa.float64()),
        "q": pa.array(q, type=pa.float64()),
        "cluster": nullable(cluster, np.full(n, diversity), pa.int32()),
        "rank": nullable(rank, rank >= 0, pa.int32()),
        "calibration_cluster": nullable(calib, calib >= 0, pa.int32()),
        "selected": pa.array(selected),
        "order": nullable(position, position >= 0, pa.int32()),
        "nll": pa.array(cols["nll"], type=pa.float32()),
        "ifd": nullable(np.nan_to_num(cols["ifd"]), np.isfinite(cols["ifd"]), pa.float32()),
        "n_loss_tokens": pa.array(cols["n_loss_tokens"], type=pa.int32()),
    }
    for s, v in pct.items():
        columns[f"pct_{s}"] = nullable(np.nan_to_num(v), np.isfinite(v), pa.float64())
    return pa.table(columns)


def _new_reference(cfg: SelectConfig, signals: list[str], pool) -> Reference:
    """The reference's settings part, before the fit (clusters, quantiles) fills it in."""
    combined = cfg.method in COMBINED_METHODS
    diversity = cfg.use_diversity
    return Reference(
        method=cfg.method,
        signals=signals if combined else [],
        stats=pool.stats.to_dict(),
        tau=cfg.tau,
        eps=cfg.eps,
        seed=cfg.seed,
        calibration=cfg.calibration if combined else None,
        diversity=diversity,
        features=cfg.features if diversity else None,
    )


def _exclude_duplicates(
    dedup_dir: str, sample_ids, score: np.ndarray, ref: Reference
) -> np.ndarray:
    """The score with NaN for rows a dedup run removed (they stop being candidates)."""
    kept = pq.read_table(os.path.join(dedup_dir, "kept.parquet"), columns=["sample_id"])
    keep = np.isin(sample_ids, np.asarray(kept.column(0).to_pylist(), dtype=object))
    ref.dedup = {"dir": os.path.abspath(dedup_dir), "excluded": int((~keep).sum())}
    return np.where(keep, score, np.nan)


def compute_selection(cfg: SelectConfig, scores_dir: str | None = None) -> Selection:
    """Read the scores and select: everything but the corpus join, files and report."""
    scores_dir = scores_dir or cfg.scores or stage_dir(cfg.run_dir, "scores")
    notes: list[str] = []

    def warn(msg: str) -> None:
        warnings.warn(msg, stacklevel=3)
        notes.append(msg)

    timings: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        timings[name] = round(now - clock[0], 3)
        clock[0] = now

    manifest = read_manifest(scores_dir)
    parts = score_parts(scores_dir, manifest)
    for extra in cfg.more_scores:
        manifest, more = merge_manifest(manifest, extra)
        parts += more
    pool = _read_pool(parts, manifest)
    lap("read_stats")
    n = pool.order.size
    method, diversity = cfg.method, cfg.use_diversity
    signals = method_signals(method, cfg.signals)
    if method in COMBINED_METHODS and not signals:
        raise SelectionError(f"method {method} needs at least one entry in `signals`")
    if "ifd" in signals and not np.isfinite(pool.cols["ifd"]).any():
        raise SelectionError(
            f"method {method} uses the ifd signal but no scored row has an ifd value; score with"
            " `ifd: true`, or choose another method / drop 'ifd' from `signals`"
        )

    ref = _new_reference(cfg, signals, pool)
    if cfg.gate_score == "head":
        ref.gate_head = head_from_scores(scores_dir, parts).to_dict()

    if diversity:
        _fit_diversity(cfg, parts, pool, ref, warn)
    if method in COMBINED_METHODS and cfg.calibrates_by_cluster():
        _fit_calibration_clusters(cfg, parts, pool, ref)
    lap("fit")
    q, cluster, calib = _score_and_assign(parts, pool, ref, cfg.features if diversity else None)
    lap("score_assign")
    cols = dict(pool.cols, q=q, calibration_cluster=calib)

    _pool_tables(cfg, cols, ref, signals)
    score, pct = method_scores(cols, ref)
    if cfg.dedup:  # copies a dedup run removed are not candidates
        score = _exclude_duplicates(cfg.dedup, cols["sample_id"], score, ref)
    n_cand = int(np.isfinite(score).sum())
    if n_cand == 0:
        raise SelectionError(f"method {method}: no scored row has a score; nothing to select")
    if n_cand < n:
        log.info("%d of %d rows are not candidates for method %s", n - n_cand, n, method)

    budget = budget_rows(cfg, n)
    sel, rank = _pick(cfg, score, cluster, cols["source"], budget, n_cand, warn)

    _record_outcome(ref, manifest, cols["source"], score, cluster, sel, budget, n_cand)
    ref.scoring = manifest.get("scoring")
    ref.model_digest = manifest.get("model_digest")
    ref.gates_digest = manifest.get("gates_digest")
    ref.config = to_dict(cfg)

    table = _selection_table(pool, cols, q, score, pct, cluster, rank, sel, diversity)
    lap("rank")
    return Selection(table, sel, ref, manifest, notes, timings)


# ----------------------------------------------------------------------------- new samples


def _sample_columns(samples: Sequence[dict], reference: Reference) -> dict:
    """Per-sample stats dicts -> the column arrays the pool was scored from (same dtypes)."""
    method = reference.method
    needs = set()
    for s in method_signals(method, reference.signals or []):
        needs.add("gate" if s == "gate" else SIGNAL_COLUMNS[s][0])  # the gate vector makes q
    if method == "random":
        needs.add("sample_id")
    if reference.diversity:
        needs.add(reference.features)
    if reference.calibration_centroids is not None:
        needs.add(PROMPT_FEATURES)
    for i, s in enumerate(samples):
        missing = sorted(k for k in needs if k not in s or (k != "ifd" and s[k] is None))
        if missing:
            raise SelectionError(f"sample {i} lacks {missing}, needed by method {method}")

    def floats(key, dtype=np.float32):
        vals = [np.nan if s.get(key) is None else s[key] for s in samples]
        return np.asarray(vals, dtype=dtype).astype(np.float64)

    cols = {
        "nll": floats("nll"),
        "ifd": floats("ifd"),
        "n_loss_tokens": floats("n_loss_tokens", np.float64),
        "sample_id": [str(s.get("sample_id")) for s in samples],
        "source": [str(s.get("source")) for s in samples],
    }
    cols["calibration_cluster"] = np.full(len(samples), -1, dtype=np.int32)
    if reference.calibration_centroids is not None:
        X = np.asarray([s[PROMPT_FEATURES] for s in samples], dtype=np.float32)
        P = np.asarray(reference.calibration_centroids, dtype=np.float64)
        cols["calibration_cluster"] = assign_clusters(normalize_rows(X), P)
    has_gate = all(s.get("gate") is not None for s in samples)
    if has_gate:
        S = np.asarray([s["gate"] for s in samples], dtype=np.float32)
        cols["gate"] = S
        cols["q"] = gate_quality(S, reference)
    else:
        cols["q"] = np.full(len(samples), np.nan)
    return cols


def decide(reference: Reference, samples: Sequence[dict]) -> list[dict]:
    """Score new samples and decide, as the pool selection did, whether each would be selected.

    ``samples`` are per-sample stats dicts with keys nll, gate (list of L floats), embedding
    (list of D floats), ifd (or None), n_loss_tokens (and sample_id for method random); only
    the keys the reference's method and features need are required. With a reference whose
    calibration is 'source' or 'both' (for any signal), a sample's optional ``source`` picks the
    percentile tables of that source; a sample without one, or from a source the pool had too
    few rows of, is ranked against the whole pool (as the pool's own rows of such sources
    were). Returns, per sample,
    ``{q, score, cluster, selected, margin}``: selected means score >= the cutoff of the
    sample's cluster (the global cutoff without diversity); margin = score - cutoff.

    For pool samples this agrees with selection.parquet's ``selected`` flag, except for rows
    tied exactly at a cutoff (the tie-break by sample_id may have left some out) and rows
    skipped by a source quota.
    """
    if not samples:
        return []
    cols = _sample_columns(samples, reference)
    score, _ = method_scores(cols, reference)
    n = len(samples)
    cluster = np.zeros(n, dtype=np.int32)
    if reference.diversity:
        feats = reference.features
        X = cols["gate"] if feats == "gate" else np.asarray([s[feats] for s in samples], np.float32)
        cluster = assign_clusters(normalize_rows(X), np.asarray(reference.centroids))
    cut = reference.cutoffs
    out = []
    for i in range(n):
        cutoff = cut["per_cluster"][int(cluster[i])] if reference.diversity else cut["global"]
        s = float(score[i]) if np.isfinite(score[i]) else None
        ok = s is not None and cutoff is not None and s >= cutoff
        out.append(
            {
                "q": float(cols["q"][i]) if np.isfinite(cols["q"][i]) else None,
                "score": s,
                "cluster": int(cluster[i]) if reference.diversity else None,
                "selected": bool(ok),
                "margin": s - cutoff if s is not None and cutoff is not None else None,
            }
        )
    return out


# ----------------------------------------------------------------------------- outputs


def join_corpus(corpus: Sequence[str], sample_ids: Sequence[str]) -> list[dict]:
    """Canonical rows for ``sample_ids`` from the corpus, in the given order (one pass)."""
    want = {sid: i for i, sid in enumerate(sample_ids)}
    rows: list[dict | None] = [None] * len(want)
    for item in data.iter_corpus(corpus):
        if isinstance(item, data.Reject):
            continue
        i = want.get(item["sample_id"])
        if i is not None:
            rows[i] = item
    missing = [sid for sid, i in want.items() if rows[i] is None]
    if missing:
        raise SelectionError(
            f"{len(missing)} selected sample_id(s) are not in the corpus {list(corpus)} (first:"
            f" {missing[:5]}); pass the same corpus paths the score stage read"
        )
    return rows


def run_selection(cfg: SelectConfig) -> dict:
    """The selection stage: select, then write selected.jsonl, selection.parquet,
    reference.json and (cfg.report) report.html; returns a summary dict."""
    from qgate import report as report_mod

    out_dir = cfg.output or stage_dir(cfg.run_dir, "selection")
    result = compute_selection(cfg)
    corpus = list(cfg.corpus) or list((result.manifest.get("config") or {}).get("corpus") or [])
    if not corpus:
        raise SelectionError(
            "no corpus to join selected rows from: set `corpus` to the paths the score stage read"
        )
    if not cfg.corpus:
        log.info("corpus not set; using the score stage's corpus %s", corpus)
    table, ref = result.table, result.reference
    ids = table.column("sample_id").to_numpy(zero_copy_only=False)[result.order].tolist()
    examples = report_mod.example_ids(table, ref) if cfg.report else None
    chosen = set(ids)
    shown = report_mod.all_example_ids(examples) if examples else []
    extra = [i for i in shown if i not in chosen]
    joined = join_corpus(corpus, ids + extra)  # one corpus pass for the selection and the report
    rows = joined[: len(ids)]

    local = tempfile.mkdtemp(prefix="qgate-select-") if _is_uri(out_dir) else out_dir
    os.makedirs(local, exist_ok=True)
    data.write_jsonl(os.path.join(local, "selected.jsonl"), rows)
    pq.write_table(table, os.path.join(local, "selection.parquet"))
    ref.save(os.path.join(local, "reference.json"))

    labels = report_mod.read_labels(corpus, cfg.label_column)
    metrics = report_mod.label_metrics(table, labels) if labels else None
    report_path = None
    if cfg.report:
        scores_dir = cfg.scores or stage_dir(cfg.run_dir, "scores")
        report_path = report_mod.write_report(
            local,
            table,
            ref,
            labels=labels,
            rows_by_id={r["sample_id"]: r for r in joined},
            examples=examples,
            rejects=report_mod.reject_examples(None if _is_uri(scores_dir) else scores_dir),
        )
    else:
        report_mod.clear_report(local)
    if local != out_dir:
        import fsspec

        fs, _, (root,) = fsspec.get_fs_token_paths(out_dir)
        fs.put(local.rstrip("/") + "/", root, recursive=True)
        shutil.rmtree(local, ignore_errors=True)

    cut = ref.cutoffs
    per = [c for c in (cut["per_cluster"] or []) if c is not None]
    return {
        "output": out_dir,
        "method": cfg.method,
        "signals": ref.signals,
        "rows": ref.counts["scored"],
        "candidates": ref.counts["candidates"],
        "budget": ref.budget,
        "selected": ref.counts["selected"],
        "diversity": ref.diversity,
        "k": ref.k,
        "cutoff_global": cut["global"],
        "cutoff_per_cluster_range": [min(per), max(per)] if per else None,
        "per_source_selected": ref.counts["per_source_selected"],
        "gate_score": (
            describe_gate_score(ref.gate_head)
            if "gate" in method_signals(ref.method, ref.signals)
            else None
        ),
        "label_metrics": metrics,
        "report": os.path.join(out_dir, "report.html") if report_path else None,
        "warnings": result.warnings,
    }
