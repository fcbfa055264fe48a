"""The gate head: a calibrated linear read-out of the per-layer gate scores.

DESIGN.md's q averages the layers' normalised gate scores with equal weight. Layers differ
in what they see, though, and a layer whose gate happens to open on bad rows pulls q the
wrong way. The gate head learns the weights instead: a logistic regression over the gate
vector S (one score per layer), fitted to tell real pool rows from corrupted copies of the
same rows (qgate/corruption.py; the warmup writes them, the score stage scores them). Its
decision value replaces q when a selection asks for ``gate_score: head``.

The copies are made with another seed than the warmup's negatives, and what the head learns
is measured on noise kinds that no corruption constructs (bench/quality.py reports them
apart). The fit is deterministic, and ``score`` sums over layers in a fixed order, so a
row's value is the same in a batch of the pool as alone in Serve.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qgate.scores import SelectionError

MIN_PAIRS = 10
"""Fewer real/corrupted pairs than this cannot fit a head (the fit is refused)."""
NEGATIVES_FILE = "head_negatives.jsonl"
"""In the warmup directory: the corrupted copies the gate head is fitted on."""
NEGATIVES_DIR = "head_negatives"
"""In the scores directory: the score stage's scores of those copies."""


@dataclass
class GateHead:
    """``score(S) = sum_l coef_l * (S_l - mean_l) / scale_l + intercept``; higher is better."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    n_real: int
    n_negative: int
    auroc: float
    """Real vs corrupted on the rows it was fitted on (how separable the copies are)."""

    def score(self, S) -> np.ndarray:
        """The head's value for each row of S (n, L), float64, batch-size independent."""
        S = np.asarray(S, dtype=np.float64)
        if S.ndim == 1:
            S = S[None, :]
        if S.shape[1] != self.coef.shape[0]:
            raise SelectionError(
                f"gate vector has {S.shape[1]} layers, the gate head has {self.coef.shape[0]}"
            )
        Z = (S - self.mean) / self.scale
        acc = np.full(S.shape[0], self.intercept, dtype=np.float64)
        for layer in range(S.shape[1]):  # fixed summation order
            acc += self.coef[layer] * Z[:, layer]
        return acc

    def to_dict(self) -> dict:
        """Plain dict for reference.json."""
        return {
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "coef": self.coef.tolist(),
            "intercept": self.intercept,
            "n_real": self.n_real,
            "n_negative": self.n_negative,
            "auroc": self.auroc,
        }

    @classmethod
    def from_dict(cls, d: dict) -> GateHead:
        """The head stored by ``to_dict``."""
        arr = lambda k: np.asarray(d[k], dtype=np.float64)  # noqa: E731
        return cls(
            arr("mean"),
            arr("scale"),
            arr("coef"),
            float(d["intercept"]),
            int(d["n_real"]),
            int(d["n_negative"]),
            float(d["auroc"]),
        )


def describe_gate_score(head: dict | None) -> str:
    """How a selection made q, for the report and the select job's summary: DESIGN.md's
    formula, or the gate head with how well it told real rows from their corrupted copies
    (a head near 0.5 learned nothing from its negatives)."""
    if head is None:
        return "formula (equal layer weights)"
    return (
        f"gate head, fitted on {head['n_real']} real rows and {head['n_negative']} corrupted"
        f" copies; real vs corrupted AUROC {head['auroc']:.3f}"
    )


def fit_gate_head(real: np.ndarray, negative: np.ndarray, c: float = 1.0) -> GateHead:
    """Fit the head on gate vectors of real rows (label 1) and corrupted copies (label 0).

    Standardised features, L2-regularised logistic regression (``c`` is the inverse
    strength; 0.1-10 gave the same ranking on the bench corpora), balanced classes.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    real, negative = np.asarray(real, np.float64), np.asarray(negative, np.float64)
    if min(len(real), len(negative)) < MIN_PAIRS:
        raise SelectionError(
            f"the gate head needs >= {MIN_PAIRS} real and corrupted rows, got {len(real)} real"
            f" and {len(negative)} corrupted; warm up with more head_negatives"
        )
    X = np.vstack([real, negative])
    if not np.isfinite(X).all():
        raise SelectionError("gate vectors hold NaN or inf values; the scores are corrupt")
    y = np.r_[np.ones(len(real)), np.zeros(len(negative))]
    mean, scale = X.mean(axis=0), X.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    model = LogisticRegression(C=c, max_iter=5000, class_weight="balanced")
    model.fit((X - mean) / scale, y)
    head = GateHead(
        mean, scale, model.coef_[0].astype(np.float64), float(model.intercept_[0]), 0, 0, 0.0
    )
    head.n_real, head.n_negative = len(real), len(negative)
    head.auroc = float(roc_auc_score(y, head.score(X)))
    return head


def head_from_scores(scores_dir: str, parts: list[str]) -> GateHead:
    """Fit the head from a scores directory: its OUT/head_negatives scores (the corrupted
    copies) against the pool rows in ``parts`` they were made from (``<sample_id>~<kind>``)."""
    import os

    from qgate.scores import iter_score_batches, list_matrix, read_manifest, score_parts

    neg_dir = os.path.join(scores_dir, NEGATIVES_DIR)
    if not os.path.isdir(neg_dir):
        raise SelectionError(
            f"gate_score: head needs the gate head's negatives scored in {neg_dir}: warm up with"
            " head_negatives > 0 (jobs/configs/warmup.yaml), then score with those gates"
        )
    neg_parts = score_parts(neg_dir, read_manifest(neg_dir))
    negative, origin = [], []
    for _, batch in iter_score_batches(neg_parts, ("sample_id", "gate")):
        negative.append(list_matrix(batch.column("gate"), "gate"))
        origin += [s.rsplit("~", 1)[0] for s in batch.column("sample_id").to_pylist()]
    wanted = set(origin)
    real = []
    for _, batch in iter_score_batches(parts, ("sample_id", "gate")):
        ids = batch.column("sample_id").to_pylist()
        take = [i for i, s in enumerate(ids) if s in wanted]
        if take:
            real.append(list_matrix(batch.column("gate"), "gate")[take])
    width = lambda ms: ms[0].shape[1] if ms else 0  # noqa: E731
    return fit_gate_head(
        np.vstack(real) if real else np.zeros((0, width(negative))),
        np.vstack(negative) if negative else np.zeros((0, width(real))),
    )
