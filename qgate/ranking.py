"""Ranking: per-sample signals -> one score per selection method (higher is better).

The gate score ``q`` from the gate matrix and its pool column stats; percentile tables of
perplexity, IFD, length and the gate (pool-wide or per source); and the methods that join
them (worst_rank, rank_mean) or use one alone. A new sample goes through the same functions
with the tables stored in reference.json.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from qgate.config import calibration_of
from qgate.scores import SelectionError

if TYPE_CHECKING:
    from qgate.reference import Reference

SIGNALS = ("gate", "perplexity", "ifd", "length")
COMBINED_METHODS = ("worst_rank", "rank_mean")
N_QUANTILES = 1001
"""Quantiles stored per signal: percentiles of new samples are interpolated in this table."""


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


def gate_quality(S, reference: Reference) -> np.ndarray:
    """q of each row of S under a reference: the gate head's value when the selection fitted
    one (``gate_score: head``, qgate/gate_head.py), else DESIGN.md's q (:func:`quality_scores`)."""
    if reference.gate_head is not None:
        from qgate.gate_head import GateHead

        return GateHead.from_dict(reference.gate_head).score(S)
    stats = ColumnStats.from_dict(reference.stats)
    return quality_scores(S, stats, reference.tau, reference.eps)


# ----------------------------------------------------------------------------- signals, methods


SIGNAL_COLUMNS = {
    "gate": ("q", 1.0),
    "perplexity": ("nll", -1.0),
    "ifd": ("ifd", -1.0),  # lower IFD is better
    "length": ("n_loss_tokens", 1.0),
}
"""Each signal: the column it reads and its sign, so that higher is always better."""
SINGLE_SIGNAL_METHODS = {
    "quality_gate": "gate",
    "perplexity": "perplexity",
    "ifd": "ifd",
    "length": "length",
}
"""The methods that rank by one signal."""


def signal_values(name: str, cols: dict) -> np.ndarray:
    """One signal as float64 where higher is better (SIGNAL_COLUMNS); NaN where the sample
    lacks it."""
    if name not in SIGNAL_COLUMNS:
        raise SelectionError(f"unknown signal {name!r}; choose from {SIGNALS}")
    column, sign = SIGNAL_COLUMNS[name]
    return sign * np.asarray(cols[column], dtype=np.float64)


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


CLUSTER_MIN_ROWS = 16
"""calibration=cluster: prompt clusters with fewer rows are ranked against the whole pool."""


def _source_groups(sources) -> Iterator[tuple[str, np.ndarray]]:
    """(group name, row indices) for each distinct source (or cluster id), in name order."""
    src = np.asarray([str(s) for s in sources], dtype=object)
    names, inverse = np.unique(src, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(names.size + 1))
    for code, name in enumerate(names.tolist()):
        yield name, order[bounds[code] : bounds[code + 1]]


def source_quantile_tables(
    cols: dict, signals: Sequence[str], min_rows: int, group: str = "source"
) -> dict[str, dict[str, list[float]]]:
    """Per-group percentile tables of each signal, for groups (sources, or the prompt
    clusters of column ``calibration_cluster``) with at least ``min_rows`` rows that have
    every signal; smaller groups are left to the pool-wide tables."""
    values = {s: signal_values(s, cols) for s in signals}
    ok = np.logical_and.reduce([np.isfinite(v) for v in values.values()])
    tables = {}
    for name, idx in _source_groups(cols[group]):
        if int(ok[idx].sum()) >= min_rows:
            tables[name] = {s: quantile_table(values[s][idx], s) for s in signals}
    return tables


def signal_percentiles(name: str, cols: dict, reference: Reference) -> np.ndarray:
    """Percentile of signal ``name`` for each row: within the row's own source when the
    reference holds that source's table (the signal's calibration 'source'), or within the
    row's prompt cluster ('cluster'), else within the whole pool; with calibration 'both',
    the lower of the source's and the pool's."""
    values = signal_values(name, cols)
    pool = percentiles(values, reference.quantiles[name])
    mode = calibration_of(reference.calibration, name)
    if mode == "cluster":
        groups, by_group = cols["calibration_cluster"], reference.quantiles_by_cluster
    else:
        groups, by_group = cols["source"], reference.quantiles_by_source
    if mode == "pool" or not by_group:
        return pool
    out = pool.copy()
    for source, idx in _source_groups(groups):
        tables = by_group.get(source)
        if tables is not None:
            out[idx] = percentiles(values[idx], tables[name])
    return np.fmin(out, pool) if mode == "both" else out


def method_scores(cols: dict, reference: Reference) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(score, percentiles per signal) for rows in ``cols``, as ``reference`` defines them.

    ``cols`` maps q / nll / ifd (NaN = null) / n_loss_tokens / sample_id / source to arrays.
    The score is NaN for rows that are not candidates. Pool selection and :func:`decide` both
    call this.
    """
    method = reference.method
    pct: dict[str, np.ndarray] = {}
    if method in SINGLE_SIGNAL_METHODS:
        score = signal_values(SINGLE_SIGNAL_METHODS[method], cols)
        band = reference.ppl_band if method == "perplexity" else None
        if band:
            nll = np.asarray(cols["nll"], dtype=np.float64)
            score = np.where((nll >= band["nll_lo"]) & (nll <= band["nll_hi"]), score, np.nan)
    elif method == "random":
        score = hash_uniform(cols["sample_id"], reference.seed)
    elif method in COMBINED_METHODS:
        for s in reference.signals:
            pct[s] = signal_percentiles(s, cols, reference)
        parts = np.stack([pct[s] for s in reference.signals])
        # NaN (a missing signal) propagates: not a candidate
        score = parts.min(axis=0) if method == "worst_rank" else parts.mean(axis=0)
    else:
        raise SelectionError(f"unknown method {method!r}")
    return score, pct


def method_signals(method: str, signals: Sequence[str]) -> list[str]:
    """The signals a method reads."""
    if method in COMBINED_METHODS:
        return list(signals)
    return [SINGLE_SIGNAL_METHODS[method]] if method in SINGLE_SIGNAL_METHODS else []
