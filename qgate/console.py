"""What a stage run prints: qgate's own lines on the terminal, everything else in a log file.

:func:`quiet` routes the process's output while a stage runs. Ray's and the libraries'
logs, progress bars, warnings and the workers' forwarded output go to
``RUN/logs/<stage>.log`` only (file descriptors 1 and 2 point there, so C-level writes and
logging handlers follow). Lines qgate writes for people (``[stage] ...`` lines and
``=== ...`` headers, from the driver or forwarded from a worker) also reach the terminal:
progress lines as one live line on a TTY (throttled to one every ``PROGRESS_EVERY_S`` s
elsewhere, e.g. under ``ray job submit``), the rest as they come. An unexpected error prints
one line and the log's path; ``verbose`` (``--verbose``, or ``QGATE_VERBOSE=1``) turns it
all off.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import time
import traceback

KEEP = re.compile(r"^(\[[a-z_]+\] |=== |ray: |\| |warning: )")
"""Lines meant for people: qgate's stage tags, stage headers, tables and warnings."""
PROGRESS = re.compile(r"^\[[a-z_]+\] (step \d+/\d+|([a-z]+ )*shard |signed \d+/)")
"""Lines that update one live progress line (``[score] head negatives shard ..`` too)."""
PROGRESS_EVERY_S = 15.0
_RAY_PREFIX = re.compile(r"^(\x1b\[[0-9;]*m)*\(.*?pid=\d+[^)]*\)(\x1b\[[0-9;]*m)* ?")
"""Ray's prefix of a forwarded worker line: ``(MapWorker(MapBatches(X)) pid=12, ip=..)``."""
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def verbose_requested() -> bool:
    """True with QGATE_VERBOSE=1 (the entry points' ``--verbose`` sets it)."""
    return os.environ.get("QGATE_VERBOSE", "") not in ("", "0")


class _Terminal:
    """The real terminal (a dup of the original stdout), with one live progress line."""

    def __init__(self, fd: int):
        self.f = io.TextIOWrapper(io.FileIO(fd, "w", closefd=True), line_buffering=True)
        self.tty = os.isatty(fd)
        self.live = False
        self.last_progress = 0.0
        self.recent: list[str] = []

    def line(self, text: str) -> None:
        if text in self.recent:  # Ray echoes some worker lines twice (stdout + report)
            return
        self.recent = [*self.recent[-20:], text]
        if PROGRESS.match(text):
            now = time.monotonic()
            if self.tty:
                self.f.write("\r\x1b[K" + text[:200])
                self.live = True
                self.f.flush()
            elif now - self.last_progress >= PROGRESS_EVERY_S:
                self.f.write(text + "\n")
                self.last_progress = now
            return
        if self.live:
            self.f.write("\n")
            self.live = False
        self.f.write(text + "\n")

    def close(self) -> None:
        if self.live:
            self.f.write("\n")
        self.f.flush()
        self.f.close()


class _Router(io.TextIOBase):
    """sys.stdout / sys.stderr during a quiet run: every line to the log, people's lines
    also to the terminal."""

    def __init__(self, log, term: _Terminal):
        self.log, self.term, self.buf = log, term, ""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self.log.write(s)
        self.buf += s
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            plain = _ANSI.sub("", _RAY_PREFIX.sub("", line)).rstrip()
            if KEEP.match(plain):
                self.term.line(plain)
        return len(s)

    def flush(self) -> None:
        self.log.flush()

    def isatty(self) -> bool:
        return False


def _stop_worker_log_forwarding() -> None:
    """Workers' last lines (Ray flushes them at shutdown) would reach the restored terminal
    after the stage's summary: stop forwarding them once the quiet block ends. Ray has no
    public switch for this after ``ray.init``; its print hook checks this module flag."""
    worker = sys.modules.get("ray._private.worker")
    if worker is not None and hasattr(worker, "_worker_logs_enabled"):
        worker._worker_logs_enabled = False


def log_path(run_dir: str | None, stage: str) -> str:
    """RUN/logs/<stage>.log (the system temp dir when there is no local run dir)."""
    root = run_dir if run_dir and "://" not in run_dir else os.environ.get("TMPDIR", "/tmp")
    return os.path.join(root, "logs", f"{stage}.log")


@contextlib.contextmanager
def quiet(run_dir: str | None, stage: str, expected: tuple = (), verbose: bool | None = None):
    """Run a stage with the terminal routing above. Exceptions of the ``expected`` types
    propagate (the entry point prints its own message); any other error prints one line
    with the log path and exits with status 1."""
    if verbose if verbose is not None else verbose_requested():
        yield None
        return
    path = log_path(run_dir, stage)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    log = open(path, "a", encoding="utf-8", errors="backslashreplace", buffering=1)  # noqa: SIM115
    log.write(f"\n----- {stage} {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}\n")
    saved = os.dup(1), os.dup(2)
    term = _Terminal(os.dup(1))
    old = sys.stdout, sys.stderr
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    router = _Router(log, term)
    sys.stdout = sys.stderr = router
    failure = None
    try:
        yield path
    except expected:
        raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        traceback.print_exc(file=log)
        failure = traceback.format_exception_only(type(e), e)[-1].strip()
    finally:
        router.flush()
        _stop_worker_log_forwarding()
        sys.stdout, sys.stderr = old
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        term.close()
        log.close()
    if failure:
        print(f"{stage}: error: {failure}\n  the full trace and logs: {path}", file=sys.stderr)
        raise SystemExit(1)
