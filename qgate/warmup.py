"""Stage 1, warmup: train the quality gates of a frozen base model on Ray Train.

:func:`run` reads and checks the corpus (before Ray starts), builds the negatives or target
stream the loss needs, and trains with :func:`qgate.training.fit`; RUN/warmup then holds
the gates (``qgate.json`` + ``gates.safetensors``), metrics.jsonl and config.yaml.
"""

from __future__ import annotations

import json
import os
import random

from qgate import cluster
from qgate.atomic import write_text
from qgate.config import WarmupConfig, stage_dir
from qgate.config_io import write_config
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


def run(cfg: WarmupConfig, fault: dict | None = None) -> dict:
    """Run the warmup stage and return its summary (``fault``: tests only, see fit)."""
    from qgate.training import fit

    rows, targets = load_rows(cfg)
    cluster.init(log_to_driver=True)  # after the checks: bad inputs fail before Ray starts
    summary = fit(
        "warmup", cfg, rows, targets, tokenizer_path=resolve_base(cfg.base_model), fault=fault
    )
    out = stage_dir(cfg.run_dir, "warmup")
    if cfg.head_negatives:
        summary["head_negatives"] = write_head_negatives(cfg, rows, out)
    write_config(cfg, out)
    return summary


def write_head_negatives(cfg: WarmupConfig, rows: list[dict], out: str) -> int:
    """Write corrupted copies of a seeded sample of the warmup rows to OUT/head_negatives.jsonl,
    for the gate head (qgate/gate_head.py); returns how many. Their seed differs from the
    contrast loss's, so the head is fitted on copies the gates did not train on."""
    from qgate.corruption import make_negatives
    from qgate.gate_head import NEGATIVES_FILE

    rng = random.Random(f"head-negatives-{cfg.seed}")
    sample = rng.sample(rows, min(cfg.head_negatives, len(rows)))
    negatives = make_negatives(sample, cfg.corruptions, seed=cfg.seed + 1)
    text = "".join(
        json.dumps(
            {"id": r["sample_id"], "source": r["source"], "messages": r["messages"]},
            ensure_ascii=False,
        )
        + "\n"
        for r in negatives
    )
    write_text(os.path.join(out, NEGATIVES_FILE), text)
    return len(negatives)
