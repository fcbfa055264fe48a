"""Which Ray a run uses, and ending it cleanly: embedded unless RAY_ADDRESS names a cluster.

- ``RAY_ADDRESS`` unset, empty or ``local``: start an embedded local Ray with ``ray.init(address="local")``.
  Ray's plain ``ray.init()`` would instead connect to the cluster named in its "current
  cluster" file (``$RAY_TMPDIR``, else ``$TMPDIR``, else ``/tmp``, then
  ``ray/ray_current_cluster``), which a crashed head leaves behind, and hang there.
- ``RAY_ADDRESS`` set (by the user, or by ``ray job submit`` for the driver): connect to it
  and print one line naming it. A dead address fails at once (the GCS port is probed first),
  and a connect that does not finish within ``QGATE_CONNECT_TIMEOUT_S`` (30 s) ends the
  process with a message. Ray itself would retry a dead GCS 20 times, ~40 s each (measured),
  in ``Node._init_gcs_client``, deaf to SIGTERM meanwhile.
- On exit, SIGTERM, Ctrl-C or an exception the session is shut down: SIGTERM raises
  ``Terminated`` in the main thread, and an atexit hook calls ``ray.shutdown()``. For an
  embedded Ray it then waits up to ``LINGER_S`` for the session's processes (raylet, GCS,
  dashboard, agents, workers) to end and stops any that are left.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import sys
import threading

CONNECT_TIMEOUT_ENV = "QGATE_CONNECT_TIMEOUT_S"
DEFAULT_CONNECT_TIMEOUT_S = 30.0
PROBE_TIMEOUT_S = 5.0  # one TCP connect to the GCS port
LINGER_S = 10.0  # how long an embedded session's processes get to exit after ray.shutdown()

_state = {"embedded": None, "hooked": False}


class Terminated(SystemExit):
    """Raised in the main thread on SIGTERM, so finally blocks and atexit hooks run."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


def _what_to_do(address: str) -> str:
    return (
        f"Start that cluster (`ray start --head`), point RAY_ADDRESS at a live one, or unset "
        f"RAY_ADDRESS to run on an embedded local Ray (now RAY_ADDRESS={address})"
    )


def connect_timeout_s() -> float:
    raw = os.environ.get(CONNECT_TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_CONNECT_TIMEOUT_S
    except ValueError:
        raise SystemExit(f"ray: {CONNECT_TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise SystemExit(f"ray: {CONNECT_TIMEOUT_ENV} must be > 0 seconds, got {raw!r}")
    return value


def _host_port(address: str) -> tuple[str, int]:
    """('host', port) of ``host:port``, ``[v6]:port`` or ``ray://host:port``."""
    rest = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        raise SystemExit(
            f"ray: RAY_ADDRESS={address!r} is not host:port (e.g. 127.0.0.1:6379, the address "
            "`ray start --head` prints); unset it to run on an embedded local Ray"
        )
    return host.strip("[]") or "127.0.0.1", int(port)


def probe(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Raise SystemExit naming ``address`` unless something accepts TCP connections there."""
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except ConnectionRefusedError:
        why = "nothing listens there (connection refused): the head is down or the port is wrong"
    except socket.gaierror as e:
        why = f"the host name does not resolve ({e})"
    except TimeoutError:
        why = f"no answer within {timeout_s:.0f} s (host down, or a firewall drops it)"
    except OSError as e:
        why = str(e)
    raise SystemExit(
        f"ray: cannot reach the Ray cluster at {address}: {why}. {_what_to_do(address)}"
    )


def _resolve(address: str) -> str:
    """The address to connect to; ``auto`` is looked up the way Ray does (its cluster file)."""
    if address.startswith(("http://", "https://")):
        raise SystemExit(
            f"ray: RAY_ADDRESS={address} is a dashboard (job API) URL, not a cluster address. A "
            "stage connects to the GCS address (host:6379, as `ray start --head` prints) or runs "
            "embedded with RAY_ADDRESS unset; for the job CLI use --address or "
            "RAY_API_SERVER_ADDRESS"
        )
    if address != "auto":
        return address
    from ray._private.services import canonicalize_bootstrap_address_or_die

    try:
        return canonicalize_bootstrap_address_or_die("auto")
    except ConnectionError as e:
        raise SystemExit(f"ray: RAY_ADDRESS=auto found no cluster: {e}") from None


def _connect(address: str, **init_kwargs) -> None:
    import ray

    timeout_s = connect_timeout_s()
    target = _resolve(address)
    probe(target)

    def give_up() -> None:  # ray.init blocks in C++ retries; only leaving the process ends it
        print(
            f"ray: could not connect to the Ray cluster at {target} within {timeout_s:.0f} s "
            f"(something listens there, but no Ray GCS answered). {_what_to_do(address)}; "
            f"{CONNECT_TIMEOUT_ENV} sets this limit",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)

    timer = threading.Timer(timeout_s, give_up)
    timer.daemon = True
    timer.start()
    try:
        ray.init(address=target, **init_kwargs)
    except ConnectionError as e:
        raise SystemExit(
            f"ray: cannot connect to the Ray cluster at {target}: {e}. {_what_to_do(address)}"
        ) from None
    finally:
        timer.cancel()
    gcs = ray.get_runtime_context().gcs_address
    said = "" if gcs == address else f" (RAY_ADDRESS={address})"
    print(f"ray: connected to the Ray cluster at {gcs}{said}", flush=True)


def init(**init_kwargs) -> None:
    """Start an embedded Ray, or connect to RAY_ADDRESS; then hook up the clean shutdown.

    ``init_kwargs`` go to ``ray.init`` unchanged. A no-op when Ray is already initialized
    (tests share one session).
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address == "local":  # Ray's own spelling of "start a new local instance"
        address = ""
    if address:
        _connect(address, **init_kwargs)
    else:
        ray.init(address="local", **init_kwargs)  # never the "current cluster" file
    _state["embedded"] = not address
    _install_hooks()


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def _install_hooks() -> None:
    # After ray.init: its core worker puts a crash handler on SIGTERM that can abort the
    # process (exit -6) before any cleanup; this one makes SIGTERM an ordinary exit.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    if not _state["hooked"]:
        atexit.register(shutdown)  # runs before Ray's own atexit hook (LIFO)
        _state["hooked"] = True


def _session_processes() -> list:
    """This process's Ray children (raylet, GCS, dashboard, monitors) and all their descendants."""
    import psutil
    import ray

    ray_dir = os.path.dirname(os.path.abspath(ray.__file__))
    found = []
    for child in psutil.Process().children():
        try:
            if any(ray_dir in part for part in child.cmdline()[:3]):
                found += [child, *child.children(recursive=True)]
        except psutil.Error:
            continue
    return found


def _reap(procs: list, linger_s: float) -> None:
    """Wait up to linger_s for procs to exit; terminate, then kill, the ones that remain."""
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=linger_s)
    if not alive:
        return
    names = sorted({_name(p) for p in alive})
    print(
        f"ray: {len(alive)} process(es) of this session still up {linger_s:.0f} s after "
        f"ray.shutdown() ({', '.join(names)}); stopping them",
        file=sys.stderr,
        flush=True,
    )
    for stop, wait_s in ((psutil.Process.terminate, 3), (psutil.Process.kill, 1)):
        for p in alive:
            with contextlib.suppress(psutil.Error):
                stop(p)
        _, alive = psutil.wait_procs(alive, timeout=wait_s)


def _name(p) -> str:
    import psutil

    try:
        return p.name()
    except psutil.Error:
        return str(p.pid)


def shutdown() -> None:
    """Shut this process's Ray session down (idempotent); Ctrl-C and SIGTERM wait meanwhile.

    An embedded session's processes are waited for (LINGER_S) and stopped if they linger; a
    connected session is only disconnected.
    """
    import ray

    if not ray.is_initialized():
        return
    main = threading.current_thread() is threading.main_thread()
    saved = {}
    if main:  # a second Ctrl-C must not leave the session half shut down
        for sig in (signal.SIGINT, signal.SIGTERM):
            saved[sig] = signal.signal(sig, signal.SIG_IGN)
    try:
        procs = _session_processes() if _state["embedded"] else []
        ray.shutdown()
        if procs:
            _reap(procs, LINGER_S)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
