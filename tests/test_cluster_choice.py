"""Which Ray a stage runs on, how its session ends, and the stall watchdog (issue 18).

Stages run in subprocesses, each with its own RAY_TMPDIR (so Ray's "current cluster" file and
session dirs are the test's own, and the suite's shared ``ray_session`` is never touched).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import psutil
import pytest

from qgate.watchdog import (
    Heartbeats,
    Pending,
    Watchdog,
    arrivals,
    beat,
    describe,
    end_beat,
    stall_seconds_from_env,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINGER_AFTER_EXIT_S = 20  # the bound: no process of the session left after this
AGENTS_AFTER_SIGKILL_S = 100  # Ray's agents retry the dead GCS for ~60 s (README)


def _env(tmp: str, **extra) -> dict:
    env = dict(os.environ, RAY_TMPDIR=tmp, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


@pytest.fixture
def ray_tmp():
    """A short, private Ray temp dir (Ray's socket paths have a length limit)."""
    tmp = tempfile.mkdtemp(prefix="qgc", dir="/tmp")
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


def _score_cmd(tiny_model: str, pool: str, run: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jobs.score",
        f"base_model={tiny_model}",
        f"corpus=[{pool}]",
        f"run_dir={run}",
        "max_length=96",
        "rows_per_shard=60",
        "batch_tokens=2048",
    ]


def _tree(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _alive_after(procs: list[psutil.Process], timeout: float) -> list[str]:
    """Names of procs still running after up to ``timeout`` s."""
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    names = []
    for p in alive:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                names.append(f"{p.name()}({p.pid})")
        except psutil.NoSuchProcess:
            pass
    return names


class Stage:
    """A subprocess whose output goes to a file and whose process tree is recorded."""

    def __init__(self, cmd: list[str], env: dict, log: str) -> None:
        self.log = log
        self._f = open(log, "w")  # noqa: SIM115 (closed in wait())
        self.t0 = time.time()
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=self._f, stderr=subprocess.STDOUT
        )
        self.seen: dict[int, psutil.Process] = {}
        self.names: dict[int, str] = {}

    def output(self) -> str:
        with open(self.log) as f:
            return f.read()

    def record(self) -> None:
        for p in _tree(self.proc.pid):
            with contextlib.suppress(psutil.Error):
                self.names[p.pid] = p.name()
                self.seen.setdefault(p.pid, p)

    def names_seen(self) -> set[str]:
        return set(self.names.values())

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.time() + timeout
        while text not in self.output():
            self.record()
            if self.proc.poll() is not None or time.time() > deadline:
                self.kill()
                pytest.fail(
                    f"never printed {text!r} (rc {self.proc.poll()}):\n{self.output()[-3000:]}"
                )
            time.sleep(0.5)
        self.record()

    def wait(self, timeout: float) -> int:
        deadline = time.time() + timeout
        while self.proc.poll() is None:
            self.record()
            if time.time() > deadline:
                self.kill()
                pytest.fail(f"still running after {timeout} s:\n{self.output()[-3000:]}")
            time.sleep(0.5)
        self._f.close()
        return self.proc.returncode

    def kill(self) -> None:
        self.record()
        for p in [self.proc, *self.seen.values()]:
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                p.kill()


def _manifest(run: str) -> dict:
    with open(os.path.join(run, "scores", "_manifest.json")) as f:
        return json.load(f)


def _n_rows(path: str) -> int:
    with open(path) as f:
        return sum(1 for line in f if line.strip())


@pytest.fixture(scope="module")
def stale_run(tiny_model, corpus, tmp_path_factory):
    """The score stage, run with Ray's current-cluster file pointing at a dead head."""
    tmp = tempfile.mkdtemp(prefix="qgc", dir="/tmp")
    # Ray's own format and place (ray/_private/utils.py write_ray_address,
    # ray/_common/utils.py get_ray_address_file): the bare "host:port" of the GCS.
    os.makedirs(os.path.join(tmp, "ray"))
    cluster_file = os.path.join(tmp, "ray", "ray_current_cluster")
    with open(cluster_file, "w") as f:
        f.write("127.0.0.1:1")
    run = str(tmp_path_factory.mktemp("stale_run"))
    stage = Stage(
        _score_cmd(tiny_model, corpus["pool"], run), _env(tmp), os.path.join(run, "log.txt")
    )
    rc = stage.wait(timeout=300)
    exited = time.time()
    left = _alive_after(list(stage.seen.values()), LINGER_AFTER_EXIT_S)
    with open(cluster_file) as f:
        cluster_file_after = f.read()
    yield {
        "rc": rc,
        "out": stage.output(),
        "run": run,
        "wall_s": exited - stage.t0,
        "left": left,
        "names": stage.names_seen(),
        "cluster_file_after": cluster_file_after,
    }
    shutil.rmtree(tmp, ignore_errors=True)


def test_stale_cluster_file_still_runs_embedded(stale_run, corpus):
    """Guards against ray.init() with no address connecting to the dead head named in Ray's
    current-cluster file and hanging in Node._init_gcs_client (the issue: 7 min, no output)."""
    out = stale_run["out"]
    assert stale_run["rc"] == 0, out[-3000:]
    assert "Started a local Ray instance" in out
    assert "Connecting to existing Ray cluster" not in out
    m = _manifest(stale_run["run"])
    assert m["rows_in"] == _n_rows(corpus["pool"])
    assert m["scored"] + m["rejected"] == m["rows_in"]
    assert stale_run["cluster_file_after"] == "127.0.0.1:1"  # an embedded Ray never writes it
    assert stale_run["wall_s"] < 240


def test_normal_exit_leaves_no_session_process(stale_run):
    """Guards against a finished stage leaving its raylet, GCS, agents or workers behind."""
    names = stale_run["names"]
    # The session was seen (its GCS, raylet and a worker), so an empty `left` means something.
    # Not the agents by name: on a slow machine a short stage can end before they set it.
    assert {"gcs_server", "raylet"} <= names and any(n.startswith("ray::") for n in names)
    assert stale_run["left"] == []


def test_unreachable_address_fails_fast_with_the_address(ray_tmp, tiny_model, corpus, tmp_path):
    """Guards against RAY_ADDRESS naming a dead head: Ray's own retries last ~13 minutes."""
    t0 = time.time()
    r = subprocess.run(
        _score_cmd(tiny_model, corpus["pool"], str(tmp_path / "run")),
        cwd=REPO,
        env=_env(ray_tmp, RAY_ADDRESS="127.0.0.1:1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    wall = time.time() - t0
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert wall < 30, wall
    assert "cannot reach the Ray cluster at 127.0.0.1:1" in r.stderr
    assert "connection refused" in r.stderr
    assert "unset RAY_ADDRESS" in r.stderr
    assert "Traceback" not in r.stderr


def test_silent_port_times_out_with_the_address(ray_tmp, tiny_model, corpus, tmp_path):
    """Guards against a port that accepts TCP but is no Ray GCS: the connect must still end,
    within QGATE_CONNECT_TIMEOUT_S, naming the address."""
    with socket.socket() as srv:
        srv.bind(("0.0.0.0", 0))  # Ray dials the node IP for 127.0.0.1
        srv.listen(16)  # never accepts or answers: TCP connects, gRPC waits forever
        port = srv.getsockname()[1]
        t0 = time.time()
        r = subprocess.run(
            _score_cmd(tiny_model, corpus["pool"], str(tmp_path / "run")),
            cwd=REPO,
            env=_env(ray_tmp, RAY_ADDRESS=f"127.0.0.1:{port}", QGATE_CONNECT_TIMEOUT_S="8"),
            capture_output=True,
            text=True,
            timeout=120,
        )
        wall = time.time() - t0
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert wall < 30, wall
    assert f"Ray cluster at 127.0.0.1:{port}" in r.stderr
    assert "RAY_ADDRESS" in r.stderr


HEAD_SCRIPT = textwrap.dedent(
    """
    import ray, time
    ray.init(address="local", num_cpus=1, include_dashboard=False)
    print("GCS " + ray.get_runtime_context().gcs_address, flush=True)
    time.sleep(600)
    """
)
CLIENT_SCRIPT = textwrap.dedent(
    """
    import ray
    from jobs.common import init_ray
    init_ray()
    @ray.remote
    def f():
        return 41 + 1
    print("RESULT", ray.get(f.remote()), flush=True)
    """
)


def test_ray_address_connects_and_names_it(ray_tmp, tmp_path):
    """Guards against RAY_ADDRESS being ignored (an embedded Ray instead of the cluster), the
    address connected to going unsaid, or a driver's exit taking the cluster down with it."""
    env = _env(ray_tmp, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    head = Stage([sys.executable, "-c", HEAD_SCRIPT], env, str(tmp_path / "head.log"))
    try:
        head.wait_for("GCS ", timeout=180)
        address = head.output().split("GCS ", 1)[1].split()[0]
        r = subprocess.run(
            [sys.executable, "-c", CLIENT_SCRIPT],
            cwd=REPO,
            env=dict(env, RAY_ADDRESS=address),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert r.stdout.splitlines()[0] == f"ray: connected to the Ray cluster at {address}"
        assert "RESULT 42" in r.stdout
        assert "Started a local Ray instance" not in r.stderr
        time.sleep(1)
        assert head.proc.poll() is None  # the cluster outlives the driver that connected
        assert any(p.name() == "raylet" and p.is_running() for p in _tree(head.proc.pid))
    finally:
        head.kill()


def test_sigterm_stops_serve_and_its_session(stale_run, ray_tmp, tmp_path):
    """Guards against `qgate serve` ignoring SIGTERM, or leaving Serve actors, agents, the
    raylet or the GCS running after it exits."""
    import httpx

    assert stale_run["rc"] == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "jobs.serve", "--port", str(port)]
    cmd += [f"run_dir={stale_run['run']}", "score_only=true"]
    srv = Stage(cmd, _env(ray_tmp), str(tmp_path / "serve.log"))
    srv.wait_for("qgate endpoint at", timeout=300)
    assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30).status_code == 200
    srv.record()
    names = srv.names_seen()
    assert {"raylet", "gcs_server"} <= names, names
    assert any(n.startswith("ray::Serve") for n in names), names
    srv.proc.send_signal(signal.SIGTERM)
    t = time.time()
    rc = srv.wait(timeout=60)
    stop_s = time.time() - t
    out = srv.output()
    assert rc == 0, out[-3000:]
    assert "stopping the endpoint" in out
    # Ray's C++ crash handler did not take the driver's SIGTERM (it can abort the exit)
    assert not any(line.startswith("*** SIGTERM received") for line in out.splitlines())
    t = time.time()
    left = _alive_after(list(srv.seen.values()), LINGER_AFTER_EXIT_S)
    assert left == [], f"left after {stop_s:.0f} s + {LINGER_AFTER_EXIT_S} s: {left}"
    print(
        f"serve exited {stop_s:.1f} s after SIGTERM; its session gone {time.time() - t:.1f} s later"
    )


ENDINGS_SCRIPT = textwrap.dedent(
    """
    import signal, sys, time, ray
    from jobs.common import init_ray
    # Ctrl-C as in a terminal, even when the suite runs where SIGINT is ignored (a shell's
    # background job): Python keeps an inherited SIG_IGN instead of raising KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    init_ray()
    @ray.remote
    def f():
        return 1
    assert ray.get([f.remote() for _ in range(2)]) == [1, 1]
    print("READY", flush=True)
    if sys.argv[1] == "exception":
        time.sleep(3)  # let the agents come up
        raise RuntimeError("stage failed")
    time.sleep(600)
    """
)


@pytest.mark.parametrize("ending", ["exception", "sigint", "sigterm"])
def test_every_ending_shuts_the_session_down(ending, ray_tmp, tmp_path):
    """Guards against a stage that dies of an error, Ctrl-C or SIGTERM leaving its embedded
    Ray (raylet, GCS, dashboard, agents, workers) running."""
    cmd = [sys.executable, "-c", ENDINGS_SCRIPT, ending]
    stage = Stage(cmd, _env(ray_tmp), str(tmp_path / "stage.log"))
    stage.wait_for("READY", timeout=180)
    if ending != "exception":
        time.sleep(3)
        stage.record()
        stage.proc.send_signal(signal.SIGINT if ending == "sigint" else signal.SIGTERM)
    rc = stage.wait(timeout=60)
    out = stage.output()
    assert rc == {"exception": 1, "sigint": 1, "sigterm": 143}[ending], out[-3000:]
    names = stage.names_seen()
    assert {"raylet", "gcs_server", "ray::IDLE"} <= names, names
    assert _alive_after(list(stage.seen.values()), LINGER_AFTER_EXIT_S) == []


def test_stage_after_a_sigkilled_one_runs_normally(ray_tmp, tiny_model, corpus, tmp_path):
    """Guards against a killed run's leftovers (its current session dir, agents still
    retrying its dead GCS) breaking or capturing the next run on the same machine."""
    run = str(tmp_path / "run")
    first = Stage(_score_cmd(tiny_model, corpus["pool"], run), _env(ray_tmp), run + ".1.log")
    first.wait_for("Started a local Ray instance", timeout=240)
    deadline = time.time() + 30
    while not _agents_seen(first) and time.time() < deadline:  # they start after the raylet
        time.sleep(0.5)
        first.record()
    killed = list(first.seen.values())
    assert _agents_seen(first) and "raylet" in first.names_seen()
    first.proc.kill()
    t_kill = time.time()
    first.proc.wait()
    second = Stage(_score_cmd(tiny_model, corpus["pool"], run), _env(ray_tmp), run + ".2.log")
    rc = second.wait(timeout=300)
    out = second.output()
    assert rc == 0, out[-3000:]
    assert "Started a local Ray instance" in out
    m = _manifest(run)
    assert m["rows_in"] == _n_rows(corpus["pool"])
    assert m["scored"] + m["rejected"] == m["rows_in"]
    second_done = time.time() - t_kill
    left = _alive_after(killed, max(0.0, AGENTS_AFTER_SIGKILL_S - second_done))
    gone = time.time() - t_kill
    assert left == [], f"killed session still has {left} {gone:.0f} s on"
    print(
        f"second stage done {second_done:.0f} s after the kill; killed session gone by {gone:.0f} s"
    )


def _agents_seen(stage: Stage) -> bool:
    return {"ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= stage.names_seen()


# --- the stall watchdog ---------------------------------------------------------------


def test_describe_names_the_pending_actor_and_the_resources():
    """Guards against a stall line that does not say what is pending and what is missing."""
    p = Pending(
        actors=[("MapWorker(MapBatches(ShardScorer))", {"CPU": 4.0})],
        total={"CPU": 2.0, "memory": 8 * 2**30},
        available={"CPU": 2.0},
    )
    assert describe(p) == (
        "1 actor (MapWorker(MapBatches(ShardScorer))) pending creation, needing {CPU: 4}; "
        "the cluster has {CPU: 2} available of {CPU: 2} in total; "
        "more CPU than the whole cluster has: ask for less or add nodes"
    )
    busy = Pending(
        groups=[([{"CPU": 1.0}, {"CPU": 1.0}], 2)],
        tasks=[("ReadRange", {"CPU": 1.0})] * 3,
        total={"CPU": 2.0},
        available={"CPU": 0.0},
    )
    assert describe(busy) == (
        "1 placement group pending (2 actors wait in it), needing 2 x {CPU: 1}; "
        "3 tasks (ReadRange) waiting for a node, each needing {CPU: 1}; "
        "the cluster has {CPU: 0} available of {CPU: 2} in total"
    )
    starting = describe(Pending(actors=[("TrainController", {})], total={"CPU": 2.0}))
    assert starting.startswith(
        "1 actor (TrainController) pending creation, needing no resources (its worker process"
    )
    building = Pending(building=[("ShardScorer", 11), ("ShardScorer", 12)], total={"CPU": 2.0})
    assert not building.waiting  # placed, running __init__: not a wait for resources
    assert describe(building).startswith(
        "2 actors (ShardScorer) still in their constructor (pid 11, 12; loading a large model"
    )
    idle = describe(Pending(total={"CPU": 2.0}, available={"CPU": 0.5}))
    assert idle.startswith("nothing in this job waits for resources; the cluster has {CPU: 0.5}")


def test_watchdog_one_line_per_stall_and_ticks_rearm():
    """Guards against a watchdog that floods the log, stays silent, or fires while ticking."""
    calls = []

    def probe():
        calls.append(1)
        return Pending(actors=[("A", {"x": 1.0})], total={"CPU": 1.0}, available={"CPU": 1.0})

    out = io.StringIO()
    with Watchdog("t", stall_seconds=0.3, probe=probe, out=out, poll_s=0.02) as dog:
        time.sleep(1.0)  # one stall: one line, however long it lasts
        assert len(dog.lines) == 1
        dog.tick()
        time.sleep(0.6)
        assert len(dog.lines) == 2
        for _ in range(20):  # progress every 0.05 s: never a stall
            dog.tick()
            time.sleep(0.05)
        assert len(dog.lines) == 2
    assert len(calls) == 2
    assert dog.lines[0].startswith("[t] no progress for 0 s: 1 actor (A) pending creation")
    assert out.getvalue().splitlines() == dog.lines


def test_heartbeats_are_progress_and_the_stall_line_names_the_last(tmp_path):
    """Guards against a false stall alarm while a long shard is being scored (no summary for
    minutes, heartbeats all along), and against a real stall that says nothing of where it
    stopped."""
    beats = str(tmp_path)
    out = io.StringIO()
    probe = lambda: Pending(total={"CPU": 2.0}, available={"CPU": 0.0})  # noqa: E731
    with Watchdog(
        "t", stall_seconds=0.3, probe=probe, progress=Heartbeats([beats]), out=out, poll_s=0.02
    ) as dog:
        for done in range(20):  # 1 s without a tick, a beat every 0.05 s: no stall
            beat(beats, "00000-000001", done, 40)
            time.sleep(0.05)
        assert dog.lines == []
        time.sleep(0.6)  # the beats stop: one line, naming the last one
        assert len(dog.lines) == 1
        end_beat(beats, "00000-000001")
    assert dog.lines[0].startswith(
        "[t] no progress for 0 s (last heartbeat: shard 00000-000001, 19 of 40 rows done): "
        "nothing in"
    )
    assert os.listdir(beats) == []
    beat(os.path.join(beats, "gone"), "00000-000001", 1, 40)  # best effort: never raises
    with Watchdog(
        "t", stall_seconds=0.3, probe=probe, progress=Heartbeats([beats]), out=out, poll_s=0.02
    ) as dog:
        beat(beats, "00000-000002", 5, 40)
        time.sleep(0.1)
        os.unlink(os.path.join(beats, "00000-000002.json"))
        dog.tick()  # its summary: that shard is done, its heartbeat no longer the last word
        time.sleep(0.6)
    assert len(dog.lines) == 1 and "heartbeat" not in dog.lines[0], dog.lines


def test_a_long_shard_gets_progress_lines_from_its_heartbeats(tmp_path):
    """Guards against a score log that stays silent for the whole of a long shard (5,000 rows
    of a slow model: many minutes), or that repeats every heartbeat."""
    beats = str(tmp_path)
    with Watchdog(
        "t",
        stall_seconds=5,
        progress=Heartbeats([beats]),
        progress_every=0.25,
        out=io.StringIO(),
        poll_s=0.02,
    ) as dog:
        t0 = time.monotonic()
        for done in range(0, 40):  # a beat every 0.03 s for 1.2 s: a line every 0.25 s
            beat(beats, "00000-000002", done, 40)
            time.sleep(0.03)
        elapsed = time.monotonic() - t0
        dog.tick()  # a summary arrives: the next line only 0.25 s after it
        beat(beats, "00000-000002", 40, 40)
        time.sleep(0.1)
    assert 2 <= len(dog.lines) <= elapsed / 0.25 + 1 and len(dog.lines) < 20, dog.lines
    assert all(re.fullmatch(r"\[t\] shard 00000-000002, \d+ of 40 rows done", x) for x in dog.lines)
    assert "40 of 40" not in dog.lines[-1]


def test_watchdog_without_ticks_speaks_only_while_ray_waits():
    """Guards against the trainer.fit() watchdog crying stall while training runs."""
    states = iter([Pending()] * 10 + [Pending(groups=[([{"CPU": 4.0}], 0)])] * 1000)
    with Watchdog(
        "w", 0.2, ticks=False, probe=lambda: next(states), out=io.StringIO(), poll_s=0.02
    ) as dog:
        time.sleep(0.15)
        assert dog.lines == []  # nothing pending yet, past the threshold or not
        time.sleep(0.9)
    assert len(dog.lines) == 1
    assert "1 placement group pending, needing 1 x {CPU: 4}" in dog.lines[0]


def test_stall_seconds_env(monkeypatch):
    """Guards against a typo in QGATE_STALL_S silently meaning the default or 'off'."""
    monkeypatch.setenv("QGATE_STALL_S", "2m")
    with pytest.raises(ValueError, match="QGATE_STALL_S='2m'"):
        stall_seconds_from_env()
    monkeypatch.setenv("QGATE_STALL_S", "0")
    assert stall_seconds_from_env() == 0.0
    monkeypatch.delenv("QGATE_STALL_S")
    assert stall_seconds_from_env() == 120.0


WATCHDOG_SCRIPT = textwrap.dedent(
    """
    import json, sys, time, ray
    from qgate.watchdog import Watchdog

    ray.init(address="local", num_cpus=2, include_dashboard=sys.argv[1] == "dashboard")

    @ray.remote(num_cpus=2)
    class Hog:
        def ping(self):
            return 1

    @ray.remote(num_cpus=1)
    class Waiter:
        pass

    @ray.remote(resources={"qgate_missing": 1})
    class Missing:
        pass

    @ray.remote(num_cpus=0)
    class Building:  # placed, but its constructor takes long (a large model loading)
        def __init__(self):
            time.sleep(600)

    hog = Hog.remote()
    ray.get(hog.ping.remote())
    actors = [Waiter.remote(), Missing.remote(), Building.remote()]
    pg = ray.util.placement_group([{"CPU": 4}])
    if sys.argv[1] == "dashboard":  # wait until Building's process runs its constructor
        from ray.util import state

        gcs = ray.get_runtime_context().gcs_address
        deadline = time.time() + 90
        while time.time() < deadline and not any(
            a.pid for a in state.list_actors(address=gcs, filters=[("class_name", "=", "Building")])
        ):
            time.sleep(0.5)
    with Watchdog("probe", stall_seconds=3, ticks=sys.argv[1] == "dashboard") as dog:
        deadline = time.time() + 90
        while not dog.lines and time.time() < deadline:
            time.sleep(0.5)
    print("LINES " + json.dumps(dog.lines), flush=True)
    """
)


def test_watchdog_names_what_a_real_ray_waits_for(ray_tmp):
    """Guards against a stall line built from guesses: it must come from Ray's state (pending
    actors, placement groups) and its resource view, for a real embedded session."""
    lines, stderr = _watchdog_lines(ray_tmp, "dashboard")
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("[probe] no progress for ")
    assert "1 actor (Waiter) pending creation, needing {CPU: 1}" in line
    assert "1 actor (Missing) pending creation, needing {CPU: 1, qgate_missing: 1}" in line
    assert "1 placement group pending, needing 1 x {CPU: 4}" in line
    assert "1 actor (Building) still in its constructor (pid " in line
    assert "Building) pending creation" not in line  # placed: not waiting for resources
    assert (
        "the cluster has {CPU: 0, qgate_missing: 0} available of {CPU: 2, qgate_missing: 0}" in line
    )
    assert "more CPU, qgate_missing than the whole cluster has" in line
    assert line in stderr  # printed, not only recorded


def test_watchdog_without_dashboard_still_sees_placement_groups(ray_tmp):
    """Guards against the trainer.fit() watchdog going blind without Ray's dashboard (the state
    API needs it): pending placement groups come from the GCS, and the gap is said."""
    lines, _ = _watchdog_lines(ray_tmp, "no-dashboard")
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("[probe] no progress for ")
    assert "1 placement group pending, needing 1 x {CPU: 4}" in line
    assert "the cluster has {CPU: 0} available of {CPU: 2} in total" in line
    assert "actors and tasks unknown: Ray's state API did not answer" in line


def _watchdog_lines(ray_tmp: str, mode: str) -> tuple[list[str], str]:
    r = subprocess.run(
        [sys.executable, "-c", WATCHDOG_SCRIPT, mode],
        cwd=REPO,
        env=_env(ray_tmp, RAY_SCHEDULER_EVENTS="0"),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return json.loads(r.stdout.split("LINES ", 1)[1]), r.stderr


def test_summaries_arrive_as_their_shard_finishes(ray_session):
    """Guards against a stage's per-shard summary arriving only when the next shard is done
    too (ds.iter_rows() prefetches): progress lines, watchdog ticks and the score job's
    per-output timing would lag a whole shard."""
    import ray.data

    class _Sleeper:  # defined here, so workers get it by value (tests/ is not importable)
        def __call__(self, batch):
            time.sleep(3.0)
            batch["done"] = [time.time()]
            return batch

    # One actor runs the two shards one after the other, in either order; each row says
    # when its shard finished, so the check does not depend on which ran first.
    ds = ray.data.from_items([{"s": 0}, {"s": 1}], override_num_blocks=2).map_batches(
        _Sleeper,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1),
        batch_size=1,
        num_cpus=0.5,
    )
    lags = [time.time() - float(row["done"]) for row in arrivals(ds)]
    assert len(lags) == 2
    assert max(lags) < 1.5, lags  # with iter_rows the first waited ~3 s for the second
