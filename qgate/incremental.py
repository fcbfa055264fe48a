"""Incremental selection (``qgate extend``): grow a selection with newly scored rows.

The new rows' scores are decided under the existing reference, exactly as
:func:`qgate.selection.decide` (and so ``POST /v1/select``) decides them: same percentile
tables, cutoffs and clusters, so a row passes here iff a full re-selection on the same
reference would select it. Passing rows, best score first, are committed to the selection
log (:mod:`qgate.selection_log`), which refuses copies of the pool and of earlier commits
and applies the quota. Nothing already scored is read again but the pool's signatures.

When to recalibrate: the reference's percentiles describe the pool it was fitted on. Once
the log holds ``recalibrate_after`` (default 20%) of the pool's size, or the new rows pass
at a rate far from the pool's (the sources or the data drifted), re-run ``qgate select``
with ``more_scores`` naming the new scores directories: one reference over everything.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter

import pyarrow.parquet as pq

from qgate.config import ExtendConfig, MinHash, stage_dir
from qgate.reference import Reference
from qgate.scores import (
    SelectionError,
    check_comparable,
    iter_score_batches,
    list_matrix,
    read_manifest,
    score_parts,
)
from qgate.selection import PROMPT_FEATURES, decide, join_corpus
from qgate.selection_log import COMMITTED, NOT_SELECTED, SelectionLog, pool_identity

DRIFT_FACTOR = 2.0
"""New rows passing at more than this factor above or below the pool's rate: recalibrate."""


def reference_digest(path: str) -> str:
    """Short content digest of a reference.json (recorded with every commit)."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def reference_scores_dirs(reference: Reference) -> list[str]:
    """The scores directories a reference was fitted on (from its stored select config)."""
    cfg = reference.config or {}
    first = cfg.get("scores") or stage_dir(cfg.get("run_dir", "runs/demo"), "scores")
    return [first, *(cfg.get("more_scores") or [])]


def read_samples(scores_dirs: list[str], reference: Reference) -> list[dict]:
    """Per-row stats dicts, as :func:`qgate.selection.decide` takes them, plus the text
    identity columns when present."""
    samples: list[dict] = []
    feats = reference.features if reference.diversity else None
    for d in scores_dirs:
        m = read_manifest(d)
        check_comparable(m, reference.to_dict(), d, "the reference")
        parts = score_parts(d, m)
        names = set(pq.ParquetFile(parts[0]).schema_arrow.names)
        cols = ["sample_id", "source", "nll", "ifd", "n_loss_tokens", "gate"]
        cols += [c for c in ("text_key", "minhash") if c in names]
        if feats and feats not in cols:
            cols.append(feats)
        prompt = PROMPT_FEATURES if reference.calibration_centroids is not None else None
        if prompt:
            if prompt not in names:
                raise SelectionError(
                    f"{d}: the reference ranks within prompt clusters (calibration: cluster) but"
                    f" these scores have no {prompt} column (scored by an older qgate)"
                )
            cols.append(prompt)
        for _, batch in iter_score_batches(parts, cols):
            gate = list_matrix(batch.column("gate"), "gate")
            emb = list_matrix(batch.column(feats), feats) if feats and feats != "gate" else None
            pe = list_matrix(batch.column(prompt), prompt) if prompt else None
            mh = (
                batch.column("minhash").flatten().to_numpy().reshape(batch.num_rows, -1)
                if "minhash" in cols
                else None
            )
            py = {
                c: batch.column(c).to_pylist()
                for c in cols
                if c not in ("gate", "minhash", feats, prompt)
            }
            for i in range(batch.num_rows):
                s = {c: py[c][i] for c in py}
                s["gate"] = gate[i]
                if emb is not None:
                    s[feats] = emb[i]
                if mh is not None:
                    s["minhash"] = mh[i].tolist()
                if pe is not None:
                    s[prompt] = pe[i]
                samples.append(s)
    return samples


def run_extend(cfg: ExtendConfig) -> dict:
    """Decide the new scores under the reference and commit the passing rows to the log."""
    ref = Reference.load(cfg.reference_path)
    samples = read_samples(list(cfg.scores), ref)
    decisions = decide(ref, samples) if samples else []
    passing = [i for i, d in enumerate(decisions) if d["selected"]]
    passing.sort(key=lambda i: (-decisions[i]["score"], samples[i]["sample_id"]))
    corpus = list(cfg.corpus)
    if not corpus:
        for d in cfg.scores:
            corpus += (read_manifest(d).get("config") or {}).get("corpus") or []
    rows = join_corpus(corpus, [samples[i]["sample_id"] for i in passing]) if passing else []

    mh_block = (ref.scoring or {}).get("minhash")
    minhash = MinHash.from_dict(mh_block) if mh_block else None
    pool_dirs = cfg.pool_scores if cfg.pool_scores is not None else reference_scores_dirs(ref)
    pool = pool_identity(pool_dirs) if minhash else None
    log = SelectionLog(cfg.log_path, minhash, pool, cfg.max_commits)
    digest = reference_digest(cfg.reference_path)
    entries = []
    for i, row in zip(passing, rows, strict=True):
        s, d = samples[i], decisions[i]
        entry = {
            "id": s["sample_id"],
            "source": s["source"],
            "messages": row["messages"],
            "score": d["score"],
            "q": d["q"],
            "margin": d["margin"],
            "method": ref.method,
            "reference_digest": digest,
            "via": "extend",
        }
        if s.get("text_key") is not None:
            entry["text_key"] = bytes(s["text_key"]).hex()
        if s.get("minhash") is not None:
            entry["minhash"] = s["minhash"]
        entries.append(entry)
    results = log.commit(entries)
    counts = Counter(r["status"] for r in results)
    counts[NOT_SELECTED] = len(samples) - len(passing)
    pool_rate = ref.counts["selected"] / max(ref.counts["candidates"], 1)
    new_rate = len(passing) / len(samples) if samples else None
    log_rows = len(log.committed)
    reasons = []
    if log_rows >= cfg.recalibrate_after * ref.counts["scored"]:
        reasons.append(
            f"the log holds {log_rows} samples, {log_rows / ref.counts['scored']:.0%} of the "
            f"{ref.counts['scored']} rows the reference was fitted on"
        )
    if new_rate is not None and samples and len(samples) >= 100:
        ratio = (new_rate + 1e-9) / (pool_rate + 1e-9)
        if ratio > DRIFT_FACTOR or ratio < 1 / DRIFT_FACTOR:
            reasons.append(
                f"new rows pass at {new_rate:.1%} against the pool's {pool_rate:.1%}: the data drifted"
            )
    return {
        "new_rows": len(samples),
        "passed": len(passing),
        "committed": counts.get(COMMITTED, 0),
        "statuses": dict(sorted(counts.items())),
        "log": os.path.abspath(cfg.log_path),
        "log_rows": log_rows,
        "pool_pass_rate": pool_rate,
        "new_pass_rate": new_rate,
        "recalibrate": reasons,
    }
