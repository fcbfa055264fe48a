"""The README's main command at CI size: every stage runs and the table comes from artifacts."""

from __future__ import annotations

import json
import os

from jobs import demo


def test_demo_small_runs_every_stage(ray_session, tmp_path, capsys):
    """Guards against a demo that skips a stage or prints numbers no artifact backs."""
    run = tmp_path / "demo"
    s = demo.run_demo(str(run), dict(demo.SIZES["small"]))
    for rel in [
        "data/pool.jsonl",
        "data/test.jsonl",
        "base/config.json",
        "warmup/gates.safetensors",
        "warmup/metrics.jsonl",
        "scores/_manifest.json",
        "selection/selected.jsonl",
        "selection/selection.parquet",
        "selection/reference.json",
        "selection/report.html",
        "selection_random/selected.jsonl",
        "finetune/adapter/adapter_config.json",
        "finetune_random/adapter/adapter_model.safetensors",
        "eval/results.json",
        "eval_random/results.json",
        "demo_summary.json",
    ]:
        assert (run / rel).exists(), rel
    manifest = json.loads((run / "scores/_manifest.json").read_text())
    assert s["rows_in"] == manifest["rows_in"] == 240
    assert s["rejected"] == manifest["rejected"]
    for arm, sel in (("selected", "selection"), ("random", "selection_random")):
        ref = json.loads((run / sel / "reference.json").read_text())
        assert s["arms"][arm]["selected"] == ref["counts"]["selected"] == 72  # 30% of 240
        ids = [json.loads(line)["sample_id"] for line in (run / sel / "selected.jsonl").open()]
        labels = {
            json.loads(line)["id"]: json.loads(line)["noise"]
            for line in (run / "data/pool.jsonl").open()
        }
        noise = sum(labels[i] != "clean" for i in ids) / len(ids)
        assert abs(s["arms"][arm]["noise_share"] - noise) < 1e-4
        ev = json.loads(
            (run / ("eval" if arm == "selected" else "eval_random") / "results.json").read_text()
        )
        assert s["arms"][arm]["exact_match"] == ev["tasks"]["qgate_synth"]["exact_match"]
    assert s["arms"]["random"]["method"] == "random"
    out = capsys.readouterr().out
    assert demo.format_table(s) in out
    assert json.loads((run / "demo_summary.json").read_text())["arms"] == s["arms"]
    assert os.path.isfile(s["report"])
