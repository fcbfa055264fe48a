"""Diversity clusters: k-means on normalised features, k chosen by silhouette."""

from __future__ import annotations

import warnings

import numpy as np

from qgate.scores import SelectionError

MINIBATCH_ABOVE = 20000
"""Fit samples larger than this use MiniBatchKMeans instead of KMeans."""
SILHOUETTE_ROWS = 5000
"""Rows of the fit sample used to choose k by silhouette."""
SILHOUETTE_EVAL_ROWS = 2000
"""Rows the silhouette itself is evaluated on (k-means is fitted on SILHOUETTE_ROWS)."""
SILHOUETTE_KS = 6
"""At most this many k values (a geometric grid over [k_min, k_max]) are tried."""


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
