"""`qgate serve`: the scoring endpoint on a local Ray (Ray Serve + FastAPI) until Ctrl-C.

    qgate serve [--config serve/config.yaml] [--host 127.0.0.1] [--port 8000] [key=value ...]

The config is either a Serve config (serve/config.yaml: its http_options and the `args:` of
the serve.app application) or a plain mapping of ServeConfig fields. key=value overrides
apply to the ServeConfig fields. Binding to anything but loopback needs an API key.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys
import time

from jobs.common import init_ray
from qgate import cluster
from qgate.config import ConfigError, ServeConfig
from qgate.config_io import apply_overrides, build, read_yaml, resolve_paths

DEFAULT_HTTP = {"host": "127.0.0.1", "port": 8000, "request_timeout_s": 60.0}


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load(path: str | None, overrides: list[str]) -> tuple[ServeConfig, dict]:
    """(ServeConfig, http_options) from a Serve config or a ServeConfig mapping + overrides."""
    data, http = {}, dict(DEFAULT_HTTP)
    if path:
        data = read_yaml(path)
        if "applications" in data:
            apps = [
                a
                for a in data["applications"] or []
                if str(a.get("import_path", "")).startswith("serve.app:")
            ]
            if len(apps) != 1:
                raise ConfigError(f"{path}: expected one application with import_path serve.app:*")
            http.update(data.get("http_options") or {})
            data = apps[0].get("args") or {}
    return build(ServeConfig, resolve_paths(apply_overrides(data, overrides))), http


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: deploy locally, print where it listens, block until Ctrl-C."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", help="serve/config.yaml, or a YAML mapping of ServeConfig fields")
    ap.add_argument("--host", help="bind address (default 127.0.0.1)")
    ap.add_argument("--port", type=int, help="port (default 8000)")
    ap.add_argument("--request-timeout-s", type=float, help="HTTP request timeout (408 after)")
    ap.add_argument(
        "--allow-public-without-key",
        action="store_true",
        help="allow a non-loopback bind with no API key (anyone who reaches it can use it)",
    )
    ap.add_argument("overrides", nargs="*", help="ServeConfig key=value overrides")
    args = ap.parse_args(argv)
    try:
        cfg, http = load(args.config, args.overrides)
    except ConfigError as e:
        ap.exit(2, f"config error: {e}\n")
    for key in ("host", "port", "request_timeout_s"):
        if getattr(args, key) is not None:
            http[key] = getattr(args, key)

    from ray import serve

    from serve.app import build as build_app
    from serve.app import read_api_key, resolve_artifacts

    try:
        key = read_api_key(cfg)
        resolve_artifacts(cfg)  # fail here, with the reason, not in a replica restart loop
    except (FileNotFoundError, ValueError) as e:
        print(f"serve: {e}", file=sys.stderr)
        return 2
    if key is None and not _is_loopback(str(http["host"])) and not args.allow_public_without_key:
        print(
            f"serve: refusing to bind {http['host']} without an API key: set ${cfg.api_key_env}"
            " or api_key_file=PATH (or pass --allow-public-without-key)",
            file=sys.stderr,
        )
        return 2
    if os.environ.get("RAY_ADDRESS") and cfg.api_key_env and not cfg.api_key_file:
        print(
            f"note: on an existing cluster the ingress reads ${cfg.api_key_env} from the"
            " cluster's environment, not this shell's",
            file=sys.stderr,
        )
    init_ray()
    serve.start(http_options=http)
    try:
        serve.run(build_app(cfg), name="qgate", route_prefix="/", blocking=False)
    except RuntimeError as e:
        print(f"serve: the application failed to start: {e}", file=sys.stderr)
        serve.shutdown()
        return 1
    url = f"http://{http['host']}:{http['port']}"
    auth = "API key required (Authorization: Bearer ...)" if key else "no API key: open"
    print(f"qgate endpoint at {url}  (docs {url}/docs; {auth}); Ctrl-C stops it", flush=True)
    try:
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, cluster.Terminated):  # Ctrl-C, or SIGTERM: a normal stop
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip shutdown
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("stopping the endpoint", file=sys.stderr, flush=True)
        serve.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
