"""Node loss in the scoring job: the node holding the scoring actor is removed mid-job.

A local multi-node Ray cluster (``ray.cluster_utils.Cluster``: several raylets on this host)
has a head without the ``scorer`` resource and two worker nodes with it, so the actor
(``actors.resources={scorer: 1}``) can only run on a worker. Once the first shard is done,
the worker hosting the actor is killed (its raylet and every process on it). Ray restarts
the actor on the other worker and re-runs the lost work; the job must finish in-job with
every row exactly once.

The cluster runs in a child process (this file run as a script), so it never meets the
suite's shared Ray session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

SCRIPT_TIMEOUT_S = 480


def _raylet(node) -> int | None:
    from ray._private import ray_constants

    procs = node.all_processes.get(ray_constants.PROCESS_TYPE_RAYLET) or []
    return procs[0].process.pid if procs else None


def _hosts_scorer(node) -> bool:
    """Whether a ShardScorer actor process runs under this node's raylet."""
    import psutil

    pid = _raylet(node)
    if pid is None:
        return False
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return False
    for p in kids:
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "ShardScorer" in " ".join(p.cmdline()):
                return True
        except psutil.Error:
            continue
    return False


def run_node_loss(model: str, corpus: str, out: str, rows_per_shard: int) -> dict:
    """Start head + 2 scorer workers, score, remove the actor's node mid-job; what happened."""
    import ray
    from ray.cluster_utils import Cluster

    from qgate.batch_scoring import run_scoring
    from qgate.config import ScoreConfig
    from qgate.config_io import load_config

    # Faster node-death detection than the defaults (3 s x 5 missed health checks), so the
    # test spends less time waiting; the recovery path is the same.
    system = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
    head_args = {"num_cpus": 1, "include_dashboard": False, "_system_config": system}
    cluster = Cluster(initialize_head=True, head_node_args=head_args)
    workers = [cluster.add_node(num_cpus=2, resources={"scorer": 1}) for _ in range(2)]
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    info: dict = {"cluster": {k: v for k, v in ray.cluster_resources().items() if "node:" not in k}}
    done = threading.Event()
    shards_dir = os.path.join(out, "_shards")

    def remove_actor_node() -> None:
        while not done.is_set():
            if os.path.isdir(shards_dir) and any(
                n.endswith(".json") for n in os.listdir(shards_dir)
            ):
                break
            time.sleep(0.01)
        else:
            return
        hosts = [i for i, n in enumerate(workers) if _hosts_scorer(n)]
        info["head_hosts_scorer"] = _hosts_scorer(cluster.head_node)
        info["actor_nodes"] = hosts
        info["markers_at_removal"] = len([n for n in os.listdir(shards_dir) if n.endswith(".json")])
        if len(hosts) != 1:
            return
        victim = workers[hosts[0]]
        info["removed_node_id"] = victim.node_id
        cluster.remove_node(victim, allow_graceful=False)  # SIGKILL the raylet and its workers
        info["removed_at"] = time.time()
        other = workers[1 - hosts[0]]
        while not done.is_set():
            if _hosts_scorer(other):
                info["replacement_on_other_worker"] = True
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=remove_actor_node, daemon=True)
    watcher.start()
    cfg = load_config(
        ScoreConfig,
        None,
        [
            f"base_model={model}",
            f"corpus={json.dumps([corpus])}",
            f"output={out}",
            f"run_dir={out}",
            "max_length=128",
            "batch_rows=32",
            "batch_tokens=2048",
            f"rows_per_shard={rows_per_shard}",
            "actors.num_cpus=1",
            "actors.resources={scorer: 1}",
        ],
    )
    t0 = time.time()
    try:
        info["manifest"] = run_scoring(cfg)
    except Exception as e:  # reported to the test, which shows it
        info["error"] = f"{type(e).__name__}: {e}"
    finally:
        done.set()
        watcher.join(timeout=30)
    info["wall_s"] = time.time() - t0
    info["alive_nodes"] = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    ray.shutdown()
    cluster.shutdown()
    return info


def test_node_loss_mid_job(tiny_model, tmp_path):
    """Guards against losing the node that runs the scoring actor (and holds the results of
    its finished shards in its object store) failing the job, dropping the shard in flight,
    or writing a re-run shard twice; and against actors.resources not pinning the actors
    to the nodes that have the resource."""
    from test_faults import N_ROWS, N_SHARDS, ROWS_PER_SHARD, assert_exactly_once, make_big_pool

    path, ids = make_big_pool(tmp_path / "pool")
    out, result = tmp_path / "scores", tmp_path / "result.json"
    env = dict(os.environ, QGATE_CPU_BF16="0", TOKENIZERS_PARALLELISM="false")
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, __file__, tiny_model, path, str(out), str(ROWS_PER_SHARD), str(result)]
    try:
        proc = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"node-loss script ran over {SCRIPT_TIMEOUT_S} s:\n{e.stdout}\n{e.stderr}")
    tail = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, tail
    info = json.loads(result.read_text())
    assert info["cluster"]["scorer"] == 2.0 and info["cluster"]["CPU"] == 5.0
    assert info["head_hosts_scorer"] is False  # pinned by actors.resources
    assert len(info["actor_nodes"]) == 1, info
    assert 1 <= info["markers_at_removal"] < N_SHARDS  # removed mid-job
    assert "error" not in info, info["error"] + "\n" + tail  # survived in-job
    assert info.get("replacement_on_other_worker") is True, tail
    assert info["removed_node_id"] not in info["alive_nodes"] and len(info["alive_nodes"]) == 2
    assert info["manifest"]["rows_in"] == N_ROWS
    assert_exactly_once(str(out), ids, info["manifest"])


if __name__ == "__main__":
    model, corpus, out, rows_per_shard, result = sys.argv[1:6]
    got = run_node_loss(model, corpus, out, int(rows_per_shard))
    with open(result, "w") as f:
        json.dump(got, f, indent=1, default=str)
    print(json.dumps({k: v for k, v in got.items() if k != "manifest"}, default=str))
