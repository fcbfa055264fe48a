"""Filling a budget: round-robin over clusters, best score first, under source quotas.

The rule every selection uses (the pool's and, through the cutoffs, Serve's): each cluster
is sorted by score descending, ties broken by sample_id; the next best of each cluster is
taken in ascending cluster id until the budget is full; a source at its quota is skipped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from qgate.config import SelectConfig


def round_robin_rows(
    score: np.ndarray,
    cluster: np.ndarray,
    budget: int,
    source_codes: np.ndarray | None = None,
    caps: dict[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The rule on row arrays pre-sorted by sample_id (so the row index breaks ties).

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
    sel, _ = round_robin_rows(score, cluster, budget, codes, caps)
    return ids[order][sel].tolist()


def quota_cap(share: float, budget: int) -> int:
    """Max rows of one source: floor(share x budget) (small slack for float error)."""
    return int(math.floor(share * budget + 1e-9))


def budget_rows(cfg: SelectConfig, n_scored: int) -> int:
    """budget_count, else budget_ratio x scored rows rounded half up; at least 1."""
    if cfg.budget_count is not None:
        return cfg.budget_count
    return max(1, int(math.floor(cfg.budget_ratio * n_scored + 0.5)))
