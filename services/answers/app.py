"""The answer service as a Ray Serve application: each replica is the FastAPI ingress and the models it serves.

    medretrain serve answers                                   # deploys deploy/serve/answers.yaml, Ctrl-C deletes it
    serve.run(build_app({}), name="answers")                   # the config's import path, from Python

Concurrent questions are generated in ``@serve.batch`` batches (``serve.max_batch_size``, ``serve.batch_wait_s``);
a batch may mix versions, each version's questions are one sub-batch. Every answer is stored with the
version that generated it (``record_answer``: the store and the ``qa.answers`` outbox in one transaction)
and an outbox relay thread publishes it, so a broker outage delays answers' events but loses none.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
import time
import uuid
from typing import Any

from ray import serve
from ray.serve import Application

from deploy.registry import CHALLENGER, CHAMPION
from schemas.serving import (
    AnswerEvent,
    AnswerRequest,
    AnswerResponse,
    FeedbackRequest,
    FeedbackResponse,
)
from schemas.settings import Settings, load_settings, with_overrides
from services.answers.api import NotReady, build_api
from services.answers.keys import ensure_keys
from services.answers.metrics import ServiceMetrics
from services.answers.models import Generated, Job, ServedModels
from services.answers.watch import SwapWatcher

log = logging.getLogger(__name__)


def canary_share(key: str) -> float:
    """A stable number in [0, 1) per session: the same session always lands on the same side of the split."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:16], 16) / 2**64


def _normal_priority() -> None:
    """Undo Ray's worker niceness (15): on a shared host a niced replica answers users last, after batch work.

    Linux keeps a niceness per thread, and new threads inherit their creator's: every thread is reset.
    """
    try:
        for tid in os.listdir("/proc/self/task"):
            os.setpriority(os.PRIO_PROCESS, int(tid), 0)
    except (PermissionError, FileNotFoundError):
        log.warning("the replica runs at niceness %d (not allowed to change it): answers may be slower under load",
                    os.getpriority(os.PRIO_PROCESS, 0))


@serve.deployment(name="AnswerService", num_replicas=1, health_check_period_s=10)
@serve.ingress()
class AnswerService:
    def __init__(self, settings: Settings) -> None:
        import torch

        from services.answers.relay import OutboxRelay
        from services.store import create_schema, make_engine

        torch.set_num_threads(settings.serve.torch_threads or os.cpu_count() or 1)
        _normal_priority()
        self.settings, self.keys, self.metrics = settings, ensure_keys(settings), ServiceMetrics()
        self.engine = make_engine(settings)
        create_schema(self.engine)
        self.models = ServedModels(settings)
        self.watcher = SwapWatcher(settings, self.models, self.metrics)
        self.relay = OutboxRelay(settings, self.engine)
        self._generate.set_max_batch_size(settings.serve.max_batch_size)
        self._generate.set_batch_wait_timeout_s(settings.serve.batch_wait_s)
        self._stop = threading.Event()
        # The first load runs in the background too: readyz answers 503 until a version is loaded.
        for name, target in (("swap", self.watcher.run), ("promotions", self.watcher.listen),
                             ("outbox", self.relay.serve)):
            threading.Thread(target=target, args=(self._stop,), name=f"answers-{name}", daemon=True).start()

    def __serve_build_asgi_app__(self):
        return build_api(self)

    def __del__(self) -> None:
        # Called by Serve after the drain: rows the relay did not send stay in the outbox for the next start.
        self._stop.set()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)
    async def _generate(self, jobs: list[Job]) -> list[Generated]:
        self.metrics.batch_size.observe(len(jobs))
        return await asyncio.to_thread(self.models.generate, jobs)

    def _route(self, request: AnswerRequest, answer_id: uuid.UUID) -> tuple[str, str]:
        """(alias, version) for a request, held by the models until released."""
        alias = CHAMPION
        if CHALLENGER in self.models.routes():
            key = request.session_id or str(answer_id)  # no session: the split is per request
            alias = CHALLENGER if canary_share(key) < self.settings.serve.challenger_fraction else CHAMPION
        version = self.models.acquire(alias)
        if version is None and alias != CHAMPION:  # the challenger went away since the look at the routes
            alias, version = CHAMPION, self.models.acquire(CHAMPION)
        if version is None:
            raise NotReady("no model version is loaded yet")
        return alias, version

    async def answer(self, request: AnswerRequest) -> AnswerResponse:
        from services.answers.records import record_answer

        start, answer_id = time.perf_counter(), uuid.uuid4()
        alias, version = self._route(request, answer_id)
        try:
            generated = await self._generate(Job(request.question, version))
        finally:
            self.models.release(version)
        event = AnswerEvent(answer_id=answer_id, question=request.question, answer=generated.answer,
                            model_version=generated.version, alias=alias, session_id=request.session_id)
        await asyncio.to_thread(record_answer, self.engine, event)
        self.metrics.answers.labels(version=generated.version, alias=alias).inc()
        self.metrics.tokens.labels(version=generated.version).inc(generated.tokens)
        return AnswerResponse(answer_id=answer_id, answer=generated.answer, model_version=generated.version,
                              alias=alias, latency_ms=(time.perf_counter() - start) * 1000)

    def feedback(self, request: FeedbackRequest) -> FeedbackResponse:
        from services.answers.records import record_feedback

        response = record_feedback(self.engine, self.settings, request)
        if response.accepted:
            rating = f"{request.rating:+d}" + (" corrected" if request.corrected_answer else "")
            self.metrics.feedback.labels(version=self._version_of(request.answer_id), rating=rating).inc()
        return response

    def _version_of(self, answer_id: uuid.UUID) -> str:
        from sqlalchemy import select

        from services.answers.records import AnswerRow

        with self.engine.connect() as conn:
            stmt = select(AnswerRow.model_version).where(AnswerRow.answer_id == str(answer_id))
            return conn.execute(stmt).scalar_one()

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        routes = self.models.routes()
        detail = {"ready": CHAMPION in routes, "serving": routes, "failed_versions": self.watcher.failures}
        if not detail["ready"]:
            detail["reason"] = "no champion version loaded yet" + ("" if not self.watcher.failures else
                                                                    " (see failed_versions)")
        return bool(detail["ready"]), detail

    def status(self) -> dict[str, Any]:
        """What ``medretrain status`` shows of the service: versions served and failed, batching, memory."""
        import psutil

        _, detail = self.readiness()
        serve_settings = self.settings.serve
        return {**detail, "loaded": self.models.loaded(), "last_check_at": self.watcher.last_check_at,
                "max_batch_size": serve_settings.max_batch_size, "batch_wait_s": serve_settings.batch_wait_s,
                "challenger_fraction": serve_settings.challenger_fraction,
                "rss_bytes": psutil.Process().memory_info().rss, "pid": os.getpid()}


def answer_app(settings: Settings) -> Application:
    """The bound application for ``settings`` (replica resources and drain time from ``settings.serve``)."""
    return AnswerService.options(
        ray_actor_options={"num_cpus": settings.serve.num_cpus},
        # Requests waiting for a batch count as ongoing: room for several batches queued behind the running one.
        max_ongoing_requests=max(64, 4 * settings.serve.max_batch_size),
        graceful_shutdown_timeout_s=settings.serve.drain_timeout_s,
    ).bind(settings)


def build_app(args: dict[str, Any]) -> Application:
    """Serve's application builder: ``args["settings"]`` holds nested overrides of the environment's Settings."""
    return answer_app(with_overrides(load_settings(), args.get("settings") or {}))


def serve_config(settings: Settings) -> dict[str, Any]:
    """The Serve config file ``serve.config`` names (relative paths: from the repository root)."""
    import yaml

    from deploy.ray_env import REPO

    path = settings.serve.config if settings.serve.config.is_absolute() else REPO / settings.serve.config
    return yaml.safe_load(path.read_text())


def deploy(settings: Settings) -> None:
    """Deploy the config's application on the cluster with these settings; returns once the replica runs.

    HTTP binds ``serve.host``:``serve.port`` (the config's http_options are for ``serve deploy``).
    """
    import importlib

    import ray

    from deploy.ray_env import ray_address, runtime_env

    app_config = next(a for a in serve_config(settings)["applications"] if a["name"] == settings.serve.app_name)
    module, _, attr = app_config["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), attr)
    if not ray.is_initialized():
        # The job's runtime env (repository as working_dir, Settings as env) is what the replicas run in.
        ray.init(address=ray_address(settings), runtime_env=runtime_env(settings), logging_level=logging.WARNING,
                 log_to_driver=False)  # the cluster's other jobs would print their workers' logs here
    serve.start(http_options={"host": settings.serve.host, "port": settings.serve.port}, proxy_location="HeadOnly")
    args = {**app_config.get("args", {}), "settings": settings.model_dump(mode="json")}
    serve.run(builder(args), name=settings.serve.app_name, route_prefix=app_config.get("route_prefix", "/"))


def undeploy(settings: Settings) -> None:
    """Delete the application (requests in flight get ``serve.drain_timeout_s``); Serve stops when none is left."""
    serve.delete(settings.serve.app_name)
    if not serve.status().applications:
        serve.shutdown()  # frees the HTTP port
