"""The endpoint's HTTP layer: the FastAPI app, JSON errors with stable codes, and the
guard middleware (API key, body size limit) in front of every route but /healthz."""

from __future__ import annotations

import hmac
import logging
import uuid

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import TaskCancelledError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("qgate.serve")

OPEN_PATHS = ("/healthz",)
"""The only routes served without the API key."""


def _error(status: int, code: str, message: str, detail=None, headers=None) -> JSONResponse:
    body = {"error": code, "message": message}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status, headers=headers)


class APIError(HTTPException):
    """An HTTP error with a stable code (``error``) and a message."""

    def __init__(self, status: int, code: str, message: str, headers=None):
        super().__init__(status_code=status, detail=message, headers=headers)
        self.code = code


class GuardMiddleware:
    """Pure ASGI guard around the whole app: API key, body size, and a JSON 500 for anything
    unexpected (logged with its trace on the server, never sent to the client)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_tracked(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            guard = _guard_state()
            refusal = guard.check(scope)
            if refusal is not None:
                return await refusal(scope, receive, send)
            await self.app(scope, receive, send_tracked)
        except TaskCancelledError:  # the client went away and Serve cancelled the request
            log.info("request cancelled on %s", scope.get("path"))
        except Exception:
            ref = uuid.uuid4().hex[:12]
            log.exception("unexpected error (ref %s) on %s", ref, scope.get("path"))
            if not started:
                msg = f"unexpected server error; the server log has the details (ref {ref})"
                await _error(500, "internal_error", msg)(scope, receive, send)


class Guard:
    """What GuardMiddleware checks; lives on the ingress replica."""

    def __init__(self, key: str | None, max_body: int):
        self.key = key.encode() if key else None
        self.max_body = max_body

    def check(self, scope) -> JSONResponse | None:
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        headers = dict(scope.get("headers") or [])
        if self.key is not None and path not in OPEN_PATHS:
            auth = headers.get(b"authorization", b"")
            scheme, _, given = auth.partition(b" ")
            ok = scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.key)
            if not ok:
                return _error(
                    401,
                    "unauthorized",
                    "missing or wrong API key: send 'Authorization: Bearer <key>'",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return _error(
                413,
                "body_too_large",
                f"request body of {int(length)} bytes exceeds {self.max_body} bytes"
                " (max_samples x max_chars)",
            )
        return None


def _guard_state() -> Guard:
    """The guard of the ingress replica this request runs in."""
    return serve.get_replica_context().servable_object.guard


api = FastAPI(
    title="qgate scoring endpoint",
    version="1",
    description="Score instruction-tuning samples with the gated model exactly as the batch "
    "scoring job does, and get the decision the last selection would make for them. Every "
    "route except /healthz needs 'Authorization: Bearer <key>' when an API key is configured.",
)
api.add_middleware(GuardMiddleware)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    code = getattr(exc, "code", None) or {404: "not_found", 405: "method_not_allowed"}.get(
        exc.status_code, "http_error"
    )
    return _error(exc.status_code, code, str(exc.detail), headers=exc.headers)


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError):
    errors = [
        {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": e["type"]}
        for e in exc.errors()[:20]
    ]
    if any(e["type"] == "json_invalid" for e in errors):
        return _error(400, "malformed_json", "the request body is not valid JSON", errors)
    return _error(422, "invalid_request", "; ".join(_describe(e) for e in errors[:5]), errors)


def _describe(e: dict) -> str:
    loc = ".".join(p for p in e["loc"] if p != "body")
    return f"{loc or 'body'}: {e['msg']}"
