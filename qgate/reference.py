"""The selection reference (reference.json): what a selection fitted on its pool.

The select stage writes it; Serve, `qgate extend` and the report read it. It holds the
method and its settings, the pool's q statistics, percentile tables and clusters, and the
outcome (cutoffs, budget, counts), so that a new sample is scored and decided exactly as
the pool's rows were. The scoring settings and digests say which model and gates it fits.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from qgate.scores import SelectionError

REFERENCE_VERSION = 1


class ReferenceError(SelectionError):
    """A reference.json that cannot be read: wrong version or unknown fields."""


@dataclass
class Reference:
    """A selection's fitted state; ``to_dict``/``from_dict`` are reference.json's schema."""

    method: str
    signals: list[str]
    """The combined methods' signals (empty for single-signal methods)."""
    stats: dict
    """The pool's gate statistics q is computed from (qgate.scores.ColumnStats)."""
    tau: float
    eps: float
    seed: int
    quantiles: dict = field(default_factory=dict)
    """Per signal, the pool's percentile table."""
    calibration: str | dict | None = None
    """SelectConfig.calibration: one for every signal, or per signal."""
    quantiles_by_source: dict | None = None
    """With calibration 'source' or 'both' (for any signal): per source, per signal, its own
    percentile table."""
    calibration_centroids: list | None = None
    """With calibration 'cluster': the k-means centroids of the prompt embeddings (a row's
    calibration cluster is its nearest centroid)."""
    quantiles_by_cluster: dict | None = None
    """With calibration 'cluster': per prompt cluster id (a string), per signal, its table."""
    ppl_band: dict | None = None
    diversity: bool = False
    features: str | None = None
    k: int | None = None
    silhouette: dict | None = None
    centroids: list | None = None
    cutoffs: dict | None = None
    """The lowest selected score, global and per cluster: what `decide` compares with."""
    budget: int | None = None
    counts: dict | None = None
    scoring: dict | None = None
    """The scoring settings of the scores it was fitted on (qgate.scorer.ScoringSettings)."""
    model_digest: str | None = None
    gates_digest: str | None = None
    config: dict | None = None
    dedup: dict | None = None
    gate_head: dict | None = None
    """With ``gate_score: head``: the fitted gate head q is computed from (qgate.gate_head)."""
    version: int = REFERENCE_VERSION

    def to_dict(self) -> dict:
        """Plain dict for reference.json (``dedup``, ``gate_head`` and the calibration
        clusters only when used)."""
        d = dataclasses.asdict(self)
        for key in ("dedup", "gate_head", "calibration_centroids", "quantiles_by_cluster"):
            if d[key] is None:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "reference") -> Reference:
        """A reference from its dict; refuses other versions and unknown fields."""
        if d.get("version") != REFERENCE_VERSION:
            raise ReferenceError(f"{source}: reference version {d.get('version')} is not supported")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ReferenceError(f"{source}: unknown reference fields {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        """reference.json's text: sorted keys, no NaN."""
        return json.dumps(self.to_dict(), indent=1, sort_keys=True, allow_nan=False) + "\n"

    def save(self, path: str) -> None:
        """Write reference.json, atomically."""
        from qgate.atomic import write_text

        write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str) -> Reference:
        """Read a reference.json (local or fsspec URL) written by the selection stage."""
        import fsspec

        with fsspec.open(path, "rb") as f:
            return cls.from_dict(json.loads(f.read().decode("utf-8")), path)
