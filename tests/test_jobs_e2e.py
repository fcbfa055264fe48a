"""End to end: a real local head (`ray start --head`), stages submitted with `ray job submit`."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY = shutil.which("ray") or os.path.join(os.path.dirname(sys.executable), "ray")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def head():
    """A token-auth Ray head on loopback in a temp dir; only its own processes are stopped."""
    gcs, dash, agent, agent_grpc, metrics, rt_env, client, nm, om = _free_ports(9)
    tmp = tempfile.mkdtemp(prefix="/tmp/qgr")  # short: Ray's socket paths have a length limit
    env = dict(
        os.environ,
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(16),
        RAY_USAGE_STATS_ENABLED="0",
    )
    env.pop("RAY_ADDRESS", None)
    cmd = [
        RAY,
        "start",
        "--head",
        "--block",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(gcs),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dash),
        "--dashboard-agent-listen-port",
        str(agent),
        "--dashboard-agent-grpc-port",
        str(agent_grpc),
        "--metrics-export-port",
        str(metrics),
        "--runtime-env-agent-port",
        str(rt_env),
        "--ray-client-server-port",
        str(client),
        "--node-manager-port",
        str(nm),
        "--object-manager-port",
        str(om),
        "--temp-dir",
        tmp,
        "--num-cpus",
        "3",
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
    )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 90
    while True:
        r = subprocess.run(
            [RAY, "job", "list", "--address", address], env=env, capture_output=True, text=True
        )
        if r.returncode == 0:
            break
        if time.time() > deadline or proc.poll() is not None:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"ray head did not come up: {r.stderr[-2000:]}")
        time.sleep(2)
    yield address, env
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(tmp, ignore_errors=True)


def _submit(address, env, submission_id, *args, root=None):
    cmd = [RAY, "job", "submit", "--address", address, "--working-dir", REPO]
    cmd += ["--submission-id", submission_id]
    if root:  # relative config paths resolve against QGATE_ROOT, as the README shows
        cmd += ["--runtime-env-json", json.dumps({"env_vars": {"QGATE_ROOT": root}})]
    cmd += ["--", "python", "-m", *args]
    r = None
    for _ in range(5):  # the job agent can take a few seconds after the head answers
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in r.stderr + r.stdout:
            break
        time.sleep(3)
    return r


def test_warmup_and_score_jobs_via_cli(head, tiny_model, corpus, tmp_path):
    """Guards against stages that work in-process but not under `ray job submit`
    (working_dir upload, relative imports, auth, the config path, exit codes)."""
    address, env = head
    run = str(tmp_path / "run")
    small = [
        f"base_model={tiny_model}",
        f"corpus={corpus['pool']}",
        "run_dir=run",  # relative: must land under QGATE_ROOT
        "max_length=96",
    ]
    r = _submit(
        address,
        env,
        "qgate-e2e-warmup",
        "jobs.warmup",
        "--config",
        "jobs/configs/warmup_probe.yaml",
        *small,
        "max_steps=4",
        "batch_size=4",
        "checkpoint_every=4",
        "report_every=2",
        root=str(tmp_path),
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "warmup done: 4 steps" in r.stdout
    assert os.path.isfile(os.path.join(run, "warmup", "gates.safetensors"))
    r = _submit(
        address,
        env,
        "qgate-e2e-score",
        "jobs.score",
        "--config",
        "jobs/configs/score.yaml",
        *small,
        "gates=run/warmup",
        "batch_tokens=4096",
        "actors.num_cpus=1",
        root=str(tmp_path),
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(os.path.join(run, "scores", "_manifest.json")) as f:
        m = json.load(f)
    assert m["complete"] and m["rows_in"] == m["scored"] + m["rejected"] == 240
    assert f"rows in 240  scored {m['scored']}" in r.stdout
    # a re-used submission id is refused by Ray: the documented convention adds a suffix
    again = _submit(
        address, env, "qgate-e2e-score", "jobs.score", "--config", "jobs/configs/score.yaml", *small
    )
    assert again.returncode != 0
