"""The live scoring endpoint: Ray Serve + FastAPI over the gated model.

    serve run serve/config.yaml        # development: a local Ray, Ctrl-C stops it
    serve deploy serve/config.yaml     # a running cluster (dashboard at 127.0.0.1:8265)
    qgate serve [--config serve/config.yaml] [key=value ...]    # the local convenience

Two deployments:

- ``QGateModel`` holds the gated model (:func:`qgate.model.load_gated_model`) and the
  selection reference. The ingress sends it one call per request
  (:meth:`QGateModel.score_rows`); inside, each sample is one item of the dynamic batch
  (``@serve.batch`` on :meth:`QGateModel._score_many`), so samples from different requests
  and clients share batches while the Ray call overhead stays per request. A batch is scored
  by :func:`qgate.scoring.score_batch` and decided by :func:`qgate.selection.decide`: the
  batch job's functions with the batch job's settings (the reference's ``scoring`` block),
  so the endpoint returns the parquet values.
- ``QGateAPI`` is the FastAPI ingress: auth, limits, per-row validation
  (:func:`qgate.data.validate`), and the JSON replies.

The model loader is an argument of the model deployment (:func:`build`), so tests can swap it.
Nothing is loaded at import: ``app`` below is only a bound graph with the default config.
"""

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable

from ray import serve

from qgate.config import ConfigError, ServeConfig, stage_dir
from qgate.config_io import apply_overrides
from qgate.config_io import build as build_config
from qgate.data import INVALID_UTF8, TOKENIZATION_ERROR, Reject, validate
from qgate.serving import resolve_artifacts
from serve.gateway import APIError, Guard, api
from serve.schemas import (
    ERROR_RESPONSES,
    RowError,
    SampleDecision,
    SampleScore,
    ScoreRequest,
    ScoreResponse,
    SelectResponse,
)

log = logging.getLogger("qgate.serve")

API_SOURCE = "api"
"""Source name of request samples that do not carry their own ``source``."""
JSON_ESCAPE_FACTOR = 6
"""Worst-case bytes per character of a JSON string ('\\u0000'): bounds the body size."""

# ----------------------------------------------------------------------------- artifacts


# ----------------------------------------------------------------------------- deployments


@serve.deployment(name="QGateModel")
class QGateModel:
    """Holds the gated model and the reference; each sample is one item of a dynamic batch,
    scored by score_batch and decided by decide (the batch job's functions and settings)."""

    def __init__(self, cfg: ServeConfig, loader: Callable | None = None):
        from qgate.scorer import Scorer, ScoringSettings, loaded_digests

        art = resolve_artifacts(cfg)
        self.cfg, self.reference = cfg, art["reference"]
        self.s = ScoringSettings.from_dict(art["scoring"])
        self.digests = loaded_digests(art["base_model"], art["gates"])
        expected = art["expected_digests"]
        bad = [k for k, v in expected.items() if v is not None and v != self.digests[k]]
        if cfg.check_digests and bad:
            raise ValueError(
                f"the reference was scored with {', '.join(f'{k}={expected[k]}' for k in bad)},"
                f" but this endpoint loads {', '.join(f'{k}={self.digests[k]}' for k in bad)}"
                f" (base_model={art['base_model']}, gates={art['gates']}); its scores would not"
                " match. Point base_model/gates at what the score stage used, or re-run score"
                " and select (check_digests=false skips this check)"
            )
        self.scorer = Scorer(
            art["base_model"],
            art["gates"],
            self.s,
            device=cfg.device,
            dtype=cfg.dtype,
            threads=max(1, int(cfg.model_num_cpus)),
            batch_tokens=cfg.batch_tokens,
            loader=loader,
        )
        meta, device = self.scorer.meta, self.scorer.device
        self.scores_dir = art["scores_dir"]
        self.log_path = cfg.selection_log or os.path.join(
            stage_dir(cfg.run_dir, "selection"), "log.jsonl"
        )
        self.log = None
        self._score_many.set_max_batch_size(cfg.max_batch_size)
        self._score_many.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self.info_block = {
            "model": art["base_model"],
            "gates": art["gates"],
            **self.digests,
            "gate_mode": meta.mode,
            "num_layers": meta.num_layers,
            "device": str(device),
            "dtype": self.s.dtype,
            "reference": art["reference_path"],
            "reference_digest": art["reference_digest"],
            "method": self.reference.method if self.reference else None,
            "k": self.reference.k if self.reference else None,
            "scoring": self.s.to_dict(),
            "max_batch_size": cfg.max_batch_size,
        }
        # cumulative, for /v1/info: batches run, samples in them, the largest batch, the
        # seconds spent in score_batch + decide, and in whole score_rows calls (queue included)
        self.counters = {"batches": 0, "samples": 0, "largest_batch": 0, "compute_s": 0.0}
        self.counters |= {"calls": 0, "call_s": 0.0}
        from qgate.metrics import ServeMetrics

        self.metrics = ServeMetrics()
        log.info("QGateModel ready: %s", self.info_block)

    def info(self) -> dict:
        """Model, gates and reference identity, scoring settings, and batching counters."""
        return {**self.info_block, "batching": dict(self.counters)}

    async def commit(self, entries: list[dict]) -> list[dict]:
        """Append selected samples to the selection log (qgate.selection_log); the log is
        opened on the first commit, with the pool's signatures for the copy checks."""
        return await asyncio.to_thread(self._commit_sync, entries)

    def _commit_sync(self, entries: list[dict]) -> list[dict]:
        from qgate.config import MinHash
        from qgate.minhash import exact_key, message_signatures
        from qgate.selection_log import SelectionLog, pool_identity

        if self.log is None:
            block = self.s.minhash
            mh = MinHash.from_dict(block) if block else None
            pool = pool_identity([self.scores_dir]) if mh else None
            self.log = SelectionLog(self.log_path, mh, pool, self.cfg.commit_quota)
        mh = self.log.minhash
        sigs = message_signatures([e["messages"] for e in entries], mh) if mh else None
        for i, e in enumerate(entries):
            e["text_key"] = exact_key(e["messages"])
            if sigs is not None:
                e["minhash"] = sigs[i].tolist()
            e |= {"method": self.info_block["method"], "via": "serve"}
            e["reference_digest"] = self.info_block["reference_digest"]
        results = self.log.commit(entries)
        n = sum(r["status"] == "committed" for r in results)
        if n:
            self.metrics.committed.inc(n)
        return results

    async def score_rows(self, rows: list[dict]) -> list[dict]:
        """Score one request's canonical rows. Each row goes into the dynamic batch on its
        own, so rows of concurrent requests share batches; one Ray call per request."""
        t = time.perf_counter()
        out = list(await asyncio.gather(*(self.score(row) for row in rows)))
        self.counters["calls"] += 1
        self.counters["call_s"] += time.perf_counter() - t
        return out

    async def score(self, row: dict) -> dict:
        """Score one canonical row (sample_id, messages); a RowError becomes ``{"error": ...}``."""
        from qgate.data import RowError

        try:
            enc = self.scorer.tokenize(row["messages"])
        except RowError as e:
            self.metrics.row_error(e.reason)
            return {"error": {"reason": e.reason, "detail": str(e)}}
        except (ValueError, TypeError) as e:  # e.g. a chat template that rewrites content
            self.metrics.row_error(TOKENIZATION_ERROR)
            return {"error": {"reason": TOKENIZATION_ERROR, "detail": f"{TOKENIZATION_ERROR}: {e}"}}
        enc["sample_id"] = row["sample_id"]  # the random method hashes it
        return await self._score_many(enc)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)  # set from config
    async def _score_many(self, encs: list[dict]) -> list[dict]:
        # Runs on the replica's event loop, on purpose: samples that arrive meanwhile wait in
        # Ray's queue and all join the next batch. In a worker thread the forward's Python
        # overhead holds the GIL and starves the loop that enqueues them (measured on 2 CPUs,
        # 32 clients: mean batch 2.6 instead of 10, 1.4x less throughput).
        return self._score_sync(encs)

    def _score_sync(self, encs: list[dict]) -> list[dict]:
        from qgate.selection import decide

        t = time.perf_counter()
        stats = self.scorer.score(encs)
        for enc, st in zip(encs, stats, strict=True):
            st["sample_id"] = enc["sample_id"]
        decisions = decide(self.reference, stats) if self.reference else [{}] * len(stats)
        out = []
        for enc, st, d in zip(encs, stats, decisions, strict=True):
            out.append(
                {
                    "n_tokens": int(enc["n_tokens"]),
                    "truncated": bool(enc["truncated"]),
                    "nll": st["nll"],
                    "gate": st["gate"].tolist(),
                    "gate_mean": st["gate_mean"].tolist(),
                    "embedding": st["embedding"].tolist(),
                    "prompt_embedding": st["prompt_embedding"].tolist(),
                    "ifd": st["ifd"],
                    "n_loss_tokens": st["n_loss_tokens"],
                    "q": d.get("q"),
                    "score": d.get("score"),
                    "cluster": d.get("cluster"),
                    "selected": d.get("selected"),
                    "margin": d.get("margin"),
                }
            )
        self.metrics.batch_done(len(encs))
        c = self.counters
        c["compute_s"] += time.perf_counter() - t
        c["batches"], c["samples"] = c["batches"] + 1, c["samples"] + len(encs)
        c["largest_batch"] = max(c["largest_batch"], len(encs))
        return out


def _finite(x):
    """JSON has no NaN/inf: such values (and None) become null."""
    if x is None:
        return None
    if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
        return None
    return x


def read_api_key(cfg: ServeConfig) -> str | None:
    """The API key from api_key_file, else the api_key_env variable; None means no auth."""
    if cfg.api_key_file:
        try:
            with open(cfg.api_key_file) as f:
                key = f.read().strip()
        except OSError as e:
            raise FileNotFoundError(f"api_key_file {cfg.api_key_file}: {e.strerror}") from None
        if not key:
            raise ValueError(f"api_key_file {cfg.api_key_file} is empty")
        return key
    if cfg.api_key_env:
        return os.environ.get(cfg.api_key_env, "").strip() or None
    return None


@serve.deployment(name="QGateAPI")
@serve.ingress(api)
class QGateAPI:
    """The HTTP API; the routes are documented at /docs (OpenAPI at /openapi.json)."""

    def __init__(self, model, cfg: ServeConfig):
        self.model, self.cfg = model, cfg
        key = read_api_key(cfg)
        per_sample = cfg.max_chars * JSON_ESCAPE_FACTOR + 1024
        self.guard = Guard(key, max_body=cfg.max_samples * per_sample + 65536)
        self._method: str | None = None
        if key is None:
            log.warning(
                "qgate endpoint has no API key: every route is open (set %s or api_key_file)",
                cfg.api_key_env,
            )

    @api.get("/healthz", summary="Liveness (no auth)")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get(
        "/v1/info", summary="Model, gates and reference digests; limits", responses=ERROR_RESPONSES
    )
    async def info(self) -> dict:
        info = await self.model.info.remote()  # from the model replica that answers
        self._method = info["method"]
        cfg = self.cfg
        limits = {
            "max_samples": cfg.max_samples,
            "max_chars": cfg.max_chars,
            "max_body_bytes": self.guard.max_body,
            "max_length_tokens": info["scoring"]["max_length"],
            "max_batch_size": cfg.max_batch_size,
        }
        return {**info, "limits": limits, "auth": self.guard.key is not None}

    @api.post(
        "/v1/score",
        response_model=ScoreResponse,
        response_model_exclude_unset=True,
        summary="Score samples as the batch job would",
        responses=ERROR_RESPONSES,
    )
    async def score(self, body: ScoreRequest):
        if body.commit:
            raise APIError(422, "commit_needs_select", "commit applies to /v1/select only")
        results = await self._run(body, decide=False)
        return ScoreResponse(
            results=results,
            n_scored=sum(1 for r in results if r.error is None),
            n_errors=sum(1 for r in results if r.error is not None),
        )

    @api.post(
        "/v1/select",
        response_model=SelectResponse,
        response_model_exclude_unset=True,
        summary="Score samples and decide them under the reference's cutoffs",
        responses=ERROR_RESPONSES,
    )
    async def select(self, body: ScoreRequest):
        if self.cfg.score_only:
            raise APIError(409, "no_reference", "this endpoint runs score_only: no decisions")
        results, rows = await self._run(body, decide=True, with_rows=True)
        if self._method is None:
            self._method = (await self.model.info.remote())["method"]
        n_committed = await self._commit(results, rows) if body.commit else None
        return SelectResponse(
            results=results,
            n_scored=sum(1 for r in results if r.error is None),
            n_errors=sum(1 for r in results if r.error is not None),
            n_selected=sum(1 for r in results if r.selected),
            n_committed=n_committed,
            method=self._method,
        )

    async def _commit(self, results: list, rows: list) -> int:
        """Send the selected samples to the log; mark every result with its commit status."""
        from qgate.selection_log import COMMITTED, NOT_SELECTED

        chosen = [r for r in results if r.selected]
        entries = [
            {
                "id": r.sample_id,
                "source": r.source,
                "messages": rows[r.index]["messages"],
                "score": r.score,
                "q": r.q,
                "margin": r.margin,
            }
            for r in chosen
        ]
        statuses = await self.model.commit.remote(entries) if entries else []
        for r in results:
            if r.error is None and not r.selected:
                r.commit_status = NOT_SELECTED
        for r, st in zip(chosen, statuses, strict=True):
            r.commit_status, r.kept_id = st["status"], st["kept_id"]
        return sum(1 for st in statuses if st["status"] == COMMITTED)

    def _check_limits(self, body: ScoreRequest) -> list[str]:
        """413/422 for too many samples or an over-long one; returns each sample as JSON."""
        cfg = self.cfg
        if len(body.samples) > cfg.max_samples:
            raise APIError(
                413,
                "too_many_samples",
                f"{len(body.samples)} samples in one request; the limit is {cfg.max_samples}",
            )
        texts = []
        for i, raw in enumerate(body.samples):
            text = json.dumps(raw, ensure_ascii=False)
            if len(text) > cfg.max_chars:
                raise APIError(
                    422,
                    "sample_too_long",
                    f"sample {i} has {len(text)} characters (as JSON); the limit is"
                    f" {cfg.max_chars}",
                )
            texts.append(text)
        return texts

    @staticmethod
    def _validate(raw: dict, text: str) -> dict | Reject:
        """The batch job's row validation, plus the UTF-8 check its file reader does."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            given = raw.get("id")
            sid = str(given) if isinstance(given, str | int) else None
            detail = f"{INVALID_UTF8}: text is not valid UTF-8 ({e.reason} at {e.start})"
            return Reject(sid, API_SOURCE, INVALID_UTF8, detail, "")
        return validate(raw, API_SOURCE)

    async def _run(self, body: ScoreRequest, decide: bool, with_rows: bool = False):
        texts = self._check_limits(body)
        cls = SampleDecision if decide else SampleScore
        rows = [self._validate(raw, t) for raw, t in zip(body.samples, texts, strict=True)]
        todo = [i for i, r in enumerate(rows) if isinstance(r, dict)]
        outs = await self.model.score_rows.remote([rows[i] for i in todo]) if todo else []
        by_index = dict(zip(todo, outs, strict=True))
        extras = set(body.return_)
        results = []
        for i, row in enumerate(rows):
            if isinstance(row, Reject):
                err = RowError(reason=row.reason, detail=row.detail)
                results.append(cls(index=i, sample_id=row.sample_id, error=err))
                continue
            out = by_index[i]
            base = {"index": i, "sample_id": row["sample_id"], "source": row["source"]}
            if "error" in out:
                results.append(cls(**base, error=RowError(**out["error"])))
                continue
            fields = ["n_tokens", "truncated", "nll", "gate", "q", *sorted(extras)]
            if decide:
                fields += ["score", "cluster", "selected", "margin"]
            results.append(cls(**base, **{k: _finite(out[k]) for k in fields}))
        return (results, rows) if with_rows else results


# ----------------------------------------------------------------------------- builders


def _abs(path: str | None) -> str | None:
    return path if path is None or "://" in path else os.path.abspath(path)


def build(cfg: ServeConfig, loader: Callable | None = None) -> serve.Application:
    """The application graph for ``cfg``; ``loader`` replaces load_gated_model (tests)."""
    import dataclasses

    cfg = dataclasses.replace(
        cfg,
        run_dir=_abs(cfg.run_dir),
        reference=_abs(cfg.reference),
        scores=_abs(cfg.scores),
        base_model=_abs(cfg.base_model),
        gates=_abs(cfg.gates),
        api_key_file=_abs(cfg.api_key_file),
    )
    scaling = (
        {"autoscaling_config": dict(cfg.model_autoscaling)}
        if cfg.model_autoscaling
        else {"num_replicas": cfg.model_replicas}
    )
    model = QGateModel.options(
        max_ongoing_requests=cfg.model_max_ongoing_requests,
        # one access-log line per *sample* call would cost more than the call; the ingress
        # logs each HTTP request
        logging_config={"enable_access_log": False},
        ray_actor_options={"num_cpus": cfg.model_num_cpus, "num_gpus": cfg.model_num_gpus},
        **scaling,
    ).bind(cfg, loader)
    return QGateAPI.options(
        num_replicas=cfg.ingress_replicas,
        max_ongoing_requests=cfg.ingress_max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.ingress_num_cpus},
    ).bind(model, cfg)


def serve_config(args: dict | None) -> ServeConfig:
    """ServeConfig from a config.yaml ``args:`` mapping or ``serve run`` key=value strings.

    String values are parsed as YAML scalars (so ``max_samples=8`` is an int); dotted keys
    are not used. Unknown keys and bad values raise ConfigError naming the key.
    """
    args = dict(args or {})
    typed = {k: v for k, v in args.items() if not isinstance(v, str)}
    strings = [f"{k}={v}" for k, v in args.items() if isinstance(v, str)]
    return build_config(ServeConfig, apply_overrides(typed, strings))


def build_app(args: dict | None = None) -> serve.Application:
    """Application builder for ``import_path: serve.app:build_app`` with ``args:``."""
    try:
        cfg = serve_config(args)
    except ConfigError as e:
        raise ValueError(f"serve.app args: {e}") from None
    return build(cfg)


app = build_app({})
"""The default application (RUN = runs/demo), for ``import_path: serve.app:app``."""
