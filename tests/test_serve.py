"""The live scoring endpoint (serve/app.py) on a local Ray: parity with the batch job and the
selection, batching across requests, auth, limits, bad bodies, errors, and a schemathesis run."""

from __future__ import annotations

import asyncio
import json
import os
import socket

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from qgate.config import ConfigError, ServeConfig

KEY = "test-key-5f1c0e"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_SAMPLES, MAX_CHARS, MAX_LENGTH = 8, 4000, 128
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, corpus, tiny_model, ray_session):
    """RUN/scores and RUN/selection from the library functions, on the shared fixtures."""
    from qgate.batch_scoring import run_scoring
    from qgate.config import ScoreConfig, SelectConfig
    from qgate.selection import run_selection

    run = str(tmp_path_factory.mktemp("serve_run"))
    pool = corpus["pool"]
    score_cfg = ScoreConfig(
        run_dir=run,
        base_model=tiny_model,
        corpus=[pool],
        max_length=MAX_LENGTH,
        batch_tokens=2048,
        rows_per_shard=240,
    )
    run_scoring(score_cfg)
    run_selection(
        SelectConfig(run_dir=run, corpus=[pool], method="quality_gate", k=4, report=False)
    )
    scores = pq.read_table(os.path.join(run, "scores")).to_pylist()
    selection = pq.read_table(os.path.join(run, "selection", "selection.parquet")).to_pylist()
    key_file = os.path.join(run, "api.key")
    with open(key_file, "w") as f:
        f.write(KEY + "\n")
    return {
        "run": run,
        "pool": _rows(pool),
        "scores": {r["sample_id"]: r for r in scores},
        "selection": {r["sample_id"]: r for r in selection},
        "key_file": key_file,
        "cfg": ServeConfig(
            run_dir=run,
            max_samples=MAX_SAMPLES,
            max_chars=MAX_CHARS,
            max_batch_size=8,
            batch_wait_timeout_s=0.01,
            api_key_file=key_file,
        ),
    }


@pytest.fixture(scope="module")
def server(artifacts):
    """The app on a free loopback port; Serve is shut down at the end of the module."""
    import httpx
    from ray import serve

    from serve.app import build

    fault = os.path.join(artifacts["run"], "fault")

    def loader(base, gates=None, device="cpu", dtype=None):
        """load_gated_model, plus a forward that fails while the `fault` file exists."""
        from qgate.model import load_gated_model

        model, tok, meta = load_gated_model(base, gates=gates, device=device, dtype=dtype)

        def maybe_fail(module, args):
            if os.path.exists(fault):
                raise RuntimeError("SECRET internal state 42")

        model.get_decoder().register_forward_pre_hook(maybe_fail)  # scoring runs the body
        return model, tok, meta

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 30})
    serve.run(build(artifacts["cfg"], loader=loader), name="qgate", blocking=False)
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=60) as client:
        yield {"url": url, "client": client, "fault": fault}
    serve.shutdown()


def _post(server, path, body, headers=AUTH):
    return server["client"].post(path, json=body, headers=headers)


def _post_many(url: str, path: str, bodies: list[dict]) -> list[dict]:
    """POST bodies concurrently (so samples of different requests can share a batch)."""
    import httpx

    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=60, headers=AUTH) as c:
            rs = await asyncio.gather(*(c.post(path, json=b) for b in bodies))
        for r in rs:
            assert r.status_code == 200, r.text
        return [r.json() for r in rs]

    return asyncio.run(go())


def _chunks(items, n):
    return [items[i : i + n] for i in range(0, len(items), n)]


# ----------------------------------------------------------------------------- parity


def test_score_matches_batch_parquet(server, artifacts):
    """Guards against a second scoring path drifting from the batch job: other max_length,
    alpha, loss mask, projection or IFD settings, or stats that depend on batch-mates."""
    pool = artifacts["pool"][:48]
    extras = ["embedding", "prompt_embedding", "gate_mean", "ifd"]
    bodies = [{"samples": c, "return": extras} for c in _chunks(pool, 6)]
    replies = _post_many(server["url"], "/v1/score", bodies)
    results = [r for reply in replies for r in reply["results"]]
    scores, selection = artifacts["scores"], artifacts["selection"]
    compared = 0
    for raw, res in zip(pool, results, strict=True):
        assert res["sample_id"] == str(raw["id"])
        want = scores.get(res["sample_id"])
        if want is None:  # the batch job rejected it: so must the endpoint
            assert "error" in res, res
            continue
        assert "error" not in res
        assert res["n_tokens"] == want["n_tokens"]
        assert res["truncated"] == want["truncated"]
        np.testing.assert_allclose(res["nll"], want["nll"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(res["gate"], want["gate"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(res["gate_mean"], want["gate_mean"], rtol=1e-4, atol=1e-5)
        for key in ("embedding", "prompt_embedding"):
            np.testing.assert_allclose(res[key], want[key], rtol=1e-3, atol=1e-4)
        if want["ifd"] is None:
            assert res["ifd"] is None
        else:
            np.testing.assert_allclose(res["ifd"], want["ifd"], rtol=1e-4)
        np.testing.assert_allclose(res["q"], selection[res["sample_id"]]["q"], rtol=1e-4)
        assert set(res) >= {"sample_id", "n_tokens", "truncated", "nll", "gate", "q"}
        assert "selected" not in res  # decisions are /v1/select's
        compared += 1
    assert compared >= 40


def test_select_agrees_with_selection_parquet(server, artifacts):
    """Guards against live decisions that differ from the selection stage's (wrong cutoffs,
    wrong cluster assignment, a q computed against other column stats)."""
    pool = artifacts["pool"]
    bodies = [{"samples": c} for c in _chunks(pool, MAX_SAMPLES)]
    replies = _post_many(server["url"], "/v1/select", bodies)
    assert {r["method"] for r in replies} == {"quality_gate"}
    selection = artifacts["selection"]
    agree = ties = 0
    flags = []
    for res in (r for reply in replies for r in reply["results"]):
        want = selection.get(res["sample_id"])
        if want is None:
            assert "error" in res
            continue
        assert res["cluster"] == want["cluster"], res["sample_id"]
        np.testing.assert_allclose(res["q"], want["q"], rtol=1e-4)
        assert res["selected"] == (res["margin"] >= 0)
        if abs(res["margin"]) < 1e-4:  # at a cutoff within float noise (the cutoff row)
            ties += 1
            continue
        assert res["selected"] == want["selected"], (res, want)
        agree += 1
        flags.append(res["selected"])
    assert agree + ties == len(selection)
    assert ties <= 8  # about one per cluster: the row that set the cutoff
    assert 0 < sum(flags) < len(flags)  # both decisions occur
    all_results = [r for reply in replies for r in reply["results"]]
    assert sum(r["n_selected"] for r in replies) == sum(
        bool(r.get("selected")) for r in all_results
    )


def test_samples_of_concurrent_requests_share_batches(server):
    """Guards against per-request (not per-sample) batching and against max_ongoing_requests
    caps that keep a batch from ever holding more than one request's samples."""
    before = server["client"].get("/v1/info", headers=AUTH).json()["batching"]
    sample = {"instruction": "Uppercase: gate", "output": "GATE"}
    bodies = [{"samples": [dict(sample, id=f"b{i}")]} for i in range(24)]
    replies = _post_many(server["url"], "/v1/score", bodies)
    nlls = [r["results"][0]["nll"] for r in replies]
    np.testing.assert_allclose(nlls, nlls[0], rtol=1e-5)  # same text, whatever its batch-mates
    after = server["client"].get("/v1/info", headers=AUTH).json()["batching"]
    samples = after["samples"] - before["samples"]
    batches = after["batches"] - before["batches"]
    assert samples == 24
    assert batches < 24, f"24 one-sample requests ran as {batches} batches: no batching"
    assert after["largest_batch"] > 1


def test_commit_appends_selected_once_and_refuses_copies(server, artifacts):
    """Guards against a retried or concurrent commit appending twice, a copy of a pool row
    being committed, or an unselected sample entering the log."""
    from qgate.selection_log import read_log
    from qgate.synthetic import generate_corpus

    fresh_dir = os.path.join(artifacts["run"], "fresh")
    fresh = _rows(generate_corpus(fresh_dir, seed=11, n_pool=32, n_target=2, n_test=2)["pool"])
    fresh = [dict(r, id=f"fresh-{r['id']}") for r in fresh]
    bodies = [{"samples": c, "commit": True} for c in _chunks(fresh, MAX_SAMPLES)]
    replies = _post_many(server["url"], "/v1/select", bodies + bodies)  # each sent twice
    log_path = os.path.join(artifacts["run"], "selection", "log.jsonl")
    logged = [e["id"] for e in read_log(log_path)]
    selected = {r["sample_id"] for reply in replies for r in reply["results"] if r.get("selected")}
    assert len(logged) == len(set(logged)) and set(logged) <= selected
    assert sum(r["n_committed"] for r in replies) == len(logged) > 0
    statuses = [
        r["commit_status"] for reply in replies for r in reply["results"] if "error" not in r
    ]
    assert statuses.count("committed") == len(logged)
    assert statuses.count("already_committed") >= len(logged)  # the second copy of each
    for reply in replies:
        for r in reply["results"]:
            if "error" not in r and not r["selected"]:
                assert r["commit_status"] == "not_selected"
    # a selected pool row sent again under a new id is a copy of the pool row
    pool = artifacts["pool"]
    chosen = next(p for p in pool if artifacts["selection"].get(str(p["id"]), {}).get("selected"))
    twin = dict(chosen, id="twin-of-" + str(chosen["id"]))
    r = _post(server, "/v1/select", {"samples": [twin], "commit": True}).json()["results"][0]
    if r["selected"]:
        assert r["commit_status"] == "duplicate_text" and r["kept_id"] == str(chosen["id"])
    assert "twin-of-" + str(chosen["id"]) not in [e["id"] for e in read_log(log_path)]
    # commit is /v1/select's; an unknown key is refused
    assert _post(server, "/v1/score", {"samples": [twin], "commit": True}).status_code == 422


def test_replicas_export_samples_and_batch_sizes(server, metric_total):
    """The model replica's ray.util.metrics reach the node's Prometheus endpoint."""
    import ray

    _post(server, "/v1/score", {"samples": [{"instruction": "Uppercase: ray", "output": "RAY"}]})
    assert metric_total(ray, "ray_qgate_serve_samples_total") >= 1
    assert metric_total(ray, "ray_qgate_serve_batch_size_count") >= 1


# ----------------------------------------------------------------------------- auth


def test_auth(server):
    """Guards against an endpoint that is open when a key is configured, accepts a wrong or
    non-Bearer key, or locks out liveness probes."""
    c = server["client"]
    assert c.get("/healthz").status_code == 200
    body = {"samples": [{"instruction": "a", "output": "b"}]}
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {KEY}"}):
        for method, path in (("GET", "/v1/info"), ("GET", "/openapi.json"), ("GET", "/docs")):
            r = c.request(method, path, headers=headers)
            assert r.status_code == 401, (path, headers, r.text)
            assert r.json()["error"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
        r = c.post("/v1/score", json=body, headers=headers)
        assert r.status_code == 401
        assert KEY not in r.text
    info = c.get("/v1/info", headers=AUTH)
    assert info.status_code == 200
    info = info.json()
    assert info["auth"] is True
    assert info["limits"]["max_samples"] == MAX_SAMPLES
    assert info["limits"]["max_chars"] == MAX_CHARS
    assert info["limits"]["max_length_tokens"] == MAX_LENGTH
    ref_path = os.path.join(os.path.dirname(info["reference"]), "reference.json")
    with open(ref_path) as f:
        ref = json.load(f)
    assert info["model_digest"] == ref["model_digest"]
    assert info["gates_digest"] == ref["gates_digest"]
    assert len(info["reference_digest"]) == 16
    assert _post(server, "/v1/score", body).status_code == 200


# ----------------------------------------------------------------------------- bad bodies


def test_bad_bodies_get_documented_status_and_message(server):
    """Guards against 500s (or silent 200s) for malformed, mistyped, empty, oversized or
    unscorable input, and against one bad row failing the whole request."""
    c = server["client"]
    good = {"id": "g1", "messages": [{"role": "user", "content": "2+2?"}]}
    good["messages"].append({"role": "assistant", "content": "4"})

    def post_raw(content: bytes, path="/v1/score"):
        return c.post(path, content=content, headers={**AUTH, "content-type": "application/json"})

    r = post_raw(b'{"samples": [')
    assert r.status_code == 400 and r.json()["error"] == "malformed_json"
    for body, where in (
        ({"samples": "abc"}, "samples"),
        ({"samples": [1, 2]}, "samples.0"),
        ({"samples": [good], "return": ["secrets"]}, "return.0"),
        ({"samples": [good], "retrun": ["ifd"]}, "retrun"),
        ({}, "samples"),
    ):
        r = _post(server, "/v1/score", body)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["error"] == "invalid_request"
        assert where in r.json()["message"]
    r = _post(server, "/v1/score", {"samples": []})
    assert r.status_code == 422 and "at least 1" in r.json()["message"]

    r = _post(server, "/v1/select", {"samples": [good] * (MAX_SAMPLES + 1)})
    assert r.status_code == 413
    assert r.json()["error"] == "too_many_samples"
    assert f"limit is {MAX_SAMPLES}" in r.json()["message"]

    long = {"instruction": "x" * MAX_CHARS, "output": "y"}
    r = _post(server, "/v1/score", {"samples": [good, long]})
    assert r.status_code == 422
    assert r.json()["error"] == "sample_too_long"
    assert "sample 1" in r.json()["message"] and str(MAX_CHARS) in r.json()["message"]

    r = post_raw(json.dumps({"samples": [good], "pad": "z" * 400_000}).encode())
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"

    no_answer = {"id": "na", "messages": [{"role": "user", "content": "hello?"}]}
    empty_answer = {"instruction": "say nothing", "output": "  "}
    cut_off = {"id": "cut", "instruction": "word " * 300, "output": "the answer"}
    bad_role = {
        "messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]
    }
    surrogate = {"id": "sur", "instruction": "\ud800", "output": "y"}
    rows = [no_answer, good, empty_answer, cut_off, bad_role, {"foo": 1}, surrogate]
    # ensure_ascii keeps the lone surrogate as a valid JSON escape ("\\ud800")
    r = post_raw(json.dumps({"samples": rows}, ensure_ascii=True).encode(), path="/v1/select")
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [x["index"] for x in res] == list(range(7))
    reasons = [x.get("error", {}).get("reason") for x in res]
    assert reasons == [
        "missing_assistant",
        None,
        "missing_assistant",
        "no_answer_after_truncation",
        "unknown_role",
        "unknown_shape",
        "invalid_utf8",
    ]
    assert res[0]["sample_id"] == "na" and "assistant" in res[0]["error"]["detail"]
    assert res[1]["sample_id"] == "g1" and isinstance(res[1]["selected"], bool)
    assert r.json()["n_errors"] == 6 and r.json()["n_scored"] == 1

    # the server is still up and scores a good request exactly as before
    first = _post(server, "/v1/score", {"samples": [good]}).json()["results"][0]
    again = _post(server, "/v1/score", {"samples": [good]})
    assert again.status_code == 200
    assert again.json()["results"][0]["nll"] == first["nll"]
    assert c.get("/nope", headers=AUTH).status_code == 404


def test_unexpected_error_is_json_500_without_trace(server, artifacts):
    """Guards against stack traces or internal messages leaking to clients when the model
    fails, against non-JSON error pages, and against a failure that takes the server down."""
    c = server["client"]
    body = {"samples": [artifacts["pool"][0]]}
    with open(server["fault"], "w"):
        pass
    try:
        r = c.post("/v1/score", json=body, headers=AUTH)
    finally:
        os.remove(server["fault"])
    assert r.status_code == 500
    assert r.headers["content-type"] == "application/json"
    assert r.json()["error"] == "internal_error"
    assert "SECRET" not in r.text and "Traceback" not in r.text
    r = c.post("/v1/score", json=body, headers=AUTH)
    assert r.status_code == 200 and r.json()["n_scored"] == 1


def _fuzz(op, url: str, seen: dict):
    """A hypothesis test over one operation's generated cases; records status codes."""
    from hypothesis import HealthCheck, Phase, given, settings

    @given(case=op.as_strategy())
    @settings(
        max_examples=25,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def check(case):
        response = case.call(base_url=url, headers=AUTH, timeout=60)
        seen.setdefault(op.path, set()).add(response.status_code)
        assert response.status_code < 500, (case.body, response.text[:500])

    return check


def test_schemathesis_no_server_errors(server):
    """Guards against any generated request (per the app's own OpenAPI schema) getting a 5xx."""
    import schemathesis

    schema = schemathesis.openapi.from_url(f"{server['url']}/openapi.json", headers=AUTH)
    ops = [op.ok() for op in schema.get_all_operations()]
    paths = {op.path for op in ops}
    assert {"/v1/score", "/v1/select", "/v1/info", "/healthz"} <= paths
    seen: dict[str, set[int]] = {}
    for op in ops:
        _fuzz(op, server["url"], seen)()
    assert seen["/v1/score"] <= {200, 413, 422}
    assert 200 in seen["/v1/score"]


# ----------------------------------------------------------------------------- config


def test_shipped_serve_config_is_valid():
    """Guards against serve/config.yaml drifting from the code: an unknown arg, a public
    bind, no request timeout, or an import path `serve run` cannot load."""
    from ray.serve.schema import ServeDeploySchema

    from serve.app import build_app, serve_config

    with open(os.path.join(ROOT, "serve", "config.yaml")) as f:
        data = yaml.safe_load(f)
    schema = ServeDeploySchema.model_validate(data)
    assert schema.http_options.host == "127.0.0.1"
    assert schema.http_options.request_timeout_s > 0
    (app,) = data["applications"]
    assert app["import_path"] == "serve.app:build_app"
    cfg = serve_config(app["args"])
    assert cfg.max_batch_size <= cfg.model_max_ongoing_requests
    assert type(build_app(app["args"])).__name__ == "Application"
    with pytest.raises(ValueError, match="max_batch"):
        build_app({"max_batchsize": 4})
    assert serve_config({"max_samples": "8"}).max_samples == 8  # `serve run ... key=value`
    with pytest.raises(ConfigError, match="model_max_ongoing_requests"):
        ServeConfig(max_batch_size=32, model_max_ongoing_requests=8)


def test_model_refuses_artifacts_it_would_not_match(artifacts, tiny_model, tmp_path):
    """Guards against serving scores from other gates than the reference was built on, against
    a missing reference being replaced silently, and against score_only using other settings."""
    import dataclasses

    from qgate.model import convert
    from qgate.serving import resolve_artifacts
    from serve.app import QGateModel

    other = convert(tiny_model, str(tmp_path / "other_gates"), seed=7)
    cfg = dataclasses.replace(artifacts["cfg"], gates=other)
    with pytest.raises(ValueError, match="gates_digest"):
        QGateModel.func_or_class(cfg)
    with pytest.raises(FileNotFoundError, match="qgate select"):
        resolve_artifacts(ServeConfig(run_dir=str(tmp_path / "empty")))
    art = resolve_artifacts(artifacts["cfg"])
    assert art["scoring"]["max_length"] == MAX_LENGTH
    assert art["base_model"] == os.path.abspath(tiny_model)
    only = resolve_artifacts(ServeConfig(run_dir=artifacts["run"], score_only=True))
    assert only["reference"] is None and only["scoring"] == art["scoring"]
