"""What the system is doing right now: ``medretrain status``.

    medretrain status
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sqlalchemy import select

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
    problems: list[str] = field(default_factory=list)


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
    for part, service in (
        (_store_part, "database"),
        (_ray_part, "Ray"),
        (_registry_part, "MLflow"),
        (_lag_part, "broker"),
    ):
        try:
            part(settings, status)
        except Exception as e:  # status must render whatever is down
            status.problems.append(f"{service}: {type(e).__name__}: {e}")
    return status
