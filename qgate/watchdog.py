"""Stall watchdog: when a stage makes no progress, one line saying what Ray is waiting for.

    with contextlib.closing(shard_summaries(ds, "score")) as summaries:
        for info in summaries:  # progress: a shard's summary arrives
            ...
    with Watchdog("warmup", ticks=False):  # no ticks: speaks only while Ray waits on something
        trainer.fit()

The line is built from Ray's own state for this job: actors pending creation, placement
groups pending, tasks waiting for a node, and the cluster's total vs available resources:

    [score] no progress for 120 s: 1 actor (MapWorker(MapBatches(ShardScorer))) pending
    creation, needing {CPU: 4}; the cluster has {CPU: 2} available of {CPU: 2} in total

``QGATE_STALL_S`` sets the threshold (default 120 s; 0 turns the watchdog off).

A shard can take longer than that on a slow model. Workers then write heartbeats
(``beat``: rows done of the shard, into a directory beside the outputs) and the driver
passes a ``Heartbeats`` reader as ``progress``: a beat counts as progress, a stall line
names the last one, and a shard that runs long gets a progress line a minute:

    [score] shard 00000-000003, 768 of 5000 rows done
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

STALL_ENV = "QGATE_STALL_S"
DEFAULT_STALL_S = 120.0
HEARTBEAT_LINE_S = 60.0  # a progress line from heartbeats at most this often
_PG_RESOURCE = re.compile(r"^(.+?)_group_(?:\d+_)?[0-9a-f]{16,}$")  # CPU_group_0_<pg id>


def arrivals(ds):
    """A dataset's rows as their blocks finish: what a stage's per-shard summaries are read
    through. ``ds.iter_rows()`` prefetches, so it hands over a shard's summary only when
    the next shard is done too (measured on Ray 2.60: a 2 s shard before a 10 s one arrived
    at 14 s), which delays progress lines and watchdog ticks by a shard and stretches
    timings; without prefetch it arrives at 4.5 s."""
    for batch in ds.iter_batches(batch_size=None, prefetch_batches=0, batch_format="numpy"):
        cols = list(batch)
        for i in range(len(batch[cols[0]]) if cols else 0):
            yield {c: batch[c][i] for c in cols}


def shard_summaries(ds, stage: str, progress=None):
    """Each shard's summary (the ``info`` JSON column of a per-shard stage) once, as its
    shard finishes, with the stall watchdog ticking. A retried shard (its actor or task
    died after reporting) reports twice; its files were replaced, so the repeat is dropped.
    A summary with an ``output`` (the score job's corpus or head negatives) is keyed by it.
    Close it (``contextlib.closing``) so that a consumer that raises stops the dataset then
    and there: one still referenced (bound to a name in a frame that a kept traceback holds)
    goes on scoring and writing in the background (measured on Ray 2.60). ``progress``
    (e.g. ``Heartbeats``) is passed to the watchdog, with a progress line a minute."""
    seen: set[tuple] = set()
    dog = Watchdog(stage, progress=progress, progress_every=HEARTBEAT_LINE_S if progress else None)
    for row in dog.watch(arrivals(ds)):
        info = json.loads(row["info"])
        key = (info.get("output"), info["shard"])
        if key not in seen:
            seen.add(key)
            yield info


def beat(directory: str, shard: str, done: int, total: int) -> None:
    """Record, from the worker scoring ``shard``, that ``done`` of its ``total`` rows are
    done: what keeps the driver's watchdog quiet while a long shard is being worked on.
    Best effort: a heartbeat that cannot be written (its directory gone, a full disk) is
    skipped, never the shard's failure."""
    from qgate.atomic import write_json

    with contextlib.suppress(OSError):
        write_json(os.path.join(directory, f"{shard}.json"), [done, total], indent=None)


def end_beat(directory: str, shard: str) -> None:
    """Remove ``shard``'s heartbeat once its summary is on its way (it no longer needs one)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(directory, f"{shard}.json"))


class Heartbeats:
    """The driver's view of the workers' heartbeats in some directories: called, it returns
    ``(key, text)`` for the newest beat, or None when there is none. ``key`` changes with
    every beat and starts with the beat's mtime (ns); ``text`` says what it reported."""

    def __init__(self, directories: list[str]) -> None:
        self.directories = list(directories)

    def __call__(self) -> tuple | None:
        newest = None
        for d in self.directories:
            with contextlib.suppress(FileNotFoundError):
                for entry in os.scandir(d):
                    if not entry.name.endswith(".json"):  # an atomic writer's temp file
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        mtime = entry.stat().st_mtime_ns
                        if newest is None or mtime > newest[0]:
                            newest = (mtime, entry.path)
        if newest is None:
            return None
        try:
            with open(newest[1], encoding="utf-8") as f:
                done, total = json.load(f)
        except (OSError, ValueError, TypeError):  # removed or replaced meanwhile
            return None
        shard = os.path.basename(newest[1])[: -len(".json")]
        return (*newest, done), f"shard {shard}, {done} of {total} rows done"


def stall_seconds_from_env() -> float:
    """QGATE_STALL_S as seconds (default 120; 0 = off). ValueError names a bad value."""
    raw = os.environ.get(STALL_ENV, "").strip()
    if not raw:
        return DEFAULT_STALL_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(
            f"{STALL_ENV}={raw!r} is not a number of seconds (0 turns it off)"
        ) from None
    if value < 0:
        raise ValueError(f"{STALL_ENV} must be >= 0 seconds (0 turns it off), got {raw!r}")
    return value


@dataclass
class Pending:
    """What Ray is waiting on for this job, from its state API and resource view."""

    actors: list[tuple[str, dict]] = field(default_factory=list)  # (class, resources) each
    building: list[tuple[str, int]] = field(default_factory=list)  # (class, pid): __init__ runs
    groups: list[tuple[list[dict], int]] = field(default_factory=list)  # (bundles, actors in it)
    tasks: list[tuple[str, dict]] = field(default_factory=list)  # (function, resources) each
    total: dict = field(default_factory=dict)
    available: dict = field(default_factory=dict)
    error: str | None = None  # what could not be asked

    @property
    def waiting(self) -> bool:
        return bool(self.actors or self.groups or self.tasks)


def _plain(resources: dict | None) -> dict:
    """{CPU: 4.0, CPU_group_0_<id>: 4.0, bundle_group_<id>: 0.001} -> {CPU: 4.0}."""
    out: dict[str, float] = {}
    for key, value in (resources or {}).items():
        m = _PG_RESOURCE.match(key)
        base = m.group(1) if m else key
        if base == "bundle" or not value:
            continue
        out[base] = max(out.get(base, 0.0), float(value))
    return out


def _fmt(resources: dict) -> str:
    def one(key, value):
        if "memory" in key:
            return f"{key}: {value / 2**30:.1f} GiB"
        return f"{key}: {value:g}"

    return "{" + ", ".join(one(k, resources[k]) for k in sorted(resources)) + "}"


def _bundles(bundles: list[dict]) -> str:
    shown = [_fmt(b) for b in bundles]
    if shown and len(set(shown)) == 1:
        return f"{len(shown)} x {shown[0]}"
    return "[" + ", ".join(shown) + "]"


def _counted(items: list[tuple[str, dict]], noun: str, verb: str) -> list[str]:
    counts = Counter((name, tuple(sorted(res.items()))) for name, res in items)
    out = []
    for (name, res), n in counts.most_common(3):
        if res:
            need = ("each needing " if n > 1 else "needing ") + _fmt(dict(res))
        else:  # nothing to schedule: its worker process (or runtime env) is still starting
            need = "needing no resources (its worker process or runtime env is starting)"
        out.append(f"{n} {noun}{'s' if n > 1 else ''} ({name}) {verb}, {need}")
    if len(counts) > 3:
        out.append(f"{len(counts) - 3} more kinds of {noun}s {verb}")
    return out


def describe(p: Pending) -> str:
    """One line: what is pending, what it needs, what the cluster has (total and free)."""
    parts = _counted(p.actors, "actor", "pending creation")
    for name, n in Counter(name for name, _ in p.building).most_common(3):
        pids = ", ".join(str(pid) for c, pid in p.building if c == name)
        parts.append(
            f"{n} actor{'s' if n > 1 else ''} ({name}) still in {'their' if n > 1 else 'its'} "
            f"constructor (pid {pids}; loading a large model can take minutes)"
        )
    for bundles, n_actors in p.groups[:3]:
        inside = f" ({n_actors} actor{'s' if n_actors != 1 else ''} wait in it)" if n_actors else ""
        parts.append(f"1 placement group pending{inside}, needing {_bundles(bundles)}")
    if len(p.groups) > 3:
        parts.append(f"{len(p.groups) - 3} more placement groups pending")
    parts += _counted(p.tasks, "task", "waiting for a node")
    demands = [r for _, r in p.actors] + [b for bs, _ in p.groups for b in bs]
    demands += [r for _, r in p.tasks]
    keys = {k for d in demands for k in d} or {"CPU"}
    keys |= {"GPU"} & set(p.total)
    have = {k: p.available.get(k, 0.0) for k in keys}
    total = {k: p.total.get(k, 0.0) for k in keys}
    cluster = f"the cluster has {_fmt(have)} available of {_fmt(total)} in total"
    never = sorted({k for d in demands for k, v in d.items() if v > total.get(k, 0.0)})
    if never:
        cluster += (
            f"; more {', '.join(never)} than the whole cluster has: ask for less or add nodes"
        )
    if parts:
        line = "; ".join(parts) + "; " + cluster
    elif p.error:
        line = f"nothing known to be pending; {cluster}"
    else:
        line = (
            f"nothing in this job waits for resources; {cluster}: the running work is slow "
            "or stuck (see the Ray dashboard or the worker logs)"
        )
    return line + (f" ({p.error})" if p.error else "")


def query_pending() -> Pending:
    """This job's pending actors, placement groups and tasks, with total/available resources."""
    import ray
    from ray.util import state

    p = Pending(total=ray.cluster_resources(), available=ray.available_resources())
    ctx = ray.get_runtime_context()
    job = ctx.get_job_id()
    # An explicit address: with none, the state API looks for "the" cluster on this machine.
    kw = {"address": ctx.gcs_address, "detail": True, "timeout": 10}
    kw["raise_on_missing_output"] = False
    try:
        groups = state.list_placement_groups(
            filters=[("state", "=", "PENDING"), ("creator_job_id", "=", job)], **kw
        )
        actors = state.list_actors(
            filters=[("state", "=", "PENDING_CREATION"), ("job_id", "=", job)], **kw
        )
        tasks = state.list_tasks(
            filters=[
                ("state", "=", "PENDING_NODE_ASSIGNMENT"),
                ("job_id", "=", job),
                ("type", "=", "NORMAL_TASK"),
            ],
            **kw,
        )
    except Exception as e:  # no dashboard (include_dashboard=False), Ray Client, ...
        p.error = f"actors and tasks unknown: Ray's state API did not answer: {e}"[:300]
        table = ray.util.placement_group_table().values()  # straight from the GCS
        p.groups = [
            ([_plain(b) for b in g["bundles"].values()], 0)
            for g in table
            if g.get("state") == "PENDING"
        ]
        return p
    in_group = Counter()
    pending_groups = {g.placement_group_id for g in groups}
    for a in actors:
        if a.pid:  # placed, its process up: PENDING_CREATION lasts while __init__ runs
            p.building.append((a.class_name, a.pid))
        elif a.placement_group_id in pending_groups:
            in_group[a.placement_group_id] += 1
        else:
            p.actors.append((a.class_name, _plain(a.required_resources)))
    p.groups = [
        ([_plain(b.get("unit_resources")) for b in g.bundles or []], in_group[g.placement_group_id])
        for g in groups
    ]
    p.tasks = [(t.func_or_class_name or t.name, _plain(t.required_resources)) for t in tasks]
    return p


class Watchdog:
    """A background thread that prints one line when the stage stalls (see the module doc).

    ``ticks=True``: a stall is ``stall_seconds`` without ``tick()`` or a change in
    ``progress()`` (a ``Heartbeats``: see the module doc); the line then says what Ray waits
    on, or that nothing is pending, and the last heartbeat. With ``progress_every``, a
    heartbeat that comes that long after the last tick or progress line is printed.
    ``ticks=False`` (the caller cannot tick, e.g. around ``trainer.fit()``): a stall is Ray
    having something pending for ``stall_seconds``.
    One line per stall; the next tick (or the pending work starting) re-arms it.
    """

    def __init__(
        self,
        stage: str,
        stall_seconds: float | None = None,
        *,
        ticks: bool = True,
        probe=query_pending,
        progress=None,
        progress_every: float | None = None,
        out=None,
        poll_s: float | None = None,
    ) -> None:
        self.stage = stage
        self.stall_seconds = (
            stall_seconds_from_env() if stall_seconds is None else float(stall_seconds)
        )
        self.ticks = ticks
        self.lines: list[str] = []  # what was printed
        self._probe = probe
        self._progress = progress
        self._mark = None  # progress()'s last answer
        self.progress_every = progress_every
        self._out = out
        self._poll = poll_s or min(max(self.stall_seconds / 4, 0.25), 15.0)
        self._last = self._since = self._shown = time.monotonic()
        self._reported = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Watchdog:
        if self.stall_seconds > 0:
            self._last = self._since = self._shown = time.monotonic()
            self._thread = threading.Thread(
                target=self._run, name=f"qgate-watchdog-{self.stage}", daemon=True
            )
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)  # a probe in flight is not waited for; it stays quiet

    def tick(self) -> None:
        """The stage made progress (and said so: progress lines count from here). The last
        heartbeat is forgotten: it may be of the shard that just finished."""
        self._last = self._shown = time.monotonic()
        self._reported, self._mark = False, None

    def watch(self, items):
        """Yield from ``items`` with the watchdog running; each item is a tick."""
        with self:
            for item in items:
                self.tick()
                yield item

    def _run(self) -> None:
        while not self._stop.wait(self._poll):
            try:
                self._check()
            except Exception as e:  # the watchdog must never take the stage down
                self._say(f"stall watchdog error: {type(e).__name__}: {e}")
                return

    def _check(self) -> None:
        now = time.monotonic()
        if self.ticks:
            mark = self._progress() if self._progress is not None else None
            if mark is not None and (self._mark is None or mark[0] != self._mark[0]):
                self._mark, self._last, self._reported = mark, now, False
                if self.progress_every and now - self._shown >= self.progress_every:
                    self._shown = now
                    self._say(mark[1])
                return
            idle = now - self._last
            if self._reported or idle < self.stall_seconds:
                return
            p = self._probe()
            self._reported = True
            last = f" (last heartbeat: {self._mark[1]})" if self._mark else ""
            self._say(f"no progress for {idle:.0f} s{last}: {describe(p)}")
            return
        p = self._probe()
        if not p.waiting:  # Ray is not waiting on anything: training is running
            self._since, self._reported = now, False
            return
        waited = now - self._since
        if waited >= self.stall_seconds and not self._reported:
            self._reported = True
            self._say(f"no progress for {waited:.0f} s: {describe(p)}")

    def _say(self, msg: str) -> None:
        if self._stop.is_set():
            return
        line = f"[{self.stage}] {msg}"
        self.lines.append(line)
        print(line, file=self._out or sys.stderr, flush=True)
