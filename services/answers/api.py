"""The answer service's HTTP API (OpenAPI at ``/docs``), built around a backend so other routers can join it.

    app = build_api(backend)            # backend: AnswerBackend (the Serve replica, or a test double)
    app.include_router(console_router)  # e.g. the web console, on the same app and keys

    POST /v1/answers   AnswerRequest   -> AnswerResponse     bearer api_key
    POST /v1/feedback  FeedbackRequest -> FeedbackResponse   bearer api_key; 404 unknown answer, 409 conflict
    GET  /v1/healthz | /v1/readyz | /v1/status | /metrics    bearer api_key only with serve.auth_reads

Bodies are parsed here rather than by FastAPI, so a non-UTF-8 or oversized field gets a 422 naming the field
and its limit, and a body over ``serve.max_body_bytes`` a 413 before it is read to the end.
"""

from __future__ import annotations

import json
import time
from typing import Any, Protocol, TypeVar

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from schemas.serving import (
    AnswerRequest,
    AnswerResponse,
    FeedbackRequest,
    FeedbackResponse,
)
from schemas.settings import Settings
from services.answers.keys import ApiKeys, bearer_matches
from services.answers.metrics import ServiceMetrics

T = TypeVar("T", bound=BaseModel)


class NotReady(RuntimeError):
    """No version is loaded yet: the request may be retried later."""


class AnswerBackend(Protocol):
    settings: Settings
    keys: ApiKeys
    metrics: ServiceMetrics

    async def answer(self, request: AnswerRequest) -> AnswerResponse: ...

    def feedback(self, request: FeedbackRequest) -> FeedbackResponse: ...

    def readiness(self) -> tuple[bool, dict[str, Any]]: ...

    def status(self) -> dict[str, Any]: ...


class BodyLimit:
    """ASGI middleware: 413 for a body over ``limit`` bytes, declared or streamed."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(scope, receive, send)
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.limit:
                return await self._too_large(scope, receive, send)
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send) -> None:
        detail = f"request body over serve.max_body_bytes ({self.limit} bytes)"
        await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)


def invalid(errors: list[dict[str, Any]]) -> HTTPException:
    return HTTPException(status_code=422, detail=errors)


def _error(err: dict[str, Any]) -> dict[str, Any]:
    out = {"loc": ["body", *err["loc"]], "msg": err["msg"], "type": err["type"]}
    limits = {k: v for k, v in (err.get("ctx") or {}).items() if isinstance(v, (int, float, str))}
    return {**out, "ctx": limits} if limits else out


async def parse_body(request: Request, model: type[T]) -> T:
    """The body as ``model``; 422 naming each bad field (invalid bytes count as a field that is not UTF-8)."""
    raw = await request.body()
    try:
        # surrogateescape keeps undecodable bytes as lone surrogates, so they are found in their field below.
        data = json.loads(raw.decode("utf-8", "surrogateescape"))
    except ValueError as e:
        raise invalid([{"loc": ["body"], "msg": f"body is not JSON: {e}", "type": "json_invalid"}]) from e
    if isinstance(data, dict):
        bad = [key for key, value in data.items() if isinstance(value, str) and not _is_utf8(value)]
        if bad:
            raise invalid([{"loc": ["body", key], "msg": "must be UTF-8 text", "type": "utf8"} for key in bad])
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise invalid([_error(err) for err in e.errors(include_url=False)]) from e


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _body_doc(model: type[BaseModel]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def build_api(backend: AnswerBackend) -> FastAPI:
    """The FastAPI app of the answer service on ``backend``."""
    app = FastAPI(title="medretrain answer service", version="1", description=__doc__)
    app.add_middleware(BodyLimit, limit=backend.settings.serve.max_body_bytes)
    _add_metrics(app, backend.metrics)
    key, reads = _key_checks(backend)

    @app.post("/v1/answers", response_model=AnswerResponse, dependencies=[Depends(key)],
              openapi_extra=_body_doc(AnswerRequest))
    async def answers(request: Request) -> AnswerResponse:
        payload = await parse_body(request, AnswerRequest)
        try:
            return await backend.answer(payload)
        except NotReady as e:
            raise _unavailable(backend, str(e)) from e

    @app.post("/v1/feedback", response_model=FeedbackResponse, dependencies=[Depends(key)],
              openapi_extra=_body_doc(FeedbackRequest))
    async def feedback(request: Request) -> FeedbackResponse:
        from services.answers.records import FeedbackConflict, UnknownAnswer

        payload = await parse_body(request, FeedbackRequest)
        try:
            return await run_in_threadpool(backend.feedback, payload)
        except UnknownAnswer as e:
            raise HTTPException(status_code=404, detail=str(e)) from e
        except FeedbackConflict as e:
            raise HTTPException(status_code=409, detail=str(e)) from e
        except ValueError as e:  # a correction longer than the stream accepts
            raise invalid([{"loc": ["body", "corrected_answer"], "msg": str(e), "type": "too_long"}]) from e

    @app.get("/v1/healthz", dependencies=[Depends(reads)])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/readyz", dependencies=[Depends(reads)])
    async def readyz() -> JSONResponse:
        ready, detail = backend.readiness()
        if not ready:
            raise _unavailable(backend, detail)
        return JSONResponse(detail)

    @app.get("/v1/status", dependencies=[Depends(reads)])
    async def status() -> dict[str, Any]:
        return backend.status()

    @app.get("/metrics", dependencies=[Depends(reads)], include_in_schema=False)
    async def metrics() -> Response:
        return Response(backend.metrics.exposition(), media_type="text/plain; version=0.0.4")

    from services.answers.console import console_router

    app.include_router(console_router(backend))
    return app


def _unavailable(backend: AnswerBackend, detail: Any) -> HTTPException:
    return HTTPException(status_code=503, detail=detail,
                         headers={"Retry-After": str(backend.settings.serve.retry_after_s)})


def _key_checks(backend: AnswerBackend):
    """FastAPI dependencies: the API key always, and for reads only with ``serve.auth_reads``."""

    def key(request: Request) -> None:
        if not bearer_matches(request.headers.get("authorization"), backend.keys.api_key):
            raise HTTPException(status_code=401, detail="missing or wrong bearer API key",
                                headers={"WWW-Authenticate": "Bearer"})

    def reads(request: Request) -> None:
        if backend.settings.serve.auth_reads:
            key(request)

    return key, reads


def _add_metrics(app: FastAPI, metrics: ServiceMetrics) -> None:
    @app.middleware("http")
    async def count(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "unmatched")  # bounded labels: a route, never the raw path
        metrics.requests.labels(endpoint=endpoint, code=str(response.status_code)).inc()
        metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - start)
        return response
