"""Dashboard metrics: the scoring actors' ray.util.metrics, read back from the node's
Prometheus endpoint (what the dashboard's Metrics view and Grafana chart)."""

from __future__ import annotations


def test_scoring_actors_export_rows_rejects_and_tokens(
    tiny_model, corpus, ray_session, tmp_path, metric_total
):
    from qgate.batch_scoring import run_scoring
    from qgate.config import ScoreConfig

    m = run_scoring(
        ScoreConfig(
            run_dir=str(tmp_path),
            base_model=tiny_model,
            corpus=[corpus["pool"]],
            output=str(tmp_path / "scores"),
            max_length=128,
            ifd=False,
            rows_per_shard=120,
        )
    )
    assert (
        metric_total(ray_session, "ray_qgate_score_rows_total", at_least=m["scored"]) >= m["scored"]
    )
    assert (
        metric_total(ray_session, "ray_qgate_score_tokens_total", at_least=m["tokens"])
        >= m["tokens"]
    )
    assert metric_total(ray_session, "ray_qgate_score_tokens_per_s") > 0
