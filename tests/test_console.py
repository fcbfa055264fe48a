"""The quiet terminal (qgate.console): people's lines on the terminal, the rest in the log,
one line and the log's path for an error. Runs in a child process (it moves fds 1 and 2)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import logging, os, sys, warnings
    from qgate.console import quiet
    logging.basicConfig(level=logging.INFO)
    with quiet(sys.argv[1], "score", expected=(FileNotFoundError,)):
        print("=== 1/3 score ===")
        print("[score] 4 shards, 0 already complete")
        print("Starting execution of Dataset dataset_1 (ray data chatter)")
        print("(MapWorker(MapBatches(ShardScorer)) pid=123) [score] shard 00000-000000: 60 scored")
        print("(MapWorker(MapBatches(ShardScorer)) pid=123) [score] shard 00000-000001: 60 scored")
        print("[score] head negatives shard 00000-000000: 24 scored")
        print("(RayTrainWorker pid=9) Reporting training result 1: TrainingReport(...)")
        os.write(2, b"C-level stderr write\\n")
        logging.getLogger("ray.data").info("a library log line")
        warnings.warn("a deprecation nobody can act on", FutureWarning)
        if sys.argv[2] == "fail":
            raise RuntimeError("the actor pool never started")
        if sys.argv[2] == "expected":
            raise FileNotFoundError("no scores manifest")
    print("after: back on the terminal")
    """
)


def _run(tmp_path, mode: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "QGATE_VERBOSE": "0"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), mode],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_terminal_shows_only_qgate_lines_and_the_log_holds_everything(tmp_path):
    p = _run(tmp_path, "ok")
    assert p.returncode == 0, p.stderr
    term = p.stdout.splitlines()
    assert term[:2] == ["=== 1/3 score ===", "[score] 4 shards, 0 already complete"]
    assert "after: back on the terminal" in term
    # a worker's progress line, its Ray prefix stripped (the first; later ones are throttled)
    assert term.count("[score] shard 00000-000000: 60 scored") == 1
    assert not any("Dataset" in t or "TrainingReport" in t or "000001" in t for t in term)
    assert not any("head negatives shard" in t for t in term)  # a progress line: throttled
    assert p.stderr == ""
    log = (tmp_path / "logs" / "score.log").read_text()
    for text in (
        "Starting execution of Dataset",
        "TrainingReport",
        "C-level stderr write",
        "a library log line",
        "a deprecation nobody can act on",
        "[score] shard 00000-000001",
        "[score] head negatives shard 00000-000000",
    ):
        assert text in log, text


def test_error_prints_one_line_and_the_log_path(tmp_path):
    p = _run(tmp_path, "fail")
    assert p.returncode == 1
    err = p.stderr.strip().splitlines()
    assert err[0] == "score: error: RuntimeError: the actor pool never started"
    assert str(tmp_path / "logs" / "score.log") in err[1] and len(err) == 2
    assert "Traceback" in (tmp_path / "logs" / "score.log").read_text()
    # an expected error propagates for the entry point's own message
    p = _run(tmp_path, "expected")
    assert p.returncode == 1 and "FileNotFoundError: no scores manifest" in p.stderr
