"""`qgate status RUN`: every stage's state from the ledger and the artifacts on disk."""

from __future__ import annotations

import json
import os
import re

import pytest

from jobs import status as status_job
from qgate.status import run_status, track
from qgate.watchdog import beat


def _write(path, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        if isinstance(obj, list):
            f.writelines(json.dumps(o) + "\n" for o in obj)
        else:
            json.dump(obj, f)


def test_states_from_artifacts_and_ledger(tmp_path, capsys):
    run = str(tmp_path)
    _write(f"{run}/warmup/qgate.json", {})
    _write(f"{run}/warmup/metrics.jsonl", [{"step": 60, "lm_loss": 2.5, "quality_loss": 0.61}])
    shards = [
        {"shard": f"00000-{i:06d}", "path": "p", "start": i * 10, "stop": i * 10 + 10}
        for i in range(3)
    ]
    _write(f"{run}/scores/_plan.json", {"shards": shards})
    _write(f"{run}/scores/_shards/00000-000000.json", {})
    os.makedirs(f"{run}/scores/_progress")
    beat(f"{run}/scores/_progress", "00000-000001", 4, 10)  # a shard being scored
    ref = {
        "counts": {"selected": 30, "scored": 100},
        "method": "worst_rank",
        "signals": ["perplexity", "ifd"],
    }
    _write(f"{run}/selection/reference.json", ref)
    _write(f"{run}/selection/log.jsonl", [{"id": "a"}, {"id": "b"}])
    _write(f"{run}/selection_random/reference.json", {**ref, "method": "random", "signals": []})
    _write(
        f"{run}/eval/results.json",
        {"tasks": {"qgate_synth": {"exact_match": 0.2345}}, "wall_s": 12.0},
    )
    with pytest.raises(RuntimeError), track(run, "finetune"):
        raise RuntimeError("out of memory on rank 0")

    by = {r["stage"]: r for r in run_status(run)}
    assert by["warmup"]["state"] == "done" and "step 60" in by["warmup"]["figures"]
    assert by["score"]["state"] == "partial" and by["score"]["rows"] == 30
    assert "1/3 shards" in by["score"]["figures"]
    assert re.search(
        r"; last heartbeat \d+ s ago: shard 00000-000001, 4 of 10 rows done$",
        by["score"]["figures"],
    )
    assert by["select"]["state"] == "done" and "selected 30/100" in by["select"]["figures"]
    assert "log 2 samples" in by["select"]["figures"]
    assert by["select_random"]["state"] == "done"
    assert by["finetune"]["state"] == "failed"
    assert by["finetune"]["error"] == "RuntimeError: out of memory on rank 0"
    assert by["evaluate"]["state"] == "done" and "0.234" in by["evaluate"]["figures"]
    assert by["dedup"]["state"] == "not run"

    assert status_job.main([run]) == 0
    text = capsys.readouterr().out
    assert "failed" in text and "out of memory" in text and "partial" in text
    assert status_job.main([run, "--json"]) == 0
    assert {r["stage"] for r in json.loads(capsys.readouterr().out)} >= {"warmup", "score"}
    assert status_job.main([str(tmp_path / "nope")]) == 2


def test_track_records_done_and_wall(tmp_path):
    with track(str(tmp_path), "select") as fig:
        fig["figures"] = "x"
    with open(tmp_path / "_status" / "select.json") as f:
        entry = json.load(f)
    assert entry["state"] == "done" and entry["figures"] == "x" and entry["wall_s"] >= 0
