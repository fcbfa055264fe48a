"""Selection: per-sample scores -> quality score -> (diversity clusters) -> budget.

The pipeline reads RUN/scores (``part-*.parquet`` + ``_manifest.json``) in streaming passes
over pyarrow record batches, so the corpus never has to fit in one process:

1. scalars (sample_id, source, nll, ifd, n_loss_tokens) and the streaming column stats of
   the gate matrix S: ``a_l = min``, ``b_l = max``, ``mu_l = mean`` (:func:`column_stats`);
2. with diversity: the features of a seeded sample of rows, to fit k-means on;
3. per batch: ``q`` (:func:`quality_scores`) and the cluster of every row.

Every method turns per-sample values into one score where higher is better; a row without a
score (null IFD, outside the perplexity band) is never a candidate. Rows are then taken by
round-robin over clusters (or by global rank) until the budget is met.

``reference.json`` holds everything needed to score and decide on a new sample exactly as the
pool was: :func:`decide` runs the same functions (``quality_scores``, ``percentiles``,
``method_scores``, ``assign_clusters``) on new samples that the pool went through.

Everything here is numpy/pyarrow/scikit-learn: no Ray and no torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from qgate import data
from qgate.config import SelectConfig, stage_dir, to_dict

log = logging.getLogger(__name__)

REFERENCE_VERSION = 1
SIGNALS = ("gate", "perplexity", "ifd", "length")
COMBINED_METHODS = ("worst_rank", "rank_mean")
N_QUANTILES = 1001
"""Quantiles stored per signal: percentiles of new samples are interpolated in this table."""
BATCH_ROWS = 65536
"""Rows per record batch in every streaming pass (memory: BATCH_ROWS x D x 8 bytes)."""
MINIBATCH_ABOVE = 20000
"""Fit samples larger than this use MiniBatchKMeans instead of KMeans."""
SILHOUETTE_ROWS = 5000
"""Rows of the fit sample used to choose k by silhouette."""
SILHOUETTE_EVAL_ROWS = 2000
"""Rows the silhouette itself is evaluated on (k-means is fitted on SILHOUETTE_ROWS)."""
SILHOUETTE_KS = 6
"""At most this many k values (a geometric grid over [k_min, k_max]) are tried."""
SCALAR_COLUMNS = ("sample_id", "source", "nll", "ifd", "n_loss_tokens")


class SelectionError(ValueError):
    """The scores cannot be selected from (incomplete, inconsistent or missing inputs)."""


# ----------------------------------------------------------------------------- reading scores


def _is_uri(path: str) -> bool:
    return "://" in path


def _open(path: str, mode: str = "rb"):
    import fsspec

    return fsspec.open(path, mode).open()


def _parquet(path: str) -> pq.ParquetFile:
    """Open a parquet file: natively for local paths, through fsspec for URIs."""
    return pq.ParquetFile(_open(path) if _is_uri(path) else path)


def read_manifest(scores_dir: str) -> dict:
    """Read and check ``_manifest.json``: present, complete and with no lost rows."""
    path = os.path.join(scores_dir, "_manifest.json")
    try:
        with _open(path, "rb") as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise SelectionError(
            f"no scores manifest at {path}: the score stage has not finished (or wrote elsewhere);"
            " run `python -m jobs.score` first or point `scores=` at its output"
        ) from None
    if not manifest.get("complete"):
        raise SelectionError(
            f"{path} says the scoring run is not complete; resume the score stage before selecting"
        )
    missing = [k for k in ("rows_in", "scored", "rejected") if k not in manifest]
    if missing:
        raise SelectionError(f"{path} lacks {missing}; it is not a qgate scores manifest")
    rows_in, scored, rejected = manifest["rows_in"], manifest["scored"], manifest["rejected"]
    if rows_in != scored + rejected:
        raise SelectionError(
            f"rows were lost in scoring: {path} counts rows_in={rows_in} but scored={scored} +"
            f" rejected={rejected} = {scored + rejected}; re-run (resume) the score stage"
        )
    if scored < 1:
        raise SelectionError(
            f"{path}: no rows were scored (rejected={rejected}); nothing to select"
        )
    return manifest


def score_parts(scores_dir: str, manifest: dict) -> list[str]:
    """Sorted ``part-*.parquet`` files; their row count must equal the manifest's ``scored``."""
    try:
        parts = data.expand_paths(os.path.join(scores_dir, "part-*.parquet"))
    except FileNotFoundError:
        raise SelectionError(
            f"no part-*.parquet files in {scores_dir}, but the manifest says"
            f" {manifest['scored']} rows were scored: rows were lost"
        ) from None
    n = 0
    for p in parts:
        with _parquet(p) as pf:
            n += pf.metadata.num_rows
    if n != manifest["scored"]:
        raise SelectionError(
            f"rows were lost: the part files in {scores_dir} hold {n} rows but the manifest says"
            f" scored={manifest['scored']}; re-run (resume) the score stage"
        )
    return parts


COMPARABLE_KEYS = ("scoring", "model_digest", "gates_digest")
"""What two scores directories must share to be ranked together."""


def merge_manifest(manifest: dict, scores_dir: str) -> tuple[dict, list[str]]:
    """Add another scores directory to a selection: (the summed manifest, its part files).
    Raises when its model, gates or scoring settings differ."""
    other = read_manifest(scores_dir)
    bad = [k for k in COMPARABLE_KEYS if other.get(k) != manifest.get(k)]
    if bad:
        raise SelectionError(
            f"{scores_dir} was scored with other {bad} than the first scores directory; their"
            " scores cannot be ranked together"
        )
    merged = dict(manifest)
    for k in ("rows_in", "scored", "rejected"):
        merged[k] = manifest[k] + other[k]
    return merged, score_parts(scores_dir, other)


def iter_score_batches(
    parts: Sequence[str], columns: Sequence[str], batch_rows: int = BATCH_ROWS
) -> Iterator[tuple[int, pa.RecordBatch]]:
    """Yield ``(offset, batch)`` over all part files in order; offset is the file-order row."""
    offset = 0
    for p in parts:
        with _parquet(p) as pf:
            missing = [c for c in columns if c not in pf.schema_arrow.names]
            if missing:
                raise SelectionError(f"{p} lacks column(s) {missing}; not a qgate scores file")
            for batch in pf.iter_batches(batch_size=batch_rows, columns=list(columns)):
                yield offset, batch
                offset += batch.num_rows


def list_matrix(col, name: str = "column") -> np.ndarray:
    """A list (or fixed-size list) column of equal-length float rows as an (n, w) float32 array."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n = len(col)
    if col.null_count:
        raise SelectionError(f"{name} has {col.null_count} null rows")
    if pa.types.is_fixed_size_list(col.type):
        width = col.type.list_size
    else:
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        width = int(lengths[0]) if n else 0
        if n and (lengths != width).any():
            raise SelectionError(f"{name} rows have different lengths ({sorted(set(lengths))[:5]})")
    values = col.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(values, dtype=np.float32).reshape(n, width)


# ----------------------------------------------------------------------------- quality score


@dataclass
class ColumnStats:
    """Per-layer column stats of S over the whole pool: min a, max b, mean mu (float64)."""

    a: np.ndarray
    b: np.ndarray
    mu: np.ndarray
    n: int

    def to_dict(self) -> dict:
        return {"a": self.a.tolist(), "b": self.b.tolist(), "mu": self.mu.tolist(), "n": self.n}

    @classmethod
    def from_dict(cls, d: dict) -> ColumnStats:
        arr = lambda k: np.asarray(d[k], dtype=np.float64)  # noqa: E731
        return cls(arr("a"), arr("b"), arr("mu"), int(d["n"]))


class StatsAccumulator:
    """One streaming pass of column min / max / sum over (n, L) batches of S."""

    def __init__(self):
        self.lo = self.hi = self.total = None
        self.n = 0

    def update(self, S: np.ndarray) -> None:
        S = np.asarray(S)
        if S.ndim != 2 or S.shape[0] == 0:
            if S.ndim == 2:
                return
            raise SelectionError(f"S batch must be (n, L), got shape {S.shape}")
        if not np.isfinite(S).all():
            raise SelectionError("the gate column holds NaN or inf values; the scores are corrupt")
        lo, hi = S.min(axis=0).astype(np.float64), S.max(axis=0).astype(np.float64)
        total = S.sum(axis=0, dtype=np.float64)
        if self.total is None:
            self.lo, self.hi, self.total = lo, hi, total
        else:
            if total.shape != self.total.shape:
                raise SelectionError(
                    f"gate width changed from {self.total.shape[0]} to {S.shape[1]}"
                )
            self.lo, self.hi = np.minimum(self.lo, lo), np.maximum(self.hi, hi)
            self.total = self.total + total
        self.n += S.shape[0]

    def result(self) -> ColumnStats:
        if self.n == 0:
            raise SelectionError("no rows to take column stats over")
        return ColumnStats(self.lo, self.hi, self.total / self.n, self.n)


def column_stats(batches: Iterable[np.ndarray]) -> ColumnStats:
    """Column min, max and mean of S from an iterable of (n, L) batches, in one pass."""
    acc = StatsAccumulator()
    for S in batches:
        acc.update(S)
    return acc.result()


def quality_scores(S, stats: ColumnStats, tau: float = 0.0, eps: float = 1e-8) -> np.ndarray:
    """q for each row of S (n, L), exactly as DESIGN.md defines it; higher is better.

    ``R = (S - a) / (max(b - a, eps) * max(mu, eps))``, or ``(mu + tau)`` as the second factor
    when tau > 0; ``q = mean over layers of R``. Computed in float64 with an explicit sum over
    layers, so a row's q is bit-identical whether it is scored in a batch or alone.
    """
    S = np.asarray(S, dtype=np.float64)
    if S.ndim == 1:
        S = S[None, :]
    L = stats.a.shape[0]
    if S.shape[1] != L:
        raise SelectionError(f"gate vector has {S.shape[1]} layers, the reference has {L}")
    second = stats.mu + tau if tau > 0 else np.maximum(stats.mu, eps)
    R = (S - stats.a) / (np.maximum(stats.b - stats.a, eps) * second)  # (n, L)
    acc = R[:, 0].copy()
    for layer in range(1, L):  # fixed summation order: batch-size independent
        acc += R[:, layer]
    return acc / L


# ----------------------------------------------------------------------------- signals, methods


def signal_values(name: str, cols: dict) -> np.ndarray:
    """One signal as float64 where higher is better; NaN where the sample lacks it.

    gate -> q, perplexity -> -nll, ifd -> -ifd (lower IFD is better), length -> n_loss_tokens.
    """
    if name == "gate":
        return np.asarray(cols["q"], dtype=np.float64)
    if name == "perplexity":
        return -np.asarray(cols["nll"], dtype=np.float64)
    if name == "ifd":
        return -np.asarray(cols["ifd"], dtype=np.float64)
    if name == "length":
        return np.asarray(cols["n_loss_tokens"], dtype=np.float64)
    raise SelectionError(f"unknown signal {name!r}; choose from {SIGNALS}")


def quantile_table(values: np.ndarray, name: str = "signal") -> list[float]:
    """N_QUANTILES evenly spaced quantiles of the finite values (the pool's percentile table)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise SelectionError(f"signal {name!r} has no value for any scored row")
    return np.quantile(v, np.linspace(0.0, 1.0, N_QUANTILES)).tolist()


def percentiles(values, table: Sequence[float]) -> np.ndarray:
    """Percentile in [0, 1] of each value within the pool, from the pool's quantile table.

    Linear interpolation between quantiles; a value equal to a run of tied quantiles gets the
    middle of that run (mid-rank); outside the table it is 0 or 1. NaN stays NaN. The same
    function serves pool selection and new samples, so both get identical percentiles.
    """
    t = np.asarray(table, dtype=np.float64)
    p = np.linspace(0.0, 1.0, t.size)
    x = np.asarray(values, dtype=np.float64)
    out = np.interp(x, t, p)
    lo = np.searchsorted(t, x, side="left")
    hi = np.searchsorted(t, x, side="right")
    tie = hi > lo
    out[tie] = (p[lo[tie]] + p[hi[tie] - 1]) / 2
    out[np.isnan(x)] = np.nan
    return out


def hash_uniform(sample_ids: Iterable[str], seed: int) -> np.ndarray:
    """Seeded uniform [0, 1) per sample_id: the random baseline, independent of row order."""
    out = []
    for sid in sample_ids:
        h = hashlib.blake2b(f"{seed}\x00{sid}".encode(), digest_size=8).digest()
        out.append((int.from_bytes(h, "big") >> 11) * 2.0**-53)
    return np.asarray(out, dtype=np.float64)


def _source_groups(sources) -> Iterator[tuple[str, np.ndarray]]:
    """(source name, row indices) for each distinct source, in name order."""
    src = np.asarray([str(s) for s in sources], dtype=object)
    names, inverse = np.unique(src, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(names.size + 1))
    for code, name in enumerate(names.tolist()):
        yield name, order[bounds[code] : bounds[code + 1]]


def source_quantile_tables(
    cols: dict, signals: Sequence[str], min_rows: int
) -> dict[str, dict[str, list[float]]]:
    """Per-source percentile tables of each signal, for sources with at least ``min_rows``
    rows that have every signal; smaller sources are left to the pool-wide tables."""
    values = {s: signal_values(s, cols) for s in signals}
    ok = np.logical_and.reduce([np.isfinite(v) for v in values.values()])
    tables = {}
    for name, idx in _source_groups(cols["source"]):
        if int(ok[idx].sum()) >= min_rows:
            tables[name] = {s: quantile_table(values[s][idx], s) for s in signals}
    return tables


def signal_percentiles(name: str, cols: dict, reference: dict) -> np.ndarray:
    """Percentile of signal ``name`` for each row: within the row's own source when the
    reference holds that source's table (calibration 'source'), else within the whole pool."""
    values = signal_values(name, cols)
    out = percentiles(values, reference["quantiles"][name])
    by_source = reference.get("quantiles_by_source")
    if by_source:
        for source, idx in _source_groups(cols["source"]):
            tables = by_source.get(source)
            if tables is not None:
                out[idx] = percentiles(values[idx], tables[name])
    return out


def method_scores(cols: dict, reference: dict) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(score, percentiles per signal) for rows in ``cols``, as ``reference`` defines them.

    ``cols`` maps q / nll / ifd (NaN = null) / n_loss_tokens / sample_id / source to arrays.
    The score is NaN for rows that are not candidates. Pool selection and :func:`decide` both
    call this.
    """
    method = reference["method"]
    pct: dict[str, np.ndarray] = {}
    if method == "quality_gate":
        score = signal_values("gate", cols)
    elif method == "perplexity":
        score = signal_values("perplexity", cols)
        band = reference.get("ppl_band")
        if band:
            nll = np.asarray(cols["nll"], dtype=np.float64)
            score = np.where((nll >= band["nll_lo"]) & (nll <= band["nll_hi"]), score, np.nan)
    elif method in ("ifd", "length"):
        score = signal_values(method, cols)
    elif method == "random":
        score = hash_uniform(cols["sample_id"], reference["seed"])
    elif method in COMBINED_METHODS:
        for s in reference["signals"]:
            pct[s] = signal_percentiles(s, cols, reference)
        parts = [pct[s] for s in reference["signals"]]
        score = parts[0].copy()
        for part in parts[1:]:  # NaN (a missing signal) propagates: not a candidate
            score = np.minimum(score, part) if method == "worst_rank" else score + part
        if method == "rank_mean":
            score = score / len(parts)
    else:
        raise SelectionError(f"unknown method {method!r}")
    return score, pct


def method_signals(method: str, signals: Sequence[str]) -> list[str]:
    """The signals a method reads."""
    if method in COMBINED_METHODS:
        return list(signals)
    return {"quality_gate": ["gate"], "perplexity": ["perplexity"], "ifd": ["ifd"]}.get(
        method, ["length"] if method == "length" else []
    )


# ----------------------------------------------------------------------------- diversity


def normalize_rows(X, eps: float = 1e-12) -> np.ndarray:
    """L2-normalise each row (float64): k-means on these is k-means with cosine distance."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[None, :]
    norms = np.sqrt(np.einsum("ij,ij->i", X, X))
    return X / np.maximum(norms, eps)[:, None]


def assign_clusters(X_normed: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Nearest centroid (Euclidean on normalised features) per row; ties go to the lower id."""
    C = np.asarray(centroids, dtype=np.float64)
    d = (C * C).sum(axis=1)[None, :] - 2.0 * (X_normed @ C.T)  # (n, k), ||x||^2 dropped
    return d.argmin(axis=1).astype(np.int32)


def _kmeans(k: int, n: int, seed: int):
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if n > MINIBATCH_ABOVE:
        return MiniBatchKMeans(
            n_clusters=k, batch_size=4096, n_init=3, max_iter=100, random_state=seed
        )
    return KMeans(n_clusters=k, n_init=3, random_state=seed)


def choose_k(X: np.ndarray, k_min: int, k_max: int, seed: int) -> tuple[int, dict[int, float]]:
    """k with the best silhouette over a geometric grid in [k_min, k_max] (ties: smaller k)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    if X.shape[0] > SILHOUETTE_ROWS:
        rng = np.random.default_rng(seed)
        X = X[np.sort(rng.choice(X.shape[0], SILHOUETTE_ROWS, replace=False))]
    k_hi = min(k_max, X.shape[0] - 1)
    if k_hi < k_min:
        raise SelectionError(
            f"cannot choose k by silhouette on {X.shape[0]} rows with k_min={k_min}; set k"
        )
    grid = np.unique(np.round(np.geomspace(k_min, k_hi, min(SILHOUETTE_KS, k_hi - k_min + 1))))
    scores: dict[int, float] = {}
    for k in (int(v) for v in grid):
        labels = KMeans(n_clusters=k, n_init=2, random_state=seed).fit_predict(X)
        if len(set(labels)) < 2:
            scores[k] = -1.0
            continue
        n_eval = min(SILHOUETTE_EVAL_ROWS, X.shape[0])  # pairwise cost: n_eval^2 x F
        scores[k] = float(silhouette_score(X, labels, sample_size=n_eval, random_state=seed))
    best = max(scores, key=lambda k: (scores[k], -k))
    return best, scores


def fit_centroids(X: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means centroids on normalised rows X, relabelled in lexicographic centroid order."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Number of distinct clusters")
        C = _kmeans(k, X.shape[0], seed).fit(X).cluster_centers_.astype(np.float64)
    return C[np.lexsort(C.T[::-1])]  # first column is the primary key: stable ids


# ----------------------------------------------------------------------------- round-robin


def _round_robin(
    score: np.ndarray,
    cluster: np.ndarray,
    budget: int,
    source_codes: np.ndarray | None = None,
    caps: dict[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Rows are pre-sorted by sample_id, so the row index breaks ties.

    Returns (selected row indices in selection order, within-cluster rank with -1 for rows
    that are not candidates). Taking the next best of each cluster in ascending id, skipping
    exhausted ones, is the order (within-cluster rank, cluster id).
    """
    n = score.shape[0]
    cand = np.flatnonzero(np.isfinite(score))
    o = cand[np.lexsort((cand, -score[cand], cluster[cand]))]  # by cluster, score desc, id
    c = cluster[o]
    starts = np.r_[0, np.flatnonzero(np.diff(c)) + 1]
    sizes = np.diff(np.r_[starts, o.size])
    rank_o = np.arange(o.size) - np.repeat(starts, sizes)
    rank = np.full(n, -1, dtype=np.int64)
    rank[o] = rank_o
    rr = o[np.lexsort((c, rank_o))]  # round-robin: rank 0 of every cluster, then rank 1, ...
    if caps:
        # Greedy skipping of full sources == dropping each source's rows past its cap.
        keep = np.ones(rr.size, dtype=bool)
        src = source_codes[rr]
        for code, cap in caps.items():
            m = src == code
            keep &= ~(m & (np.cumsum(m) > cap))
        rr = rr[keep]
    return rr[:budget], rank


def round_robin(
    scores: Sequence[float],
    clusters: Sequence[int],
    sample_ids: Sequence[str],
    budget: int,
    sources: Sequence[str] | None = None,
    quotas: dict[str, float] | None = None,
) -> list[str]:
    """Selected sample_ids in selection order (the public, list-based form of the rule).

    Each cluster is sorted by score descending (ties: sample_id ascending); the next best of
    each cluster is taken in ascending cluster id until ``budget`` rows are taken; exhausted
    clusters are skipped. A row whose source has reached its quota (share of the budget) is
    skipped. NaN scores are never taken.
    """
    ids = np.asarray(sample_ids, dtype=object)
    order = np.argsort(ids.astype(str), kind="stable")
    score = np.asarray(scores, dtype=np.float64)[order]
    cluster = np.asarray(clusters, dtype=np.int64)[order]
    codes, caps = None, None
    if quotas:
        src = np.asarray(sources, dtype=object)[order]
        names = sorted(set(src.tolist()))
        codes = np.asarray([names.index(s) for s in src])
        caps = {names.index(s): quota_cap(q, budget) for s, q in quotas.items() if s in names}
    sel, _ = _round_robin(score, cluster, budget, codes, caps)
    return ids[order][sel].tolist()


def quota_cap(share: float, budget: int) -> int:
    """Max rows of one source: floor(share x budget) (small slack for float error)."""
    return int(math.floor(share * budget + 1e-9))


def budget_rows(cfg: SelectConfig, n_scored: int) -> int:
    """budget_count, else budget_ratio x scored rows rounded half up; at least 1."""
    if cfg.budget_count is not None:
        return cfg.budget_count
    return max(1, int(math.floor(cfg.budget_ratio * n_scored + 0.5)))


# ----------------------------------------------------------------------------- the pipeline


@dataclass
class Selection:
    """The result of :func:`compute_selection` (nothing written yet)."""

    table: pa.Table
    """Every scored sample, sorted by sample_id (the selection.parquet rows)."""
    order: np.ndarray
    """Row indices into ``table`` of the selected samples, in selection order."""
    reference: dict
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


def _score_and_assign(parts, pool: _Pool, ref: dict, features: str | None):
    """Pass 3: q for every row, and its cluster when centroids are given (sorted order)."""
    n = pool.order.size
    q = np.empty(n, dtype=np.float64)
    cluster = np.zeros(n, dtype=np.int32)
    stats = ColumnStats.from_dict(ref["stats"])
    columns = ("gate",) if features in (None, "gate") else ("gate", features)
    C = np.asarray(ref["centroids"], dtype=np.float64) if features else None
    for start, batch in iter_score_batches(parts, columns):
        pos = pool.inv[start : start + batch.num_rows]
        S = list_matrix(batch.column("gate"), "gate")
        q[pos] = quality_scores(S, stats, ref["tau"], ref["eps"])
        if features:
            X = S if features == "gate" else list_matrix(batch.column(features), features)
            cluster[pos] = assign_clusters(normalize_rows(X), C)
    return q, cluster


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

    ref: dict = {
        "version": REFERENCE_VERSION,
        "method": method,
        "signals": signals if method in COMBINED_METHODS else [],
        "stats": pool.stats.to_dict(),
        "tau": cfg.tau,
        "eps": cfg.eps,
        "seed": cfg.seed,
        "quantiles": {},
        "calibration": cfg.calibration if method in COMBINED_METHODS else None,
        "quantiles_by_source": None,
        "ppl_band": None,
        "diversity": diversity,
        "features": cfg.features if diversity else None,
        "k": None,
        "silhouette": None,
        "centroids": None,
    }

    # Diversity: fit k-means on a seeded sample (positions in sample_id order), assign all.
    if diversity:
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
            ref["silhouette"] = {str(kk): v for kk, v in sorted(sil.items())}
        ref["k"] = k
        ref["centroids"] = fit_centroids(X, k, cfg.seed).tolist()
        del X
    lap("fit")
    q, cluster = _score_and_assign(parts, pool, ref, cfg.features if diversity else None)
    lap("score_assign")
    cols = dict(pool.cols, q=q)

    # Pool tables (quantiles, band) go into the reference first; the pool is then scored
    # through the reference exactly as a new sample will be.
    if method in COMBINED_METHODS:
        ref["quantiles"] = {s: quantile_table(signal_values(s, cols), s) for s in signals}
        if cfg.calibration == "source":
            ref["quantiles_by_source"] = source_quantile_tables(
                cols, signals, cfg.calibration_min_rows
            )
            small = sorted(set(cols["source"].astype(str)) - set(ref["quantiles_by_source"]))
            if small:
                log.info(
                    "sources with fewer than %d rows use pool-wide percentiles: %s",
                    cfg.calibration_min_rows,
                    small[:10],
                )
    if method == "perplexity" and cfg.ppl_band is not None:
        lo, hi = cfg.ppl_band
        finite = cols["nll"][np.isfinite(cols["nll"])]
        ref["ppl_band"] = {
            "lo_quantile": lo,
            "hi_quantile": hi,
            "nll_lo": float(np.quantile(finite, lo)),
            "nll_hi": float(np.quantile(finite, hi)),
        }
    score, pct = method_scores(cols, ref)
    if cfg.dedup:  # copies a dedup run removed are not candidates
        kept = pq.read_table(os.path.join(cfg.dedup, "kept.parquet"), columns=["sample_id"])
        keep = np.isin(cols["sample_id"], np.asarray(kept.column(0).to_pylist(), dtype=object))
        score = np.where(keep, score, np.nan)
        ref["dedup"] = {"dir": os.path.abspath(cfg.dedup), "excluded": int((~keep).sum())}
    n_cand = int(np.isfinite(score).sum())
    if n_cand == 0:
        raise SelectionError(f"method {method}: no scored row has a score; nothing to select")
    if n_cand < n:
        log.info("%d of %d rows are not candidates for method %s", n - n_cand, n, method)

    budget = budget_rows(cfg, n)
    if budget > n_cand:
        warn(f"budget {budget} exceeds the {n_cand} candidate rows; taking all of them")
    codes, caps = None, None
    if cfg.source_quotas:
        names, codes = np.unique(cols["source"].astype(str), return_inverse=True)
        names = names.tolist()
        caps = {
            names.index(s): quota_cap(share, budget)
            for s, share in sorted(cfg.source_quotas.items())
            if s in names
        }
        unknown = sorted(set(cfg.source_quotas) - set(names))
        if unknown:
            warn(f"source_quotas name sources with no scored rows: {unknown}")
    sel, rank = _round_robin(score, cluster, budget, codes, caps)
    if sel.size < min(budget, n_cand):
        warn(f"source quotas left the selection at {sel.size} rows, below the budget {budget}")

    selected = np.zeros(n, dtype=bool)
    selected[sel] = True
    position = np.full(n, -1, dtype=np.int64)
    position[sel] = np.arange(sel.size)
    k = ref["k"] or 1
    avail = np.bincount(cluster[np.isfinite(score)], minlength=k)
    taken = np.bincount(cluster[sel], minlength=k)
    if diversity:
        cut = np.full(k, np.inf)
        np.minimum.at(cut, cluster[sel], score[sel])
        per_cluster = [float(c) if np.isfinite(c) else None for c in cut]
    else:
        per_cluster = None
    src_names, src_sel = np.unique(cols["source"][sel].astype(str), return_counts=True)
    ref["cutoffs"] = {
        "per_cluster": per_cluster,
        "global": float(score[sel].min()) if sel.size else None,
    }
    ref["budget"] = budget
    ref["counts"] = {
        "rows_in": manifest["rows_in"],
        "scored": n,
        "rejected": manifest["rejected"],
        "candidates": n_cand,
        "selected": int(sel.size),
        "per_cluster_available": avail.tolist() if diversity else None,
        "per_cluster_selected": taken.tolist() if diversity else None,
        "per_source_selected": dict(zip(src_names.tolist(), src_sel.tolist(), strict=True)),
    }
    ref["scoring"] = manifest.get("scoring")
    ref["model_digest"] = manifest.get("model_digest")
    ref["gates_digest"] = manifest.get("gates_digest")
    ref["config"] = to_dict(cfg)

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
        "selected": pa.array(selected),
        "order": nullable(position, position >= 0, pa.int32()),
        "nll": pa.array(cols["nll"], type=pa.float32()),
        "ifd": nullable(np.nan_to_num(cols["ifd"]), np.isfinite(cols["ifd"]), pa.float32()),
        "n_loss_tokens": pa.array(cols["n_loss_tokens"], type=pa.int32()),
    }
    for s, v in pct.items():
        columns[f"pct_{s}"] = nullable(np.nan_to_num(v), np.isfinite(v), pa.float64())
    table = pa.table(columns)
    lap("rank")
    return Selection(table, sel, ref, manifest, notes, timings)


# ----------------------------------------------------------------------------- new samples


def _sample_columns(samples: Sequence[dict], reference: dict) -> dict:
    """Per-sample stats dicts -> the column arrays the pool was scored from (same dtypes)."""
    method = reference["method"]
    needs = set()
    for s in method_signals(method, reference.get("signals") or []):
        needs.add({"gate": "gate", "perplexity": "nll", "ifd": "ifd", "length": "n_loss_tokens"}[s])
    if method == "random":
        needs.add("sample_id")
    if reference.get("diversity"):
        needs.add(reference["features"])
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
    has_gate = all(s.get("gate") is not None for s in samples)
    stats = ColumnStats.from_dict(reference["stats"])
    if has_gate:
        S = np.asarray([s["gate"] for s in samples], dtype=np.float32)
        cols["gate"] = S
        cols["q"] = quality_scores(S, stats, reference["tau"], reference["eps"])
    else:
        cols["q"] = np.full(len(samples), np.nan)
    return cols


def decide(reference: dict, samples: Sequence[dict]) -> list[dict]:
    """Score new samples and decide, as the pool selection did, whether each would be selected.

    ``samples`` are per-sample stats dicts with keys nll, gate (list of L floats), embedding
    (list of D floats), ifd (or None), n_loss_tokens (and sample_id for method random); only
    the keys the reference's method and features need are required. With a reference whose
    calibration is 'source', a sample's optional ``source`` picks the percentile tables of
    that source; a sample without one, or from a source the pool had too few rows of, is
    ranked against the whole pool (as the pool's own rows of such sources were). Returns, per sample,
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
    if reference.get("diversity"):
        feats = reference["features"]
        X = cols["gate"] if feats == "gate" else np.asarray([s[feats] for s in samples], np.float32)
        cluster = assign_clusters(normalize_rows(X), np.asarray(reference["centroids"]))
    cut = reference["cutoffs"]
    out = []
    for i in range(n):
        if reference.get("diversity"):
            cutoff = cut["per_cluster"][int(cluster[i])]
        else:
            cutoff = cut["global"]
        s = float(score[i]) if np.isfinite(score[i]) else None
        ok = s is not None and cutoff is not None and s >= cutoff
        out.append(
            {
                "q": float(cols["q"][i]) if np.isfinite(cols["q"][i]) else None,
                "score": s,
                "cluster": int(cluster[i]) if reference.get("diversity") else None,
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


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


def write_reference(path: str, reference: dict) -> None:
    with open(path, "wb") as f:
        f.write(_json_bytes(reference))


def load_reference(path: str) -> dict:
    """Read a reference.json written by the selection stage."""
    with _open(path, "rb") as f:
        ref = json.loads(f.read().decode("utf-8"))
    if ref.get("version") != REFERENCE_VERSION:
        raise SelectionError(f"{path}: reference version {ref.get('version')} is not supported")
    return ref


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
    rows = join_corpus(corpus, ids)

    local = tempfile.mkdtemp(prefix="qgate-select-") if _is_uri(out_dir) else out_dir
    os.makedirs(local, exist_ok=True)
    data.write_jsonl(os.path.join(local, "selected.jsonl"), rows)
    pq.write_table(table, os.path.join(local, "selection.parquet"))
    write_reference(os.path.join(local, "reference.json"), ref)

    labels = report_mod.read_labels(corpus, cfg.label_column)
    metrics = report_mod.label_metrics(table, labels) if labels else None
    report_path = None
    if cfg.report:
        examples = report_mod.example_ids(table, ref)
        shown = join_corpus(corpus, report_mod.all_example_ids(examples))
        scores_dir = cfg.scores or stage_dir(cfg.run_dir, "scores")
        report_path = report_mod.write_report(
            local,
            table,
            ref,
            labels=labels,
            rows_by_id={r["sample_id"]: r for r in shown},
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

    cut = ref["cutoffs"]
    per = [c for c in (cut["per_cluster"] or []) if c is not None]
    return {
        "output": out_dir,
        "method": cfg.method,
        "signals": ref["signals"],
        "rows": ref["counts"]["scored"],
        "candidates": ref["counts"]["candidates"],
        "budget": ref["budget"],
        "selected": ref["counts"]["selected"],
        "diversity": ref["diversity"],
        "k": ref["k"],
        "cutoff_global": cut["global"],
        "cutoff_per_cluster_range": [min(per), max(per)] if per else None,
        "per_source_selected": ref["counts"]["per_source_selected"],
        "label_metrics": metrics,
        "report": os.path.join(out_dir, "report.html") if report_path else None,
        "warnings": result.warnings,
    }
