"""What the system is doing right now: ``medretrain status``.

    medretrain status
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sqlalchemy import select

from schemas.artifacts import OnlineStats
from schemas.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class SystemStatus:
    rows_since_snapshot: int = 0
    threshold: int = 0
    cooldown_left_s: float = 0.0
    in_flight: dict | None = None
    """The retrain in progress: request id, state, Ray job id and its Ray status."""
    champion: str | None = None
    challenger: str | None = None
    consumer_lag: dict[str, int] = field(default_factory=dict)
    """``topic:partition`` -> end offset minus committed offset (end offsets are approximate on Tansu)."""
    recent: list[dict] = field(default_factory=list)
    """Last retrain requests, newest first."""
    online: dict[str, OnlineStats] = field(default_factory=dict)
    """Per version the answer service served: answers, ratings, +1 and correction rates (all time)."""
    outbox_pending: int | None = None
    """Answers and verified pairs the answer service has not got onto Kafka yet (broker down)."""
    serving: str | None = None
    """What the running answer service serves and any version it failed to load (its ``GET /v1/status``)."""
    problems: list[str] = field(default_factory=list)


def _serving_part(settings: Settings, status: SystemStatus) -> None:
    import httpx

    from services.answers.client import describe, service_status

    try:
        status.serving = describe(service_status(settings))
    except httpx.TransportError:
        status.serving = "not running"  # not a problem: the service is optional


def _store_part(settings: Settings, status: SystemStatus) -> None:
    from services.store import IN_FLIGHT_STATES, RetrainRequestRow, count_rows_between, last_watermark, make_engine
    from services.trigger.trigger import cooldown_left

    engine = make_engine(settings)
    with engine.connect() as conn:
        status.rows_since_snapshot = count_rows_between(conn, last_watermark(conn))
        status.cooldown_left_s = cooldown_left(conn, settings)
        rows = conn.execute(select(RetrainRequestRow).order_by(RetrainRequestRow.created_at.desc()).limit(5)).all()
        status.recent = [
            {"request": r.request_id, "reason": r.reason, "state": r.state, "version": r.model_version,
             "attempts": r.attempts, "detail": r.detail, "at": r.updated_at,
             "ray_job": r.gate_job_id if r.state == "evaluating" else r.ray_job_id}
            for r in rows
        ]
    engine.dispose()
    status.in_flight = next((r for r in status.recent if r["state"] in IN_FLIGHT_STATES), None)


def _answers_part(settings: Settings, status: SystemStatus) -> None:
    from services.answers.records import online_metrics
    from services.answers.relay import pending_count
    from services.store import create_schema, make_engine

    engine = make_engine(settings)
    try:
        create_schema(engine)  # before the answer service's first start its tables are simply empty
        status.online, status.outbox_pending = online_metrics(engine), pending_count(engine)
    finally:
        engine.dispose()


def _ray_part(settings: Settings, status: SystemStatus) -> None:
    from ray.job_submission import JobSubmissionClient

    job_id = (status.in_flight or {}).get("ray_job")
    if job_id:
        status.in_flight["ray_status"] = str(JobSubmissionClient(settings.ray.address).get_job_status(job_id))


def _registry_part(settings: Settings, status: SystemStatus) -> None:
    from deploy.registry import CHALLENGER, CHAMPION, alias_version, open_registry

    client, name = open_registry(settings)
    status.champion = alias_version(client, name, CHAMPION)
    status.challenger = alias_version(client, name, CHALLENGER)


def _lag_part(settings: Settings, status: SystemStatus) -> None:
    from kafka import KafkaAdminClient, KafkaConsumer

    admin = KafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap, request_timeout_ms=5000)
    try:
        group = settings.kafka.accumulator_group
        committed = admin.list_group_offsets(group).get(group, {})
    finally:
        admin.close()
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka.bootstrap, request_timeout_ms=5000)
    try:
        ends = consumer.end_offsets(list(committed)) if committed else {}
    finally:
        consumer.close()
    status.consumer_lag = {
        f"{tp.topic}:{tp.partition}": max(0, ends[tp] - meta.offset) for tp, meta in committed.items()
    }


def collect(settings: Settings) -> SystemStatus:
    """Every part that answers; a part whose service is down becomes a line in ``problems``."""
    status = SystemStatus(threshold=settings.trigger.threshold)
    parts = (
        (_store_part, "database"),
        (_answers_part, "answer records"),
        (_ray_part, "Ray"),
        (_registry_part, "MLflow"),
        (_lag_part, "broker"),
        (_serving_part, "answer service"),
    )
    for part, service in parts:
        try:
            part(settings, status)
        except Exception as e:  # status must render whatever is down
            status.problems.append(f"{service}: {type(e).__name__}: {e}")
    return status
