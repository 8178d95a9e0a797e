"""Decide when to retrain and emit ``RetrainRequest``s: threshold, drift signal, manual.

    decision = check_threshold(settings, engine)      # the accumulator calls this after each batch
    request = signal_drift(settings, {"psi": 0.31})   # a drift detector calls this
    request = emit_manual(settings, "new guideline", {"train": {"lr": 1e-4}}, "alice")

Emitting is: snapshot to S3, then (one transaction) the snapshots row and the
``retrain_requests`` row, then publish on ``kafka.requests_topic`` and mark it published.
The request id is derived from reason and watermark, so a trigger that fires again for
the same data (restart, redelivery) finds its own row instead of making a second
request; a row left unpublished by a crash is sent by :func:`republish_pending`.
Automatic requests respect ``trigger.cooldown_s`` and coalesce while one is in flight
(the pending rows simply wait for the next request); manual requests queue behind it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from pydantic import ValidationError
from sqlalchemy import Connection, Engine, insert, select, text, update

from schemas.events import RetrainReason, RetrainRequest, utcnow
from schemas.settings import Settings, with_overrides
from services.store import (
    IN_FLIGHT_STATES,
    RetrainRequestRow,
    as_utc,
    count_rows_between,
    last_watermark,
    lock_for_watermark,
    make_engine,
    max_row_id,
)
from services.trigger.export import export_snapshot, record_snapshot

log = logging.getLogger(__name__)

Action = Literal["emitted", "below_threshold", "no_new_rows", "cooldown", "coalesced", "busy"]

# Any fixed 64-bit key: one trigger decides at a time across processes sharing the database.
_PG_LOCK_KEY = 0x6D6564_7274_7267
_local_lock = threading.Lock()


@dataclass(frozen=True)
class Decision:
    action: Action
    pending_rows: int
    request: RetrainRequest | None = None
    detail: str = ""


@dataclass(frozen=True)
class _Window:
    """Rows not yet covered by a snapshot, read under the watermark lock."""

    low: int
    watermark: int
    pending: int


@contextmanager
def _engine_for(settings: Settings, engine: Engine | None) -> Iterator[Engine]:
    if engine is not None:
        yield engine
        return
    owned = make_engine(settings)
    try:
        yield owned
    finally:
        owned.dispose()


@contextmanager
def _decision_lock(engine: Engine, wait: bool) -> Iterator[bool]:
    """Serialise trigger decisions in this process and, on PostgreSQL, across processes."""
    if not _local_lock.acquire(blocking=wait):
        yield False
        return
    try:
        if engine.dialect.name != "postgresql":
            yield True
            return
        with engine.connect() as conn:
            fn = "pg_advisory_lock" if wait else "pg_try_advisory_lock"
            got = conn.execute(text(f"SELECT {fn}(:k)"), {"k": _PG_LOCK_KEY}).scalar()
            conn.commit()  # the advisory lock is held by the session; do not sit idle in a transaction
            try:
                yield got is not False
            finally:
                if got is not False:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK_KEY})
                conn.commit()
    finally:
        _local_lock.release()


def _window(engine: Engine) -> _Window:
    with engine.begin() as conn:
        low = last_watermark(conn)
        lock_for_watermark(conn)
        watermark = max_row_id(conn)
        return _Window(low=low, watermark=watermark, pending=count_rows_between(conn, low, watermark))


def _in_flight(conn: Connection) -> str | None:
    stmt = select(RetrainRequestRow.request_id).where(RetrainRequestRow.state.in_(IN_FLIGHT_STATES)).limit(1)
    return conn.execute(stmt).scalar_one_or_none()


def cooldown_left(conn: Connection, settings: Settings) -> float:
    """Seconds until an automatic request may go again (manual requests neither wait nor start it)."""
    stmt = select(RetrainRequestRow.created_at).where(RetrainRequestRow.reason.in_(("threshold", "drift")))
    last = conn.execute(stmt.order_by(RetrainRequestRow.created_at.desc()).limit(1)).scalar_one_or_none()
    if last is None:
        return 0.0
    elapsed = utcnow() - as_utc(last)
    return max(0.0, (timedelta(seconds=settings.trigger.cooldown_s) - elapsed).total_seconds())


def _automatic_gate(engine: Engine, settings: Settings, window: _Window) -> tuple[Action, str] | None:
    """Why an automatic request must wait, or None when it may go now."""
    with engine.connect() as conn:
        blocking = _in_flight(conn)
        if blocking is not None:
            return "coalesced", f"{window.pending} rows wait: retrain {blocking} is in flight"
        left = cooldown_left(conn, settings)
    if left > 0:
        return "cooldown", f"{window.pending} rows wait: cooldown has {left:.0f}s left"
    return None


def _publish(settings: Settings, request: RetrainRequest) -> None:
    from services.stream.publisher import make_producer

    # Fail within seconds when the broker is away: the request is recorded and republished later.
    producer = make_producer(settings, client_id="medretrain-trigger", bootstrap_timeout_ms=10_000, max_block_ms=10_000)
    try:
        producer.send(settings.kafka.requests_topic, key=request.request_id.encode(),
                      value=request.model_dump_json().encode()).get(timeout=30)
        producer.flush()
    finally:
        producer.close()


def _mark_published(engine: Engine, request_id: str) -> None:
    with engine.begin() as conn:
        conn.execute(update(RetrainRequestRow).where(RetrainRequestRow.request_id == request_id)
                     .values(published_at=utcnow()))


def _stored_request(engine: Engine, request_id: str) -> RetrainRequest | None:
    with engine.connect() as conn:
        stmt = select(RetrainRequestRow.request_json).where(RetrainRequestRow.request_id == request_id)
        payload = conn.execute(stmt).scalar_one_or_none()
    return None if payload is None else RetrainRequest.model_validate(payload)


def _emit(settings: Settings, engine: Engine, request: RetrainRequest) -> RetrainRequest:
    """Snapshot, record and publish ``request``; an id already recorded is returned as it was."""
    existing = _stored_request(engine, request.request_id)
    if existing is not None:
        log.info("retrain request %s already recorded; not emitting it twice", request.request_id)
        republish_pending(settings, engine)
        return existing
    manifest = export_snapshot(settings, engine, request.request_id, request.watermark)
    request = request.model_copy(update={"snapshot_id": manifest.snapshot_id})
    with engine.begin() as conn:
        record_snapshot(conn, manifest)
        conn.execute(insert(RetrainRequestRow).values(
            request_id=request.request_id, reason=request.reason, watermark=request.watermark,
            snapshot_id=request.snapshot_id, request_json=request.model_dump(mode="json"), state="requested",
        ))
    _publish(settings, request)
    _mark_published(engine, request.request_id)
    log.info("retrain request %s emitted (%s, watermark %d, snapshot %s)", request.request_id, request.reason,
             request.watermark, request.snapshot_id)
    return request


def republish_pending(settings: Settings, engine: Engine | None = None) -> int:
    """Publish requests recorded but never published (a crash between commit and send); returns how many."""
    with _engine_for(settings, engine) as eng:
        with eng.connect() as conn:
            stmt = select(RetrainRequestRow.request_json).where(RetrainRequestRow.published_at.is_(None))
            stored = conn.execute(stmt.order_by(RetrainRequestRow.created_at)).scalars()
            pending = [RetrainRequest.model_validate(p) for p in stored]
        for request in pending:
            _publish(settings, request)
            _mark_published(eng, request.request_id)
            log.info("retrain request %s published after a restart", request.request_id)
        return len(pending)


def _automatic(
    settings: Settings, engine: Engine, reason: RetrainReason, evidence: dict[str, Any], needed_rows: int
) -> Decision:
    with _decision_lock(engine, wait=False) as acquired:
        if not acquired:
            return Decision("busy", 0, detail="another trigger is deciding")
        window = _window(engine)
        if window.pending < needed_rows:
            action: Action = "no_new_rows" if reason == "drift" else "below_threshold"
            return Decision(action, window.pending, detail=f"{window.pending} of {needed_rows} rows")
        gate = _automatic_gate(engine, settings, window)
        if gate is not None:
            log.info("%s trigger waits: %s", reason, gate[1])
            return Decision(gate[0], window.pending, detail=gate[1])
        evidence = {"rows": window.pending, "from_row_id": window.low + 1} | evidence
        request = RetrainRequest(
            request_id=RetrainRequest.derive_id(reason, window.watermark),
            reason=reason,
            evidence=evidence,
            watermark=window.watermark,
        )
        return Decision("emitted", window.pending, _emit(settings, engine, request))


def check_threshold(settings: Settings, engine: Engine | None = None) -> Decision:
    """Emit a threshold request if ``trigger.threshold`` rows arrived since the last snapshot and nothing blocks it."""
    with _engine_for(settings, engine) as eng:
        evidence = {"threshold": settings.trigger.threshold}
        return _automatic(settings, eng, "threshold", evidence, settings.trigger.threshold)


def signal_drift(settings: Settings, evidence: dict[str, Any], engine: Engine | None = None) -> RetrainRequest | None:
    """A drift detector's entry: a retrain over the new rows, unless cooldown or an in-flight retrain holds it back."""
    with _engine_for(settings, engine) as eng:
        decision = _automatic(settings, eng, "drift", {"drift": evidence}, needed_rows=1)
    log.info("drift signal: %s (%s)", decision.action, decision.detail or "request emitted")
    return decision.request


def emit_manual(
    settings: Settings, reason_text: str, overrides: dict[str, Any], requested_by: str, engine: Engine | None = None
) -> RetrainRequest:
    """An operator's request: bypasses threshold and cooldown, queues behind an in-flight retrain."""
    if not reason_text.strip():
        raise ValueError("a manual retrain needs a reason (--reason)")
    try:
        with_overrides(settings, overrides)
    except ValidationError as e:
        raise ValueError(f"overrides do not fit the settings: {e}") from e
    with _engine_for(settings, engine) as eng, _decision_lock(eng, wait=True):
        window = _window(eng)
        with eng.connect() as conn:
            blocking = _in_flight(conn)
        if blocking is not None:
            log.info("manual request queued behind in-flight retrain %s", blocking)
        # The same command repeated for the same data is one request; other text or overrides make a new one.
        salt = hashlib.sha256(json.dumps([reason_text, overrides, requested_by], sort_keys=True).encode()).hexdigest()
        request = RetrainRequest(
            request_id=RetrainRequest.derive_id("manual", window.watermark, salt=salt),
            reason="manual",
            evidence={"text": reason_text, "rows": window.pending, "from_row_id": window.low + 1},
            watermark=window.watermark,
            requested_by=requested_by,
            overrides=overrides,
        )
        return _emit(settings, eng, request)
