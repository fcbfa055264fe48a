"""Ray custom metrics (``ray.util.metrics``) of the scoring actors and the Serve replicas.

Ray exports them in Prometheus format on every node's metrics port (``ray_`` prefixed,
counters with ``_total``), which the dashboard's Metrics view charts once Prometheus and
Grafana are set up (README, "Dashboard metrics"). Created inside the actor or replica that
records them; every call is cheap (a local aggregate, exported every few seconds).
"""

from __future__ import annotations

BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]


class ScoringMetrics:
    """What a scoring actor (qgate.batch_scoring.ShardScorer) did: rows, rejects by reason,
    tokens, and the tokens/s of its last shard."""

    def __init__(self):
        from ray.util.metrics import Counter, Gauge

        self.rows = Counter("qgate_score_rows", "Rows scored by the score stage.")
        self.rejected = Counter(
            "qgate_score_rejected",
            "Rows the score stage rejected, by reason.",
            tag_keys=("reason",),
        )
        self.tokens = Counter("qgate_score_tokens", "Tokens scored by the score stage.")
        self.rate = Gauge("qgate_score_tokens_per_s", "Tokens/s of a scoring actor's last shard.")

    def shard(self, info: dict) -> None:
        """Record one written shard's summary (qgate.batch_scoring.write_shard)."""
        if info["scored"]:
            self.rows.inc(info["scored"])
        for reason, n in info["rejects_by_reason"].items():
            self.rejected.inc(n, tags={"reason": reason})
        if info["tokens"]:
            self.tokens.inc(info["tokens"])
        if info.get("seconds"):
            self.rate.set(info["tokens"] / max(info["seconds"], 1e-9))


class ServeMetrics:
    """What a Serve model replica did: samples scored, per-row errors, dynamic batch sizes."""

    def __init__(self):
        from ray.util.metrics import Counter, Histogram

        self.samples = Counter("qgate_serve_samples", "Samples the endpoint scored.")
        self.errors = Counter(
            "qgate_serve_row_errors",
            "Samples the endpoint could not score, by reason.",
            tag_keys=("reason",),
        )
        self.batch = Histogram(
            "qgate_serve_batch_size", "Samples per dynamic batch.", boundaries=BATCH_BOUNDARIES
        )
        self.committed = Counter("qgate_serve_committed", "Samples appended to the selection log.")

    def batch_done(self, n: int) -> None:
        """One dynamic batch of ``n`` samples was scored."""
        self.samples.inc(n)
        self.batch.observe(n)

    def row_error(self, reason: str) -> None:
        """One sample could not be scored."""
        self.errors.inc(1, tags={"reason": reason})
