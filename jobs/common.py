"""Shared plumbing of the thin stage entry points: argument parsing, Ray start, config files."""

from __future__ import annotations

import argparse
import contextlib
import os

from qgate.config import ConfigError
from qgate.config_io import load_config


def parse(cls, argv, description: str):
    """Parse ``--config FILE [key=value ...]`` into config dataclass ``cls``."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--config", help="YAML config file (see jobs/configs/)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, dotted for sections")
    ap.add_argument(
        "--verbose", action="store_true", help="show Ray's and the libraries' logs on the terminal"
    )
    args = ap.parse_args(argv)
    if args.verbose:
        os.environ["QGATE_VERBOSE"] = "1"
    try:
        return load_config(cls, args.config, args.overrides)
    except ConfigError as e:
        ap.exit(2, f"config error: {e}\n")


@contextlib.contextmanager
def stage_run(run_dir: str, stage: str, expected: tuple = (FileNotFoundError, ValueError)):
    """One stage run: a quiet terminal with the logs in RUN/logs/<stage>.log
    (qgate.console.quiet) and the stage ledger entry (qgate.status.track). Exceptions of the
    ``expected`` types propagate for the entry point's own message."""
    from qgate.console import quiet
    from qgate.status import track

    with quiet(run_dir, stage, expected), track(run_dir, stage) as figures:
        yield figures


def init_ray() -> None:
    """Embedded local Ray if RAY_ADDRESS is unset, else connect to it (e.g. under `ray job
    submit`); the session is shut down on exit, SIGTERM, Ctrl-C or an error (qgate.cluster)."""
    from qgate import cluster

    cluster.init(log_to_driver=True)
