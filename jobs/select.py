"""Selection stage: RUN/scores -> RUN/selection (selected.jsonl, selection.parquet,
reference.json, report.html).

python -m jobs.select --config jobs/configs/select.yaml [key=value ...]
"""

from __future__ import annotations

import logging
import sys

from jobs.common import parse, stage_run
from qgate.config import SelectConfig, stage_dir
from qgate.config_io import write_config
from qgate.selection import run_selection


def print_summary(s: dict) -> None:
    """A few lines: counts, method, k, cutoffs, label metrics, warnings, output path."""
    print(
        f"selection: {s['selected']}/{s['rows']} rows"
        f" ({s['candidates']} candidates, budget {s['budget']})"
    )
    div = f"k={s['k']}" if s["diversity"] else "no diversity"
    over = f" over {s['signals']}" if s["signals"] else ""
    print(f"method: {s['method']}{over}; {div}")
    if s["gate_score"]:
        print(f"gate score: {s['gate_score']}")
    cuts = f"global cutoff {s['cutoff_global']:.6g}"
    if s["cutoff_per_cluster_range"]:
        lo, hi = s["cutoff_per_cluster_range"]
        cuts += f"; per-cluster cutoffs {lo:.6g} .. {hi:.6g}"
    print(cuts)
    if s["label_metrics"]:
        m = s["label_metrics"]
        by_type = ", ".join(f"{t} {v:.3f}" for t, v in m["auroc_by_type"].items() if v is not None)
        print(
            f"labels: AUROC {m['auroc']:.3f} ({by_type}); noise share of the selection"
            f" {m['noise_share_selected']:.1%}"
        )
    for w in s["warnings"]:
        print(f"warning: {w}")
    report = f" (report: {s['report']})" if s["report"] else ""
    print(f"output: {s['output']}{report}")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    cfg = parse(SelectConfig, argv, __doc__)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        with stage_run(cfg.run_dir, "select"):
            s = run_selection(cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"select: {e}", file=sys.stderr)
        return 2
    out_dir = cfg.output or stage_dir(cfg.run_dir, "selection")
    if "://" not in out_dir:
        write_config(cfg, out_dir)
    print_summary(s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
