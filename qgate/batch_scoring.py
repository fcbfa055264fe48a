"""Stage 2 as a Ray Data job: stream a corpus through a gated-model actor pool, exactly once.

The input is cut into shards of ``rows_per_shard`` rows (per file, by row range). Ray Data
reads, validates and tokenizes each shard on CPU tasks, then an actor pool holding the gated
model scores rows with :func:`qgate.scoring.score_batch`. The driver groups results by shard
and, once a shard has all its rows, writes ``part-<shard>.parquet`` (scored rows, input
order) and ``rejects/part-<shard>.parquet`` atomically, then a ``_shards/<shard>.json``
marker. A re-launch skips shards with a marker, so an interrupted job finishes without
duplicates. Duplicate sample_ids across shards are resolved at the end (first occurrence
wins, the others become ``duplicate_id`` rejects), and ``_manifest.json`` is written only
when rows in == scored + rejected.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qgate.config import ScoreConfig, stage_dir, to_dict
from qgate.data import (
    DUPLICATE_ID,
    RowError,
    count_rows,
    expand_paths,
    iter_raw,
    source_name,
    validate,
)

PLAN_FILE = "_plan.json"
MANIFEST_FILE = "_manifest.json"
SHARDS_DIR = "_shards"
REJECTS_DIR = "rejects"
SCHEMA_VERSION = 1


class ScoringError(RuntimeError):
    """The scoring job cannot continue safely (lost rows, mismatched resume, bad inputs)."""


# ----------------------------------------------------------------------------- schema


def scores_schema(num_layers: int, dim: int, debug_tokens: bool = False) -> pa.Schema:
    """The scores row, version 1 (DESIGN.md): fixed-size float32 lists for gate and embedding."""
    f32 = pa.float32()
    fields = [
        ("sample_id", pa.string()),
        ("source", pa.string()),
        ("n_tokens", pa.int32()),
        ("n_loss_tokens", pa.int32()),
        ("truncated", pa.bool_()),
        ("nll", f32),
        ("gate", pa.list_(f32, num_layers)),
        ("gate_mean", pa.list_(f32, num_layers)),
        ("embedding", pa.list_(f32, dim)),
        ("ifd", f32),
    ]
    if debug_tokens:
        fields += [("token_nll", pa.list_(f32)), ("token_gates", pa.list_(pa.list_(f32)))]
    return pa.schema(fields, metadata={"qgate_scores_version": str(SCHEMA_VERSION)})


REJECT_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("source", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("excerpt", pa.string()),
    ]
)


# ----------------------------------------------------------------------------- planning


def plan_shards(paths: list[str], rows_per_shard: int) -> list[dict]:
    """Deterministic shards: (file, row range) chunks named ``<file index>-<chunk index>``."""
    shards = []
    for fi, path in enumerate(paths):
        n = count_rows(path)
        for ci, start in enumerate(range(0, max(n, 1), rows_per_shard)):
            stop = min(start + rows_per_shard, n)
            if stop > start:
                shards.append(
                    {"shard": f"{fi:05d}-{ci:06d}", "path": path, "start": start, "stop": stop}
                )
    return shards


# ----------------------------------------------------------------------------- Ray Data UDFs


def read_shard(
    item: dict, tokenizer_path: str, max_length: int, loss_on: str, ifd: bool
) -> list[dict]:
    """flat_map UDF: one shard -> one row per input row (tokenized, or a reject with reason)."""
    from qgate.scoring import tokenize_for_scoring
    from qgate.training import _tokenizer

    tok = _tokenizer(tokenizer_path)
    src = source_name(item["path"])
    out = []
    empty = np.zeros(0, dtype=np.int64)
    for i, raw in iter_raw(item["path"], item["start"], item["stop"]):
        row = {"shard": item["shard"], "row_index": i, "reason": "", "detail": "", "excerpt": ""}
        row |= {
            "input_ids": empty,
            "labels": empty,
            "answer_input_ids": empty,
            "answer_labels": empty,
        }
        row |= {"truncated": False, "n_tokens": 0}
        got = validate(raw, src, i)
        if isinstance(got, dict):
            row["sample_id"], row["source"] = got["sample_id"], got["source"]
            try:
                enc = tokenize_for_scoring(tok, got["messages"], max_length, loss_on, ifd)
                for k, v in enc.items():
                    row[k] = np.asarray(v, dtype=np.int64) if isinstance(v, list) else v
            except RowError as e:
                row["reason"], row["detail"] = e.reason, str(e)
                row["excerpt"] = json.dumps(got["messages"], ensure_ascii=False)[:200]
        else:
            row |= {"sample_id": got.sample_id, "source": got.source, "reason": got.reason}
            row |= {"detail": got.detail, "excerpt": got.excerpt}
        out.append(row)
    return out


class GateScorer:
    """Ray Data actor: holds the gated model, scores a batch of rows, passes rejects through."""

    def __init__(
        self, base: str, gates: str | None, scoring: dict, device: str, threads: int, fault=None
    ):
        import torch

        from qgate.model import load_gated_model
        from qgate.scoring import projection_matrix

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(threads)
        self.model, tok, meta = load_gated_model(base, gates=gates, device=device)
        self.pad_id = tok.pad_token_id
        self.s = scoring
        self.projection = projection_matrix(
            meta.hidden_size, scoring["embedding_dim"], scoring["embedding_seed"]
        )
        self.dim = meta.hidden_size if self.projection is None else self.projection.shape[1]
        self.L = meta.num_layers
        self.fault, self.calls = fault or {}, 0

    def __call__(self, batch: dict) -> dict:
        from qgate.scoring import score_batch

        self.calls += 1
        if self.fault.get("exit_after") == self.calls and not os.path.exists(self.fault["marker"]):
            open(self.fault["marker"], "w").close()
            os._exit(1)  # test-only fault injection: this actor process dies once
        n = len(batch["sample_id"])
        ok = [i for i in range(n) if not batch["reason"][i]]
        samples = [
            {k: batch[k][i] for k in ("input_ids", "labels", "answer_input_ids", "answer_labels")}
            for i in ok
        ]
        stats = score_batch(
            self.model,
            samples,
            pad_id=self.pad_id,
            alpha=self.s["alpha"],
            eps=self.s["eps"],
            batch_tokens=self.s["batch_tokens"],
            projection=self.projection,
            ifd=self.s["ifd"],
            debug_tokens=self.s["debug_tokens"],
        )
        out = {
            k: batch[k]
            for k in ("shard", "row_index", "sample_id", "source", "reason", "detail", "excerpt")
        }
        out["n_tokens"] = np.asarray(batch["n_tokens"], dtype=np.int32)
        out["truncated"] = np.asarray(batch["truncated"], dtype=bool)
        out["nll"] = np.full(n, np.nan, dtype=np.float32)
        out["ifd"] = np.full(n, np.nan, dtype=np.float32)
        out["n_loss_tokens"] = np.zeros(n, dtype=np.int32)
        out["gate"] = np.zeros((n, self.L), dtype=np.float32)
        out["gate_mean"] = np.zeros((n, self.L), dtype=np.float32)
        out["embedding"] = np.zeros((n, self.dim), dtype=np.float32)
        for i, st in zip(ok, stats, strict=True):
            out["nll"][i] = st["nll"]
            out["ifd"][i] = np.nan if st["ifd"] is None else st["ifd"]
            out["n_loss_tokens"][i] = st["n_loss_tokens"]
            out["gate"][i], out["gate_mean"][i], out["embedding"][i] = (
                st["gate"],
                st["gate_mean"],
                st["embedding"],
            )
        if self.s["debug_tokens"]:
            tn = [np.zeros(0, np.float32)] * n
            tg = [np.zeros((self.L, 0), np.float32)] * n
            for i, st in zip(ok, stats, strict=True):
                tn[i], tg[i] = st["token_nll"], st["token_gates"]
            out["token_nll"] = np.array(tn + [None], dtype=object)[:-1]
            out["token_gates"] = np.array([list(g) for g in tg] + [None], dtype=object)[:-1]
        return out


# ----------------------------------------------------------------------------- writing


def _write_atomic(table: pa.Table, path: str) -> None:
    tmp = f"{path}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _scores_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    cols = {}
    for f in schema:
        vals = [r[f.name] for r in rows]
        if f.name == "ifd":
            vals = [None if v is None or np.isnan(v) else float(v) for v in vals]
        elif pa.types.is_fixed_size_list(f.type):
            flat = (
                np.asarray(vals, dtype=np.float32).reshape(-1) if vals else np.zeros(0, np.float32)
            )
            cols[f.name] = pa.FixedSizeListArray.from_arrays(pa.array(flat), f.type.list_size)
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
    _write_atomic(_scores_table(good, schema), os.path.join(out_dir, f"part-{shard}.parquet"))
    rej = pa.table({f.name: pa.array([r[f.name] for r in bad], type=f.type) for f in REJECT_SCHEMA})
    _write_atomic(rej, os.path.join(out_dir, REJECTS_DIR, f"part-{shard}.parquet"))
    info = {
        "shard": shard,
        "rows": len(rows),
        "scored": len(good),
        "rejected": len(bad),
        "tokens": int(sum(int(r["n_tokens"]) for r in good)),
        "rejects_by_reason": dict(Counter(r["reason"] for r in bad)),
    }
    with open(os.path.join(out_dir, SHARDS_DIR, f"{shard}.json.tmp"), "w") as f:
        json.dump(info, f)
    os.replace(
        os.path.join(out_dir, SHARDS_DIR, f"{shard}.json.tmp"),
        os.path.join(out_dir, SHARDS_DIR, f"{shard}.json"),
    )
    return info


def resolve_duplicates(out_dir: str, shards: list[str]) -> int:
    """Move later occurrences of a sample_id (in input order) to ``duplicate_id`` rejects.

    Idempotent: the extra rejects go to ``rejects/dup-<shard>.parquet`` (written before the
    part file is rewritten), so a crash here and a re-run give the same result.
    """
    seen: set[str] = set()
    moved = 0
    for shard in shards:
        part = os.path.join(out_dir, f"part-{shard}.parquet")
        table = pq.read_table(part)
        ids = table.column("sample_id").to_pylist()
        dup = []
        for i, sid in enumerate(ids):
            (dup.append(i) if sid in seen else seen.add(sid))
        if not dup:
            continue
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
        _write_atomic(rej, os.path.join(out_dir, REJECTS_DIR, f"dup-{shard}.parquet"))
        keep = np.setdiff1d(np.arange(len(ids)), dup)
        _write_atomic(table.take(pa.array(keep)), part)
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


def _digests(cfg: ScoreConfig, gates: str | None) -> dict:
    from qgate.model import GATES_FILE, file_digest, model_digest, resolve_base

    g = file_digest([os.path.join(gates, GATES_FILE)]) if gates else "fresh-init"
    return {"model_digest": model_digest(resolve_base(cfg.base_model)), "gates_digest": g}


def run_scoring(cfg: ScoreConfig) -> dict:
    """Score the corpus into RUN/scores (or cfg.output); resumable; returns the manifest."""

    from qgate.model import check_base, read_meta, resolve_base

    check_base(cfg.base_model)
    gates = cfg.gates or os.path.join(cfg.run_dir, "warmup")
    if not cfg.gates and os.path.isfile(os.path.join(cfg.base_model, "qgate.json")):
        gates = cfg.base_model  # a converted gated directory carries its own gates
    if not os.path.isfile(os.path.join(gates, "qgate.json")):
        if cfg.gates:
            raise FileNotFoundError(f"gates directory has no qgate.json: {gates}")
        gates = None  # no warmup ran: score with freshly initialised gates
    meta = read_meta(gates) if gates else None
    out = cfg.output or stage_dir(cfg.run_dir, "scores")
    os.makedirs(os.path.join(out, REJECTS_DIR), exist_ok=True)
    os.makedirs(os.path.join(out, SHARDS_DIR), exist_ok=True)

    t0 = time.time()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    paths = expand_paths(cfg.corpus)
    shards = plan_shards(paths, cfg.rows_per_shard)
    plan = {"shards": shards, **_digests(cfg, gates), "scoring": _scoring_block(cfg, meta)}
    plan_path = os.path.join(out, PLAN_FILE)
    if os.path.isfile(plan_path):
        with open(plan_path) as f:
            old = json.load(f)
        if old != plan:
            raise ScoringError(
                f"{out} holds scores from a different corpus, model, gates or scoring settings; "
                "use a new output path (or delete it) to score again"
            )
    else:
        with open(plan_path, "w") as f:
            json.dump(plan, f, indent=1)

    done = {
        s[: -len(".json")] for s in os.listdir(os.path.join(out, SHARDS_DIR)) if s.endswith(".json")
    }
    todo = [s for s in shards if s["shard"] not in done]
    expected = {s["shard"]: s["stop"] - s["start"] for s in shards}
    print(
        f"[score] {len(shards)} shards, {len(done)} already complete, {len(todo)} to score -> {out}",
        flush=True,
    )

    L = meta.num_layers if meta else _num_layers(cfg.base_model)
    dim = plan["scoring"]["embedding_dim_out"]
    schema = scores_schema(L, dim, cfg.debug_tokens)
    if todo:
        _run_pipeline(cfg, gates, todo, expected, out, schema, plan["scoring"])

    shard_ids = [s["shard"] for s in shards]
    moved = resolve_duplicates(out, shard_ids)
    infos = []
    for s in shard_ids:
        with open(os.path.join(out, SHARDS_DIR, f"{s}.json")) as f:
            infos.append(json.load(f))
    parts = [os.path.join(out, f"part-{s}.parquet") for s in shard_ids]
    rej_dir = os.path.join(out, REJECTS_DIR)
    rejects = sorted(
        os.path.join(rej_dir, p) for p in os.listdir(rej_dir) if p.endswith(".parquet")
    )
    rows_in = sum(expected.values())
    scored, rejected = _count_rows(parts), _count_rows(rejects)
    if rows_in != scored + rejected:
        raise ScoringError(f"rows lost: {rows_in} rows in, {scored} scored + {rejected} rejected")
    wall = time.time() - t0
    tokens = sum(i["tokens"] for i in infos)
    manifest = {
        "version": SCHEMA_VERSION,
        "complete": True,
        "rows_in": rows_in,
        "scored": scored,
        "rejected": rejected,
        "duplicates_moved": moved,
        "rejects_by_reason": _reason_counts(rejects),
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1) if todo else None,
        "model": os.path.abspath(resolve_base(cfg.base_model)),
        "gates": os.path.abspath(gates) if gates else None,
        "model_digest": plan["model_digest"],
        "gates_digest": plan["gates_digest"],
        "scoring": plan["scoring"],
        "config": to_dict(cfg),
        "inputs": paths,
        "started_at": started,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with open(os.path.join(out, MANIFEST_FILE), "w") as f:
        json.dump(manifest, f, indent=2)
    manifest["output"] = out
    return manifest


def _num_layers(base: str) -> int:
    from transformers import AutoConfig

    from qgate.model import resolve_base

    return AutoConfig.from_pretrained(resolve_base(base)).num_hidden_layers


def _scoring_block(cfg: ScoreConfig, meta) -> dict:
    """The settings that define a score (Serve must use the same ones)."""
    from transformers import AutoConfig

    from qgate.model import resolve_base

    hidden = AutoConfig.from_pretrained(resolve_base(cfg.base_model)).hidden_size
    return {
        "max_length": cfg.max_length,
        "loss_on": cfg.loss_on,
        "alpha": cfg.alpha,
        "eps": cfg.eps,
        "embedding_dim": cfg.embedding_dim,
        "embedding_seed": cfg.embedding_seed,
        "embedding_dim_out": cfg.embedding_dim or hidden,
        "hidden_size": hidden,
        "num_layers": meta.num_layers if meta else _num_layers(cfg.base_model),
        "gate_mode": meta.mode if meta else "probe",
        "ifd": cfg.ifd,
    }


def _fault() -> dict:
    env = os.environ
    return {
        "exit_after": int(env["QGATE_FAULT_SCORER_EXIT_AFTER"])
        if env.get("QGATE_FAULT_SCORER_EXIT_AFTER")
        else None,
        "marker": env.get("QGATE_FAULT_MARKER", ""),
        "stop_after_shards": int(env.get("QGATE_FAULT_STOP_AFTER_SHARDS", "0") or 0),
    }


def _run_pipeline(cfg, gates, todo, expected, out, schema, scoring) -> None:
    import ray
    import ray.data

    from qgate.model import resolve_base

    fault = _fault()  # test-only fault injection, read on the driver
    cpus = ray.cluster_resources().get("CPU", 0)
    need = cfg.actors.min_size * cfg.actors.num_cpus + cfg.read_num_cpus
    if cfg.actors.num_gpus == 0 and cpus < need:
        raise ScoringError(
            f"the actor pool ({cfg.actors.min_size} x {cfg.actors.num_cpus} CPU) plus a reader "
            f"({cfg.read_num_cpus} CPU) need {need} CPUs but Ray has {cpus}: reads would never "
            "run. Lower actors.num_cpus or actors.min_size, or give Ray more CPUs"
        )
    base_dir = resolve_base(cfg.base_model)
    ds = ray.data.from_items(todo, override_num_blocks=len(todo)).flat_map(
        read_shard,
        fn_kwargs={
            "tokenizer_path": base_dir,
            "max_length": cfg.max_length,
            "loss_on": cfg.loss_on,
            "ifd": cfg.ifd,
        },
        num_cpus=cfg.read_num_cpus,
    )
    ds = ds.map_batches(
        GateScorer,
        fn_constructor_kwargs={
            "base": cfg.base_model,
            "gates": gates,
            "scoring": {
                **scoring,
                "batch_tokens": cfg.batch_tokens,
                "debug_tokens": cfg.debug_tokens,
            },
            "device": cfg.device,
            "threads": max(1, int(cfg.actors.num_cpus)),
            "fault": fault if fault["exit_after"] else None,
        },
        compute=ray.data.ActorPoolStrategy(
            min_size=cfg.actors.min_size, max_size=cfg.actors.max_size
        ),
        batch_size=cfg.batch_rows,
        num_cpus=cfg.actors.num_cpus,
        num_gpus=cfg.actors.num_gpus,
        zero_copy_batch=True,
    )
    pending: dict[str, dict[int, dict]] = {}
    written = 0
    names = list(schema.names) + ["shard", "row_index", "reason", "detail", "excerpt"]
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        cols = {k: batch[k] for k in names if k in batch}
        for j in range(len(cols["sample_id"])):
            row = {k: v[j] for k, v in cols.items()}
            row["ifd"] = None if np.isnan(row["ifd"]) else float(row["ifd"])
            for k in ("shard", "sample_id", "source", "reason", "detail", "excerpt"):
                row[k] = None if row[k] is None else str(row[k])
            pending.setdefault(row["shard"], {})[int(row["row_index"])] = row  # retries dedupe
        for shard in [s for s, rows in pending.items() if len(rows) == expected[s]]:
            info = write_shard(out, shard, list(pending.pop(shard).values()), schema)
            written += 1
            print(
                f"[score] shard {shard}: {info['scored']} scored, {info['rejected']} rejected",
                flush=True,
            )
            if fault["stop_after_shards"] and written >= fault["stop_after_shards"]:
                raise ScoringError(f"fault injection: driver stopped after {written} shard(s)")
    if pending:
        raise ScoringError(f"rows lost in flight for shards {sorted(pending)}")
