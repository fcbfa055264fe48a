"""Stage 1: train the quality gates of a frozen base model on Ray Train.

python -m jobs.warmup --config jobs/configs/warmup.yaml [key=value ...]
"""

from __future__ import annotations

import random
import sys

from jobs.common import init_ray, parse, stage_run, write_config
from qgate.config import WarmupConfig, stage_dir
from qgate.data import expand_paths, read_corpus
from qgate.model import check_base, resolve_base


def subset(rows: list[dict], cfg: WarmupConfig) -> list[dict]:
    """Seeded subset of the corpus (count, else ratio), independent of file order."""
    rows = sorted(rows, key=lambda r: r["sample_id"])
    n = cfg.subset_count or max(1, round(cfg.subset_ratio * len(rows)))
    return sorted(
        random.Random(cfg.seed).sample(rows, min(n, len(rows))), key=lambda r: r["sample_id"]
    )


def load_rows(cfg: WarmupConfig) -> tuple[list[dict], list[dict]]:
    """Validate inputs (fail fast, before Ray) and read pool and target rows."""
    check_base(cfg.base_model)
    expand_paths(cfg.corpus)
    if cfg.target:
        expand_paths(cfg.target)
    rows, rejects = read_corpus(cfg.corpus)
    if not rows:
        raise ValueError(f"no usable rows in {cfg.corpus} ({len(rejects)} rejected)")
    rows = subset(rows, cfg)
    if cfg.loss == "contrast":  # the second stream: corrupted copies of the pool rows
        from qgate.corruption import make_negatives

        return rows, make_negatives(rows, cfg.corruptions, cfg.seed)
    targets = read_corpus(cfg.target)[0] if cfg.loss == "target_balanced" else []
    return rows, targets


def run(cfg: WarmupConfig) -> dict:
    """Run the warmup stage and return its summary."""
    from qgate.training import fit

    rows, targets = load_rows(cfg)
    init_ray()
    summary = fit("warmup", cfg, rows, targets, tokenizer_path=resolve_base(cfg.base_model))
    write_config(cfg, stage_dir(cfg.run_dir, "warmup"))
    return summary


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    cfg = parse(WarmupConfig, argv, __doc__)
    try:
        with stage_run(cfg.run_dir, "warmup"):
            s = run(cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"warmup: {e}", file=sys.stderr)
        return 2
    last = s["last"]
    print(
        f"warmup done: {s['steps']} steps on {s['rows']} rows (+{s['targets']} target) in "
        f"{s['wall_s']:.1f}s; lm {last.get('lm_loss', float('nan')):.4f} "
        f"quality {last.get('quality_loss', float('nan')):.4f} "
        f"{last.get('tokens_per_s', 0):.0f} tok/s -> {s['out_dir']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
