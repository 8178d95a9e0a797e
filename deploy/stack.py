"""The embedded stack: S3, Kafka-protocol broker, MLflow and a Ray head on 127.0.0.1.

    medretrain stack up       # idempotent: healthy services are kept as they are
    medretrain stack status
    medretrain stack down

Everything lives under ``settings.stack.home``: ``logs/<svc>.log``, ``run/<svc>.pid``,
``credentials.json`` (0600) and each service's data directory.
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from deploy import process
from deploy.embedded import Service, kafka, mlflow, ray, s3
from deploy.embedded.postgres import existing_databases
from deploy.process import ServiceError
from schemas.settings import Settings

log = logging.getLogger(__name__)

# Start order: the broker stores topics in S3, MLflow stores artifacts there.
SERVICES: tuple[Service, ...] = (s3.SERVICE, kafka.SERVICE, mlflow.SERVICE, ray.SERVICE)
APP_SERVICES = ("accumulator", "orchestrator")
"""medretrain's own long-running services (`medretrain serve NAME`), spawned beside the stack by the demo."""


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    url: str
    healthy: bool
    pid: int | None


Progress = Callable[[str], None]


@contextmanager
def _stack_lock(settings: Settings) -> Iterator[None]:
    """One ``up``/``down`` at a time per stack home (parallel test sessions share one stack)."""
    path = settings.stack.home / "run" / "stack.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _start(settings: Settings, service: Service) -> bool:
    """Start one service unless ours already runs; wait until healthy. True if we started it."""
    home, name = settings.stack.home, service.name
    timeout = settings.stack.start_timeout_s * service.timeout_factor
    pid = process.running_pid(home, name)
    started = pid is None
    if started:
        if service.healthy(settings):
            raise ServiceError(
                f"service {name!r}: {service.url(settings)} is already served by a process this stack did not "
                f"start (no pid file under {home / 'run'}); stop it or configure other ports"
            )
        _launch(settings, service, timeout)
    else:
        process.wait_healthy(home, name, pid, lambda: service.healthy(settings), timeout)
    try:
        service.ensure(settings)
    except Exception as e:
        logs = process.log_path(home, name)
        raise ServiceError(f"service {name!r} is up but its set-up failed: {e}; log {logs}") from e
    return started


def _launch(settings: Settings, service: Service, timeout_s: float) -> None:
    """Spawn the service and wait until healthy, launching it again if it dies first (``start_attempts``)."""
    home, name = settings.stack.home, service.name
    try:
        launch = service.launch(settings)
    except (RuntimeError, OSError, ValueError) as e:
        raise ServiceError(f"service {name!r} cannot start: {e}") from e
    for attempt in range(1, service.start_attempts + 1):
        pid = process.spawn(home, name, launch)
        try:
            process.wait_healthy(home, name, pid, lambda: service.healthy(settings), timeout_s)
            return
        except process.ExitedDuringStart as e:
            if attempt == service.start_attempts:
                raise
            log.warning("%s (attempt %d of %d); starting it again", str(e).splitlines()[0].rstrip(":"), attempt,
                        service.start_attempts)


def up(settings: Settings, progress: Progress = log.info) -> list[str]:
    """Bring every service up (idempotent); returns the names of those started now."""
    home = settings.stack.home
    if not s3.server_dir(settings).exists() and (earlier := existing_databases(settings)):
        raise ServiceError(
            f"PostgreSQL already has the databases {earlier}, but the stack home {home} is new: they are an earlier "
            "stack's, and their model versions and snapshots point at S3 objects that went with its home. Drop them "
            f"with `medretrain stack down --purge` (it also deletes {home}), or set database.url and "
            "mlflow.backend_store_uri to other databases"
        )
    home.mkdir(parents=True, exist_ok=True)
    started = []
    with _stack_lock(settings):
        for service in SERVICES:
            progress(f"{service.name}: starting")
            if _start(settings, service):
                started.append(service.name)
                progress(f"{service.name}: started, healthy at {service.url(settings)}")
            else:
                progress(f"{service.name}: already running, healthy at {service.url(settings)}")
    return started


def down(settings: Settings, progress: Progress = log.info, only: Iterable[str] | None = None) -> list[str]:
    """Stop our services (all, or those named in ``only``) in reverse start order; returns those that were running."""
    names = {s.name for s in SERVICES} if only is None else set(only)
    unknown = names - {s.name for s in SERVICES}
    if unknown:
        raise ValueError(f"unknown services {sorted(unknown)}; the stack has {[s.name for s in SERVICES]}")
    stopped = []
    with _stack_lock(settings):
        for service in reversed(SERVICES):
            if service.name in names and process.stop(settings.stack.home, service.name):
                stopped.append(service.name)
                progress(f"{service.name}: stopped")
    return stopped


def status(settings: Settings) -> list[ServiceStatus]:
    return [
        ServiceStatus(
            name=service.name,
            url=service.url(settings),
            healthy=service.healthy(settings),
            pid=process.running_pid(settings.stack.home, service.name),
        )
        for service in SERVICES
    ]
