"""Stage 2 as a Ray Data job: stream a corpus through a gated-model actor pool, exactly once.

The input is cut into shards of ``rows_per_shard`` rows (per file, by row range). Each
shard goes whole to an actor of a pool that holds the gated model (:class:`ShardScorer`):
it reads, validates, tokenizes and scores the rows, and writes ``part-<shard>.parquet``
(scored rows, input order) and ``rejects/part-<shard>.parquet`` atomically, then a
``_shards/<shard>.json`` marker; the driver sees one summary per shard. Rows a dedup run
(``dedup:``) rejected become rejects here with its reason. A re-launch skips shards with a marker, so an interrupted job finishes without
duplicates. Duplicate sample_ids across shards are resolved at the end (first occurrence
wins, the others become ``duplicate_id`` rejects), and ``_manifest.json`` is written only
when rows in == scored + rejected. When the gates carry head negatives, the same pool scores
them too (their shards queue after the corpus's, into OUT/head_negatives, IFD off): one
model load per job.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qgate.atomic import remove_stale_temps, write_json, write_parquet
from qgate.config import ScoreConfig, stage_dir
from qgate.config_io import to_dict
from qgate.data import (
    DUPLICATE_ID,
    RowError,
    expand_paths,
    iter_raw,
    source_name,
    validate,
)
from qgate.minhash import exact_key, sample_text, signatures
from qgate.readers import plan_shards
from qgate.scores import (
    MANIFEST_FILE,
    PLAN_FILE,
    PROGRESS_DIR,
    REJECT_SCHEMA,
    REJECTS_DIR,
    SCHEMA_VERSION,
    SHARDS_DIR,
    scores_schema,
)

if TYPE_CHECKING:
    from qgate.scorer import ScoringSettings


class ScoringError(RuntimeError):
    """The scoring job cannot continue safely (lost rows, mismatched resume, bad inputs)."""


# ----------------------------------------------------------------------------- planning


# ----------------------------------------------------------------------------- the actor


def read_shard(item: dict, scorer, minhash=None) -> list[dict]:
    """One shard's rows, each tokenized or marked as a reject with a reason (never raises).

    ``item["skip"]`` (JSON ``{row_index: [reason, detail]}``) names rows a dedup run removed:
    they become rejects with its reason. With ``minhash`` (qgate.config.MinHash), scored rows
    also get their ``text_key`` and ``minhash`` signature.
    """
    from qgate.data import UNREADABLE_ROW

    src = source_name(item["path"])
    skip = json.loads(item.get("skip") or "{}")
    out, texts = [], []
    for i, raw in iter_raw(item["path"], item["start"], item["stop"]):
        row = {"row_index": i, "reason": "", "detail": "", "excerpt": "", "truncated": False}
        row["n_tokens"] = 0
        got = validate(raw, src, i)
        if isinstance(got, dict) and str(i) in skip:
            row["sample_id"], row["source"] = got["sample_id"], got["source"]
            row["reason"], row["detail"] = skip[str(i)]
        elif isinstance(got, dict):
            row["sample_id"], row["source"] = got["sample_id"], got["source"]
            try:
                row |= scorer.tokenize(got["messages"])
            except RowError as e:
                row["reason"], row["detail"] = e.reason, str(e)
            except Exception as e:  # a tokenizer or chat-template edge case: this row only
                row["reason"], row["detail"] = UNREADABLE_ROW, f"{UNREADABLE_ROW}: {e!r}"[:500]
            if row["reason"]:
                row["excerpt"] = json.dumps(got["messages"], ensure_ascii=False)[:200]
            elif minhash is not None:
                row["text_key"] = bytes.fromhex(exact_key(got["messages"]))
                texts.append(sample_text(got["messages"]))
        else:
            row |= {"sample_id": got.sample_id, "source": got.source, "reason": got.reason}
            row |= {"detail": got.detail, "excerpt": got.excerpt}
        out.append(row)
    if minhash is not None:
        sigs = iter(signatures(texts, minhash))
        for row in out:
            if "text_key" in row:
                row["minhash"] = next(sigs)
    return out


class ShardScorer:
    """Ray Data actor: reads, tokenizes, scores and writes whole shards, one per call.

    Each shard's parquet files and done-marker are written here, atomically, so scored rows
    never pass through the driver; it only sees one summary per shard. A retried shard (an
    actor died mid-shard) is rewritten from scratch under the same names: exactly once.
    ``outputs`` lists the job's output directories with their scoring settings (the corpus,
    and the gate head's negatives without IFD): one model load serves them all, and each
    shard names its output.
    """

    def __init__(self, base, gates, outputs: list[dict], runtime: dict, fault=None):
        from qgate.config import MinHash
        from qgate.metrics import ScoringMetrics
        from qgate.scorer import Scorer, ScoringSettings

        settings = [ScoringSettings.from_dict(o["settings"]) for o in outputs]
        scorer = Scorer(
            base,
            gates,
            settings[0],
            device=runtime["device"],
            threads=runtime["threads"],
            batch_tokens=runtime["batch_tokens"],
            debug_tokens=runtime["debug_tokens"],
        )
        self.outputs = []
        for o, st in zip(outputs, settings, strict=True):
            minhash = MinHash.from_dict(st.minhash) if st.minhash else None
            num_perm = minhash.num_perm if minhash else None
            schema = scores_schema(
                st.num_layers, st.embedding_dim_out, runtime["debug_tokens"], num_perm
            )
            view = scorer if st == settings[0] else scorer.with_settings(st)
            self.outputs.append(
                {"out": o["out"], "scorer": view, "minhash": minhash, "schema": schema}
            )
        self.window = runtime["batch_rows"]
        self.fault, self.calls = fault or {}, 0
        self.metrics = ScoringMetrics()

    def __call__(self, batch: dict) -> dict:
        """Score every shard descriptor in the batch; returns their summaries (JSON strings)."""
        infos = []
        for j in range(len(batch["shard"])):
            self.calls += 1
            f = self.fault
            if f.get("exit_after") == self.calls and not os.path.exists(f["marker"]):
                open(f["marker"], "w").close()
                os._exit(1)  # test-only fault injection: this actor process dies once
            item = {k: batch[k][j] for k in ("shard", "path", "start", "stop")}
            item["skip"] = batch["skip"][j] if "skip" in batch else None
            output = int(batch["output"][j])
            infos.append(json.dumps(self.run_shard(item, output) | {"output": output}))
        return {"info": np.array(infos, dtype=object)}

    def run_shard(self, item: dict, output: int = 0) -> dict:
        """Read, score and write one shard into output ``output``; returns its summary."""
        from qgate.watchdog import beat, end_beat

        o, shard = self.outputs[output], str(item["shard"])
        beats = os.path.join(o["out"], PROGRESS_DIR)
        t0 = time.perf_counter()
        rows = read_shard(item, o["scorer"], o["minhash"])
        ok = sorted((r for r in rows if not r["reason"]), key=lambda r: -r["n_tokens"])
        for s in range(0, len(ok), self.window):  # length-sorted windows: little padding
            beat(beats, shard, s, len(ok))  # the driver's watchdog: a long shard is alive
            window = ok[s : s + self.window]
            for row, st in zip(window, score_isolating(o["scorer"], window), strict=True):
                row |= st
        info = write_shard(o["out"], shard, rows, o["schema"])
        end_beat(beats, shard)
        info["seconds"] = round(time.perf_counter() - t0, 3)
        self.metrics.shard(info)
        return info


def score_isolating(scorer, rows: list[dict], max_poison: int = 8) -> list[dict]:
    """Score rows; a row on which the model raises or returns non-finite stats is isolated.

    When a batch raises, it is split in halves until the failing rows are found; each one
    gets ``{"reason": scoring_error}`` and the rest are scored. If more than ``max_poison``
    rows of the batch fail alone, the fault is not in the data (out of memory, a broken
    model): the error is raised so the job fails loudly instead of rejecting the corpus.
    """
    from qgate.data import SCORING_ERROR
    from qgate.scorer import finite_stats

    failed = [0]

    def run(part: list[dict]) -> list[dict]:
        try:
            stats = scorer.score(part)
        except Exception as e:
            if len(part) == 1:
                failed[0] += 1
                if failed[0] > max_poison:
                    raise ScoringError(
                        f"scoring failed on more than {max_poison} single samples of one batch;"
                        f" this is not a data problem: {e!r}"
                    ) from e
                return [{"reason": SCORING_ERROR, "detail": f"{SCORING_ERROR}: {e!r}"[:500]}]
            half = len(part) // 2
            return run(part[:half]) + run(part[half:])
        out = []
        for st in stats:
            if finite_stats(st):
                out.append(st)
            else:
                failed[0] += 1
                out.append(
                    {"reason": SCORING_ERROR, "detail": f"{SCORING_ERROR}: non-finite score"}
                )
        if failed[0] > max_poison:
            raise ScoringError(
                f"more than {max_poison} samples of one batch gave non-finite scores"
            )
        return out

    return run(rows)


# ----------------------------------------------------------------------------- writing


def _scores_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    cols = {}
    for f in schema:
        vals = [r[f.name] for r in rows]
        if f.name == "ifd":
            vals = [None if v is None or np.isnan(v) else float(v) for v in vals]
        elif pa.types.is_fixed_size_list(f.type):
            dt = f.type.value_type.to_pandas_dtype()
            flat = np.asarray(vals, dtype=dt).reshape(-1) if vals else np.zeros(0, dt)
            cols[f.name] = pa.FixedSizeListArray.from_arrays(
                pa.array(flat, f.type.value_type), f.type.list_size
            )
            continue
        elif f.name == "token_gates":
            vals = [[list(map(float, layer)) for layer in v] for v in vals]
        elif f.name == "token_nll":
            vals = [list(map(float, v)) for v in vals]
        cols[f.name] = pa.array(vals, type=f.type)
    return pa.table(cols, schema=schema)


def write_shard(out_dir: str, shard: str, rows: list[dict], schema: pa.Schema) -> dict:
    """Write one complete shard (scores + rejects, input order), then its done-marker."""
    rows = sorted(rows, key=lambda r: r["row_index"])
    good = [r for r in rows if not r["reason"]]
    bad = [r for r in rows if r["reason"]]
    write_parquet(_scores_table(good, schema), os.path.join(out_dir, f"part-{shard}.parquet"))
    rej = pa.table({f.name: pa.array([r[f.name] for r in bad], type=f.type) for f in REJECT_SCHEMA})
    write_parquet(rej, os.path.join(out_dir, REJECTS_DIR, f"part-{shard}.parquet"))
    info = {
        "shard": shard,
        "rows": len(rows),
        "scored": len(good),
        "rejected": len(bad),
        "tokens": int(sum(int(r["n_tokens"]) for r in good)),
        "rejects_by_reason": dict(Counter(r["reason"] for r in bad)),
    }
    write_json(os.path.join(out_dir, SHARDS_DIR, f"{shard}.json"), info, indent=None)
    return info


def id_digests(ids: list[str]) -> np.ndarray:
    """8-byte digests of sample_ids: what the duplicate pass keeps per row in the driver."""
    return np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little")
            for i in ids
        ),
        dtype=np.uint64,
        count=len(ids),
    )


def resolve_duplicates(out_dir: str, shards: list[str]) -> int:
    """Move later occurrences of a sample_id (in input order) to ``duplicate_id`` rejects.

    The driver reads only the sample_id column and keeps an 8-byte digest a row; rows whose
    digest repeats are checked against the ids themselves, and only parts that hold a
    duplicate are read whole and rewritten (the scores never pass through the driver).
    Idempotent: the extra rejects go to ``rejects/dup-<shard>.parquet`` (written before the
    part file is rewritten), so a crash here and a re-run give the same result.
    """
    parts = [os.path.join(out_dir, f"part-{shard}.parquet") for shard in shards]
    digests = [
        id_digests(pq.read_table(p, columns=["sample_id"]).column("sample_id").to_pylist())
        for p in parts
    ]
    values, counts = np.unique(
        np.concatenate(digests or [np.zeros(0, np.uint64)]), return_counts=True
    )
    repeated = values[counts > 1]
    seen: set[str] = set()
    moved = 0
    for shard, part, d in zip(shards, parts, digests, strict=True):
        candidates = np.flatnonzero(np.isin(d, repeated))
        if not len(candidates):
            continue
        ids = pq.read_table(part, columns=["sample_id"]).column("sample_id").to_pylist()
        dup = []
        for i in candidates:
            (dup.append(int(i)) if ids[i] in seen else seen.add(ids[i]))
        if not dup:
            continue
        table = pq.read_table(part)
        sources = table.column("source").to_pylist()
        rej = pa.table(
            {
                "sample_id": [ids[i] for i in dup],
                "source": [sources[i] for i in dup],
                "reason": [DUPLICATE_ID] * len(dup),
                "detail": [
                    f"{DUPLICATE_ID}: sample_id {ids[i]!r} already scored earlier in the input"
                    for i in dup
                ],
                "excerpt": [""] * len(dup),
            },
            schema=REJECT_SCHEMA,
        )
        write_parquet(rej, os.path.join(out_dir, REJECTS_DIR, f"dup-{shard}.parquet"))
        keep = np.setdiff1d(np.arange(len(ids)), dup)
        write_parquet(table.take(pa.array(keep)), part)
        moved += len(dup)
    return moved


def _count_rows(paths: list[str]) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in paths)


def _reason_counts(reject_paths: list[str]) -> dict:
    c = Counter()
    for p in reject_paths:
        c.update(pq.read_table(p, columns=["reason"]).column("reason").to_pylist())
    return dict(sorted(c.items()))


# ----------------------------------------------------------------------------- driver


def scoring_dtype(cfg: ScoreConfig) -> str:
    """The concrete dtype every actor scores in, decided once by the driver and recorded."""
    import torch

    from qgate.hardware import dtype_name, resolve_device, resolve_dtype

    if cfg.actors.num_gpus > 0 or cfg.device.startswith("cuda"):
        if cfg.dtype == "auto" and not torch.cuda.is_available():  # a CPU-only driver
            return "bfloat16"
        return dtype_name(resolve_dtype(cfg.dtype, "cuda"))
    return dtype_name(resolve_dtype(cfg.dtype, resolve_device(cfg.device)))


def run_scoring(cfg: ScoreConfig, fault: dict | None = None, head_negatives: bool = True) -> dict:
    """Score the corpus into RUN/scores (or cfg.output); resumable; returns the manifest.

    With ``head_negatives`` the gates' head negatives, if the warmup wrote any, are scored
    too, into OUT/head_negatives by the same actor pool (one model load), before the
    manifest that marks the scores complete is written.

    ``fault`` is for tests only: ``{exit_after: N, marker: PATH}`` makes a scoring actor
    exit once on its N-th shard; ``{stop_after_shards: N}`` stops the driver after N shards.
    """
    from qgate.model import check_base

    check_base(cfg.base_model)
    gates = _warmup_gates(cfg)
    outputs = [_plan_output(cfg, gates, cfg.output or stage_dir(cfg.run_dir, "scores"))]
    sub = _negatives_config(cfg, gates, outputs[0].out) if head_negatives else None
    if sub is not None:
        outputs.append(_plan_output(sub, gates, sub.output, label="head negatives "))
    todo = [dict(s, output=i) for i, o in enumerate(outputs) for s in o.todo]
    if todo:
        _run_pipeline(cfg, gates, outputs, todo, fault or {})
    extra = {}
    if sub is not None:  # the negatives' manifest first: the corpus's one marks all done
        from qgate.gate_head import NEGATIVES_DIR

        m = _finish_output(outputs[1])
        extra["head_negatives"] = {"dir": NEGATIVES_DIR, "scored": m["scored"]}
        extra["head_negatives"]["rejected"] = m["rejected"]
    manifest = _finish_output(outputs[0], extra)
    manifest["output"] = outputs[0].out
    return manifest


@dataclass
class _Output:
    """One output directory of a scoring job: its config, shards, settings and progress."""

    cfg: ScoreConfig
    gates: str | None
    out: str
    label: str
    paths: list[str]
    shards: list[dict]
    todo: list[dict]
    settings: ScoringSettings
    plan: dict
    started: str
    t0: float
    last_report: float | None = None

    @property
    def expected(self) -> dict[str, int]:
        return {s["shard"]: s["stop"] - s["start"] for s in self.shards}


def _plan_output(cfg: ScoreConfig, gates: str | None, out: str, label: str = "") -> _Output:
    """Plan (or re-check, on resume) one output directory; print what is left to score."""
    os.makedirs(os.path.join(out, REJECTS_DIR), exist_ok=True)
    os.makedirs(os.path.join(out, SHARDS_DIR), exist_ok=True)
    shutil.rmtree(os.path.join(out, PROGRESS_DIR), ignore_errors=True)  # a killed run's beats
    os.makedirs(os.path.join(out, PROGRESS_DIR))
    t0, started = time.time(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    paths = expand_paths(cfg.corpus)
    shards = plan_shards(paths, cfg.rows_per_shard)
    dedup, minhash = _dedup_inputs(cfg, paths)
    settings, plan = _fixed_plan(cfg, gates, out, shards, dedup, minhash)
    todo = _shards_to_score(out, shards, dedup)
    if label:
        print(f"[score] the gate {label.strip()}: {', '.join(paths)}", flush=True)
    print(
        f"[score] {label}{len(shards)} shards, {len(shards) - len(todo)} already complete, "
        f"{len(todo)} to score in {settings.dtype} -> {out}",
        flush=True,
    )
    return _Output(cfg, gates, out, label, paths, shards, todo, settings, plan, started, t0)


def _finish_output(o: _Output, extra: dict | None = None) -> dict:
    """Check one output (every row scored or rejected once), remove the temp files a killed
    writer of an earlier run left, and write its manifest."""
    manifest = _manifest(o)
    stale = sum(
        remove_stale_temps(os.path.join(o.out, d), o.t0) for d in ("", REJECTS_DIR, SHARDS_DIR)
    )
    if stale:
        print(f"[score] {o.label}removed {stale} temp file(s) a killed writer left", flush=True)
    shutil.rmtree(os.path.join(o.out, PROGRESS_DIR), ignore_errors=True)
    manifest |= {"inputs": o.paths, "started_at": o.started} | (extra or {})
    manifest["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_json(os.path.join(o.out, MANIFEST_FILE), manifest)
    return manifest


def _negatives_config(cfg: ScoreConfig, gates: str | None, out: str) -> ScoreConfig | None:
    """The config that scores the gates' head negatives (the warmup's corrupted copies,
    qgate/gate_head.py) into OUT/head_negatives: gate columns only (what the head is fitted
    on), so no IFD and no MinHash. None when the gates carry no such file."""
    import dataclasses

    from qgate.gate_head import NEGATIVES_DIR, NEGATIVES_FILE

    path = os.path.join(gates, NEGATIVES_FILE) if gates else None
    if path is None or not os.path.isfile(path):
        return None
    return dataclasses.replace(
        cfg,
        gates=gates,
        corpus=[path],
        output=os.path.join(out, NEGATIVES_DIR),
        ifd=False,
        dedup=None,
        minhash=None,
    )


def _warmup_gates(cfg: ScoreConfig) -> str | None:
    """The gates directory to score with: cfg.gates, a gated base's own, or RUN/warmup; None
    (with a warning) when no warmup ran, so gates stay freshly initialised."""
    gates = cfg.gates or os.path.join(cfg.run_dir, "warmup")
    if not cfg.gates and os.path.isfile(os.path.join(cfg.base_model, "qgate.json")):
        gates = cfg.base_model  # a converted gated directory carries its own gates
    if os.path.isfile(os.path.join(gates, "qgate.json")):
        return gates
    if cfg.gates:
        raise FileNotFoundError(f"gates directory has no qgate.json: {gates}")
    print(
        f"[score] warning: no warmup gates at {gates}; scoring with freshly initialised "
        "gates (perplexity, IFD and embeddings are unaffected; gate scores are untrained)",
        flush=True,
    )
    return None


def _fixed_plan(cfg: ScoreConfig, gates, out: str, shards, dedup, minhash):
    """(ScoringSettings, plan): the plan (shards, digests, settings, dedup) is written once and
    must match on every resume, so one output never mixes two corpora, models or dtypes."""
    from qgate.model import read_meta
    from qgate.scorer import ScoringSettings, loaded_digests

    settings = ScoringSettings.for_model(
        cfg.base_model,
        read_meta(gates) if gates else None,
        scoring_dtype(cfg),
        max_length=cfg.max_length,
        loss_on=cfg.loss_on,
        alpha=cfg.alpha,
        eps=cfg.eps,
        embedding_dim=cfg.embedding_dim,
        embedding_seed=cfg.embedding_seed,
        ifd=cfg.ifd,
        minhash=minhash.to_dict() if minhash else None,
    )
    plan = {"shards": shards, **loaded_digests(cfg.base_model, gates)}
    plan["scoring"] = settings.to_dict()
    if dedup:
        plan["dedup"] = dedup["identity"]
    plan_path = os.path.join(out, PLAN_FILE)
    if not os.path.isfile(plan_path):
        write_json(plan_path, plan)
        return settings, plan
    with open(plan_path) as f:
        if json.load(f) != plan:
            raise ScoringError(
                f"{out} holds scores from a different corpus, model, gates or scoring settings "
                "(dtype included); use a new output path (or delete it) to score again"
            )
    return settings, plan


def _shards_to_score(out: str, shards: list[dict], dedup) -> list[dict]:
    """The planned shards without a done-marker, each with the rows dedup removed from it."""
    done = {
        s[: -len(".json")] for s in os.listdir(os.path.join(out, SHARDS_DIR)) if s.endswith(".json")
    }
    todo = [dict(s) for s in shards if s["shard"] not in done]
    for s in todo:
        dropped = (dedup or {}).get("dropped", {}).get(s["path"], {})
        s["skip"] = json.dumps(
            {str(i): list(v) for i, v in dropped.items() if s["start"] <= i < s["stop"]}
        )
    return todo


def _manifest(o: _Output) -> dict:
    """The scores manifest, after checking that every row in is scored or rejected once.

    ``tokens_per_s`` is this run's: the tokens of the shards it scored over the time until
    their last summary arrived (not the other output's shards, nor the final checks)."""
    from qgate.model import resolve_base

    out, cfg, plan = o.out, o.cfg, o.plan
    shard_ids = [s["shard"] for s in o.shards]
    moved = resolve_duplicates(out, shard_ids)
    infos = {}
    for s in shard_ids:
        with open(os.path.join(out, SHARDS_DIR, f"{s}.json")) as f:
            infos[s] = json.load(f)
    parts = [os.path.join(out, f"part-{s}.parquet") for s in shard_ids]
    rej_dir = os.path.join(out, REJECTS_DIR)
    rejects = sorted(
        os.path.join(rej_dir, p) for p in os.listdir(rej_dir) if p.endswith(".parquet")
    )
    rows_in = sum(o.expected.values())
    scored, rejected = _count_rows(parts), _count_rows(rejects)
    if rows_in != scored + rejected:
        raise ScoringError(f"rows lost: {rows_in} rows in, {scored} scored + {rejected} rejected")
    wall = (o.last_report or time.time()) - o.t0
    tokens_now = sum(infos[s["shard"]]["tokens"] for s in o.todo)
    return {
        "version": SCHEMA_VERSION,
        "complete": True,
        "rows_in": rows_in,
        "scored": scored,
        "rejected": rejected,
        "duplicates_moved": moved,
        "rejects_by_reason": _reason_counts(rejects),
        "tokens": sum(i["tokens"] for i in infos.values()),
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens_now / wall, 1) if o.todo else None,
        "model": os.path.abspath(resolve_base(cfg.base_model)),
        "gates": os.path.abspath(o.gates) if o.gates else None,
        "model_digest": plan["model_digest"],
        "gates_digest": plan["gates_digest"],
        "dtype": plan["scoring"]["dtype"],
        "scoring": plan["scoring"],
        "config": to_dict(cfg),
    }


def _dedup_inputs(cfg: ScoreConfig, paths: list[str]):
    """(the dedup run's rows to skip and identity, or None; the MinHash settings to sign with).

    A dedup run must have read the same corpus paths; its signature settings win, so the
    scores' minhash column compares with its kept rows.
    """
    from qgate import dedup as dedup_mod
    from qgate.config import MinHash

    if not cfg.dedup:
        return None, cfg.minhash
    m = dedup_mod.read_manifest(cfg.dedup)
    if m["inputs"] != paths:
        raise ScoringError(
            f"the dedup run {cfg.dedup} read {m['inputs']}, but this corpus is {paths}; dedup the"
            " same corpus paths you score"
        )
    identity = {"dir": os.path.abspath(cfg.dedup), "kept": m["kept"], "rejected": m["rejected"]}
    identity["minhash"] = m["minhash"]
    dropped = dedup_mod.dropped_rows(cfg.dedup)
    return {"identity": identity, "dropped": dropped}, MinHash.from_dict(m["minhash"])


def actor_layout(cfg: ScoreConfig, cluster_cpus: float) -> tuple[float, int]:
    """(CPUs per actor, torch threads per actor) for the pool.

    ``actors.num_cpus: null`` (the default) gives CPU actors an equal share of the cluster's
    CPUs (a lone actor on a 2-core box gets both), and GPU actors 1 CPU. Threads default to
    the CPUs requested (at least 1).
    """
    a = cfg.actors
    if a.num_cpus is not None:
        cpus = a.num_cpus
    elif a.num_gpus > 0:
        cpus = 1.0
    else:
        cpus = max(1.0, float(int(cluster_cpus // a.max_size)))
    if a.num_gpus == 0 and cluster_cpus < a.min_size * cpus:
        raise ScoringError(
            f"the actor pool ({a.min_size} x {cpus} CPU) needs {a.min_size * cpus} CPUs but Ray"
            f" has {cluster_cpus}: it would never start. Lower actors.num_cpus or"
            " actors.min_size, or give Ray more CPUs"
        )
    return cpus, a.threads or max(1, int(cpus))


def _run_pipeline(cfg, gates, outputs: list[_Output], todo: list[dict], fault: dict) -> None:
    """Score every shard in ``todo`` (each names its output) on one actor pool; the driver
    only reads one summary per shard."""
    import ray
    import ray.data

    from qgate.watchdog import Heartbeats, shard_summaries

    cpus, threads = actor_layout(cfg, ray.cluster_resources().get("CPU", 0))
    runtime = {"device": cfg.device, "threads": threads, "batch_tokens": cfg.batch_tokens}
    runtime |= {"debug_tokens": cfg.debug_tokens, "batch_rows": cfg.batch_rows}
    ds = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
        ShardScorer,
        fn_constructor_kwargs={
            "base": cfg.base_model,
            "gates": gates,
            "outputs": [
                {"settings": o.settings.to_dict(), "out": os.path.abspath(o.out)} for o in outputs
            ],
            "runtime": runtime,
            "fault": fault if fault.get("exit_after") else None,
        },
        compute=ray.data.ActorPoolStrategy(
            min_size=cfg.actors.min_size, max_size=cfg.actors.max_size
        ),
        batch_size=1,  # one shard per call: the unit of writing and of retry
        num_cpus=cpus,
        num_gpus=cfg.actors.num_gpus,
        resources=cfg.actors.resources,
    )
    seen: set[tuple[int, str]] = set()
    done = {i: [0, 0] for i in range(len(outputs))}  # rows, tokens
    n_rows = [sum(o.expected[s["shard"]] for s in o.todo) for o in outputs]
    # closed on any exit: a driver that raises must stop the actors, not leave them scoring
    beats = Heartbeats([os.path.join(o.out, PROGRESS_DIR) for o in outputs])
    with contextlib.closing(shard_summaries(ds, "score", progress=beats)) as summaries:
        for info in summaries:
            seen.add((info["output"], info["shard"]))
            o, d = outputs[info["output"]], done[info["output"]]
            o.last_report = time.time()
            d[0], d[1] = d[0] + info["rows"], d[1] + info["tokens"]
            rate = d[1] / max(o.last_report - o.t0, 1e-9)
            print(
                f"[score] {o.label}shard {info['shard']}: {info['scored']} scored, {info['rejected']} "
                f"rejected ({d[0]}/{n_rows[info['output']]} rows, {rate:.0f} tok/s)",
                flush=True,
            )
            if fault.get("stop_after_shards") and len(seen) >= fault["stop_after_shards"]:
                raise ScoringError(f"fault injection: driver stopped after {len(seen)} shard(s)")
    missing = sorted(s["shard"] for s in todo if (s["output"], s["shard"]) not in seen)
    if missing:
        raise ScoringError(f"shards never reported back: {missing[:10]}")
