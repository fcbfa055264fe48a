"""Run status at a glance: each stage's state, rows, time and key figures, from RUN/.

Two sources, so the table is right for any run:

- the stage ledger ``RUN/_status/<stage>.json``, which each entry point writes through
  :func:`track` (running / done / failed with the error line);
- the stage's own artifacts (manifests, markers, checkpoints, results), which say what is
  really on disk (a finished stage, or a partial one that a re-launch will resume).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import time
import traceback

from qgate.atomic import write_json

LEDGER_DIR = "_status"
STAGES = ("dedup", "warmup", "score", "select", "extend", "finetune", "evaluate")
DONE, PARTIAL, RUNNING, FAILED, NOT_RUN = "done", "partial", "running", "failed", "not run"


@contextlib.contextmanager
def track(run_dir: str | None, stage: str):
    """Record a stage run in the ledger: running now, then done (with its wall time) or
    failed (with the error's last line). Yields a dict the caller may add figures to."""
    if not run_dir or "://" in run_dir:
        yield {}
        return
    path = os.path.join(run_dir, LEDGER_DIR, f"{stage}.json")
    t0 = time.time()
    entry = {"stage": stage, "state": RUNNING, "started": _now(), "pid": os.getpid()}

    def record(e: dict) -> None:  # never creates the run dir: a refused run leaves no trace
        if os.path.isdir(run_dir):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_json(path, e)

    record(entry)
    extra: dict = {}
    try:
        yield extra
    except BaseException as e:
        line = traceback.format_exception_only(type(e), e)[-1].strip()
        record(entry | {"state": FAILED, "error": line, "wall_s": round(time.time() - t0, 1)})
        raise
    record(entry | {"state": DONE, "wall_s": round(time.time() - t0, 1), **extra})


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _lines(path: str) -> list[dict]:
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return []


def _reasons(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"


def _dedup(d: str) -> dict | None:
    m = _json(os.path.join(d, "_manifest.json"))
    if m:
        return {
            "state": DONE,
            "rows": m["rows_in"],
            "wall_s": m.get("wall_s"),
            "figures": f"kept {m['kept']}; removed {_reasons(m['rejects_by_reason'])}",
        }
    plan = _json(os.path.join(d, "_plan.json"))
    if plan:
        done = len(glob.glob(os.path.join(d, "_shards", "*.json")))
        return {"state": PARTIAL, "figures": f"{done}/{len(plan['shards'])} shards signed"}
    return None


def _scores(d: str) -> dict | None:
    m = _json(os.path.join(d, "_manifest.json"))
    if m and m.get("complete"):
        rate = f"; {m['tokens_per_s']:.0f} tok/s" if m.get("tokens_per_s") else ""
        return {
            "state": DONE,
            "rows": m["rows_in"],
            "wall_s": m.get("wall_s"),
            "figures": f"scored {m['scored']}; rejected {_reasons(m['rejects_by_reason'])}"
            f"{rate}" + (f"; {m['dtype']}" if m.get("dtype") else ""),
        }
    plan = _json(os.path.join(d, "_plan.json"))
    if plan:
        from qgate.scores import PROGRESS_DIR
        from qgate.watchdog import Heartbeats

        done = len(glob.glob(os.path.join(d, "_shards", "*.json")))
        rows = sum(s["stop"] - s["start"] for s in plan["shards"])
        figures = f"{done}/{len(plan['shards'])} shards scored (re-launch resumes)"
        beat = Heartbeats([os.path.join(d, PROGRESS_DIR)])()
        if beat:  # a running job's newest heartbeat (or a killed one's last)
            age = max(0.0, time.time() - beat[0][0] / 1e9)
            figures += f"; last heartbeat {age:.0f} s ago: {beat[1]}"
        return {"state": PARTIAL, "rows": rows, "figures": figures}
    return None


def _training(d: str, run_dir: str, stage: str) -> dict | None:
    hist = _lines(os.path.join(d, "metrics.jsonl"))
    done = os.path.isfile(os.path.join(d, "qgate.json")) or os.path.isfile(
        os.path.join(d, "adapter", "adapter_config.json")
    )
    if hist and done:
        last = hist[-1]
        fig = f"step {last['step']}; lm loss {last['lm_loss']:.3g}"
        if "quality_loss" in last:
            fig += f"; quality loss {last['quality_loss']:.3g}"
        return {"state": DONE, "figures": fig + f"; {last.get('tokens_per_s', 0):.0f} tok/s"}
    ckpts = glob.glob(
        os.path.join(run_dir, "ray_train", f"{stage}-*", "checkpoint_*", "metrics.jsonl")
    )
    if ckpts:
        steps = max((_lines(p) or [{"step": 0}])[-1]["step"] for p in ckpts)
        return {"state": PARTIAL, "figures": f"checkpoint at step {steps} (re-launch resumes)"}
    return None


def _selection(d: str) -> dict | None:
    ref = _json(os.path.join(d, "reference.json"))
    if not ref:
        return None
    c = ref["counts"]
    signals = f"({', '.join(ref['signals'])})" if ref.get("signals") else ""
    fig = f"selected {c['selected']}/{c['scored']} by {ref['method']}{signals}"
    log = os.path.join(d, "log.jsonl")
    if os.path.exists(log):
        fig += f"; log {len(_lines(log))} samples"
    return {"state": DONE, "rows": c["scored"], "figures": fig}


def _evaluation(d: str) -> dict | None:
    r = _json(os.path.join(d, "results.json"))
    if not r:
        return None
    scores = []
    for task, m in (r.get("tasks") or {}).items():
        em = m.get("exact_match")
        scores.append(f"{task} exact match {em:.3g}" if isinstance(em, int | float) else task)
    return {"state": DONE, "wall_s": r.get("wall_s"), "figures": "; ".join(scores)}


READERS = {
    "dedup": ("dedup", _dedup),
    "warmup": ("warmup", None),
    "score": ("scores", _scores),
    "select": ("selection", _selection),
    "finetune": ("finetune", None),
    "evaluate": ("eval", _evaluation),
}


def run_status(run_dir: str) -> list[dict]:
    """One entry per stage (and per variant directory, e.g. selection_random): state, rows,
    wall seconds, key figures, and the ledger's error line for a failed run."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"no run directory {run_dir}")
    out = []

    def ledger_of(name: str) -> dict:
        return _json(os.path.join(run_dir, LEDGER_DIR, f"{name}.json")) or {}

    for stage in STAGES:
        ledger = ledger_of(stage)
        dirname, reader = READERS.get(stage, (None, None))
        dirs = sorted(glob.glob(os.path.join(run_dir, f"{dirname}*"))) if dirname else []
        dirs = [d for d in dirs if os.path.isdir(d)]
        found = False
        for d in dirs:
            info = _training(d, run_dir, stage) if stage in ("warmup", "finetune") else reader(d)
            if info is None:
                continue
            found = True
            name = stage + os.path.basename(d)[len(dirname) :]
            out.append(_merge(name, info, ledger_of(name)))
        if not found:
            info = {"state": NOT_RUN}
            if stage == "extend" and ledger:
                info = {"state": ledger.get("state", NOT_RUN), "figures": ledger.get("figures", "")}
            out.append(_merge(stage, info, ledger))
    return out


def _merge(name: str, info: dict, ledger: dict) -> dict:
    """Artifacts say what is on disk; the ledger adds a failure or a run in progress."""
    entry = {
        "stage": name,
        "state": info["state"],
        "rows": info.get("rows"),
        "wall_s": info.get("wall_s"),
        "figures": info.get("figures", ""),
        "error": None,
    }
    state = ledger.get("state")
    if state == FAILED and info["state"] != DONE:
        entry["state"], entry["error"] = FAILED, ledger.get("error")
    elif state == FAILED:  # an older success on disk, the last attempt failed
        entry["error"] = ledger.get("error")
    elif state == RUNNING and info["state"] != DONE:
        entry["state"] = RUNNING
    if entry["wall_s"] is None and ledger.get("wall_s") is not None:
        entry["wall_s"] = ledger["wall_s"]
    return entry


def format_status(run_dir: str, rows: list[dict]) -> str:
    """The status table as text."""
    head = f"{'stage':<18} {'state':<9} {'rows':>8} {'time':>8}  figures"
    lines = [f"run {os.path.abspath(run_dir)}", head, "-" * len(head)]
    for r in rows:
        rows_s = f"{r['rows']:,}" if isinstance(r["rows"], int) else ""
        wall = f"{r['wall_s']:.0f}s" if isinstance(r["wall_s"], int | float) else ""
        figures = r["figures"] + (f"  error: {r['error']}" if r["error"] else "")
        lines.append(f"{r['stage']:<18} {r['state']:<9} {rows_s:>8} {wall:>8}  {figures}")
    return "\n".join(lines)
