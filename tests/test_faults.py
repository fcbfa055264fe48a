"""External faults in the scoring job: real SIGKILLs sent from outside the code.

- The scoring actor's process is killed mid-job: Ray restarts the actor and retries its
  shard, and the job finishes in-job with every row exactly once.
- The driver (``python -m jobs.score``) is killed mid-job: the job cannot survive that, and
  a re-launch of the same command skips the done shards and finishes exactly once.

Node loss is in tests/test_node_loss.py (it needs its own multi-node cluster).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from test_score_fuzz import read_outputs
from test_scoring import _score_cfg

from qgate import data as D
from qgate.batch_scoring import MANIFEST_FILE, SHARDS_DIR, run_scoring

ROOT = Path(__file__).resolve().parents[1]
N_ROWS, ROWS_PER_SHARD = 2000, 25  # 80 shards of ~0.05 s each: a kill lands mid-job
N_SHARDS = N_ROWS // ROWS_PER_SHARD


def make_big_pool(out) -> tuple[str, list[str]]:
    """A 2,000-row synthetic pool under ``out`` and its sample ids, in order."""
    from qgate.synthetic import generate_corpus

    path = generate_corpus(out, seed=1, n_pool=N_ROWS, n_target=1, n_test=1, n_pretrain=1)["pool"]
    rows, rejects = D.read_corpus(path)
    assert len(rows) == N_ROWS and not rejects
    return path, [r["sample_id"] for r in rows]


@pytest.fixture(scope="module")
def big_pool(tmp_path_factory) -> tuple[str, list[str]]:
    return make_big_pool(tmp_path_factory.mktemp("big_pool"))


def scorer_pids(root: psutil.Process) -> set[int]:
    """PIDs of the live ShardScorer actor processes below ``root`` (Ray titles them
    ``ray::MapWorker(MapBatches(ShardScorer))...``)."""
    found = set()
    for p in root.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if p.status() != psutil.STATUS_ZOMBIE and "ShardScorer" in " ".join(p.cmdline()):
                found.add(p.pid)
    return found


def markers(out: str) -> list[str]:
    return sorted(glob.glob(os.path.join(out, SHARDS_DIR, "*.json")))


def wait_for(cond, timeout_s: float, what: str, poll_s: float = 0.01):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def assert_exactly_once(out: str, ids: list[str], manifest: dict) -> None:
    """Every id scored exactly once, nothing rejected, one marker per shard, counts agree."""
    scored, rejects = read_outputs(out)
    got = Counter(r["sample_id"] for r in scored)
    assert got == Counter(ids), (
        f"duplicated: {[k for k, v in got.items() if v > 1][:5]}, "
        f"missing: {sorted(set(ids) - set(got))[:5]}"
    )
    assert rejects == []
    assert len(markers(out)) == N_SHARDS
    parts = sorted(glob.glob(os.path.join(out, "part-*.parquet")))
    assert len(parts) == N_SHARDS
    assert {pq.ParquetFile(p).metadata.num_rows for p in parts} == {ROWS_PER_SHARD}
    assert manifest["rows_in"] == manifest["scored"] == N_ROWS and manifest["rejected"] == 0
    with open(os.path.join(out, MANIFEST_FILE)) as f:
        on_disk = json.load(f)
    assert (on_disk["rows_in"], on_disk["scored"], on_disk["complete"]) == (N_ROWS, N_ROWS, True)


def test_sigkill_of_the_scoring_actor_mid_job(tiny_model, big_pool, ray_session, tmp_path):
    """Guards against a crashed scoring actor (OOM killer, segfault: a SIGKILL from outside)
    losing the shard it was scoring, writing it twice, or failing the job instead of Ray
    restarting the actor and retrying the shard."""
    path, ids = big_pool
    out = str(tmp_path / "scores")
    me = psutil.Process()
    before = scorer_pids(me)  # actors of earlier tests that may still be shutting down
    seen: dict = {}
    done = threading.Event()

    def kill_then_watch() -> None:
        wait_for(lambda: markers(out), 300, "the first shard marker")
        pids = scorer_pids(me) - before
        seen["markers_at_kill"], seen["killed"] = len(markers(out)), pids
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        while not done.is_set():  # the actor Ray starts in its place
            new = scorer_pids(me) - before - pids
            if new:
                seen["replacement"] = new
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_then_watch, daemon=True)
    killer.start()
    try:
        cfg = _score_cfg(tiny_model, [path], out, f"rows_per_shard={ROWS_PER_SHARD}")
        m = run_scoring(cfg)
    finally:
        done.set()
        killer.join(timeout=30)
    assert len(seen["killed"]) == 1  # a pool of one actor, and it was found
    assert 1 <= seen["markers_at_kill"] < N_SHARDS  # the kill landed mid-job
    assert not any(_alive(p) for p in seen["killed"])
    assert len(seen.get("replacement", ())) == 1, "Ray never started a replacement actor"
    assert_exactly_once(out, ids, m)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _score_cmd(tiny_model: str, path: str, out: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jobs.score",
        "--config",
        "jobs/configs/score.yaml",
        f"base_model={tiny_model}",
        "gates=null",
        f"corpus={json.dumps([path])}",
        f"output={out}",
        f"run_dir={out}",
        "max_length=128",
        "batch_rows=32",
        "batch_tokens=2048",
        f"rows_per_shard={ROWS_PER_SHARD}",
        "actors.num_cpus=1",
    ]


def _driver_env() -> dict:
    env = dict(os.environ, QGATE_CPU_BF16="0", TOKENIZERS_PARALLELISM="false")
    env.pop("RAY_ADDRESS", None)  # unset: the stage starts its own embedded Ray
    return env


def test_sigkill_of_the_driver_then_relaunch(tiny_model, big_pool, tmp_path):
    """Guards against a re-launch after the driver was killed mid-job (SIGKILL: no cleanup,
    no atexit) re-scoring or appending to the shards already done, losing the shard that was
    in flight, or being confused by the dead run's half-written files."""
    path, ids = big_pool
    out = str(tmp_path / "scores")
    cmd, env = _score_cmd(tiny_model, path, out), _driver_env()
    log = tmp_path / "first.log"
    with open(log, "wb") as f:
        first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    tree: list[psutil.Process] = []
    try:

        def first_marker():
            if first.poll() is not None:
                raise AssertionError(
                    f"driver exited early ({first.returncode}):\n{log.read_text()}"
                )
            return markers(out)

        wait_for(first_marker, 300, "the first shard marker")
        tree = psutil.Process(first.pid).children(recursive=True)  # its Ray: GCS, raylet, actor
        first.send_signal(signal.SIGKILL)
        assert first.wait(timeout=30) == -signal.SIGKILL
        # Its actor can finish the shard it holds before Ray notices: count markers only once
        # every process of the dead session has gone. Some (the dashboard and runtime-env
        # agents) linger for a minute without their raylet: those are stopped here.
        _, alive = psutil.wait_procs(tree, timeout=10)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        done = markers(out)
        assert 1 <= len(done) < N_SHARDS  # killed mid-job
        assert not os.path.exists(os.path.join(out, MANIFEST_FILE))
        mtimes = {d: os.stat(d).st_mtime_ns for d in done}
        # what a writer killed mid-write can leave (whether this kill did is down to timing)
        stale = [os.path.join(out, "part-00000-000001.parquet.0badcafe.tmp")]
        stale.append(os.path.join(out, SHARDS_DIR, "00000-000001.json.deadbeef.tmp"))
        for path in stale:
            open(path, "wb").close()
            os.utime(path, (time.time() - 60, time.time() - 60))

        again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=480)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert f"{N_SHARDS} shards, {len(done)} already complete" in again.stdout
        assert f"rows in {N_ROWS}  scored {N_ROWS}  rejected 0" in again.stdout
        assert {d: os.stat(d).st_mtime_ns for d in done} == mtimes  # done shards not redone
        with open(os.path.join(out, MANIFEST_FILE)) as f:
            m = json.load(f)
        assert_exactly_once(out, ids, m)
        left = [n for _, _, files in os.walk(out) for n in files if n.endswith(".tmp")]
        assert not left and "temp file(s) a killed writer left" in again.stdout, left
    finally:
        if first.poll() is None:
            first.kill()
        for p in tree:
            with contextlib.suppress(psutil.Error):
                p.kill()
