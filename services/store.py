"""Durable store of accepted events, snapshots and retrain requests (SQLAlchemy 2).

PostgreSQL by default (``database.url``); ``sqlite:///path.db`` works for the smallest setup.

    engine = make_engine(settings)
    create_schema(engine)
    with engine.begin() as conn:
        result = insert_events(conn, rows)   # InsertResult(new=..., duplicates=...)

``qa_events.row_id`` is the watermark axis: a snapshot covers the rows in
``(previous watermark, watermark]``. ``event_id`` is unique, so a redelivered or
republished event is counted as a duplicate and never stored twice.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic_core import to_json
from sqlalchemy import (
    JSON,
    BigInteger,
    Connection,
    DateTime,
    Engine,
    Integer,
    String,
    Text,
    create_engine,
    func,
    inspect,
    make_url,
    select,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from schemas.events import RetrainRequest, utcnow
from schemas.settings import Settings

log = logging.getLogger(__name__)

# SQLite only auto-increments an INTEGER primary key; everywhere else row ids are 64-bit.
RowId = BigInteger().with_variant(Integer, "sqlite")

IN_FLIGHT_STATES = ("requested", "started", "evaluating")
"""States of a retrain request that block another automatic request (the orchestrator moves rows out of them)."""


class Base(DeclarativeBase):
    type_annotation_map = {datetime: DateTime(timezone=True)}


class QAEventRow(Base):
    """An accepted production QA event."""

    __tablename__ = "qa_events"
    __table_args__ = {"sqlite_autoincrement": True}  # never reuse row ids: they are watermarks

    row_id: Mapped[int] = mapped_column(RowId, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(36), unique=True)
    question: Mapped[str] = mapped_column(Text)
    answer: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(200))
    qtype: Mapped[str | None] = mapped_column(String(200))
    focus: Mapped[str | None] = mapped_column(String(200))
    produced_at: Mapped[datetime]
    model_version: Mapped[str | None] = mapped_column(String(200))
    user_rating: Mapped[int | None] = mapped_column(Integer)
    topic: Mapped[str] = mapped_column(String(255))
    partition: Mapped[int] = mapped_column(Integer)
    offset: Mapped[int] = mapped_column(BigInteger)
    ingested_at: Mapped[datetime] = mapped_column(default=utcnow)


class SnapshotRow(Base):
    """A frozen export to S3; ``max_row_id`` is its watermark."""

    __tablename__ = "snapshots"

    snapshot_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(200), index=True)
    min_row_id: Mapped[int] = mapped_column(BigInteger)
    max_row_id: Mapped[int] = mapped_column(BigInteger, index=True)
    row_count: Mapped[int] = mapped_column(Integer)
    train_rows: Mapped[int] = mapped_column(Integer)
    eval_rows: Mapped[int] = mapped_column(Integer)
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class RetrainRequestRow(Base):
    """One retrain request and its lifecycle; the trigger inserts, the orchestrator updates."""

    __tablename__ = "retrain_requests"

    request_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    reason: Mapped[str] = mapped_column(String(20))
    watermark: Mapped[int] = mapped_column(BigInteger)
    snapshot_id: Mapped[str | None] = mapped_column(String(200))
    request_json: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(20), index=True)
    ray_job_id: Mapped[str | None] = mapped_column(String(200))
    """The current attempt's training job; ``gate_job_id`` is its gate job (state ``evaluating``)."""
    gate_job_id: Mapped[str | None] = mapped_column(String(200))
    run_id: Mapped[str | None] = mapped_column(String(200))
    model_version: Mapped[str | None] = mapped_column(String(200))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    detail: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    published_at: Mapped[datetime | None]
    """Set once the request is on the requests topic; unpublished rows are re-sent after a crash."""


@dataclass(frozen=True)
class InsertResult:
    new: int
    duplicates: int


def _ensure_postgres_database(url: str) -> None:
    """Create the configured database on first use (the server is shared with MLflow's own database)."""
    target = make_url(url)
    admin = create_engine(target.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            exists = conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": target.database}).first()
            if exists is None:
                # Identifiers cannot be bound parameters; quote it through the dialect instead.
                conn.execute(text(f"CREATE DATABASE {admin.dialect.identifier_preparer.quote(target.database)}"))
                log.info("created database %s", target.database)
    finally:
        admin.dispose()


def make_engine(settings: Settings) -> Engine:
    """An engine on ``settings.database.url``; creates the PostgreSQL database or SQLite folder if missing."""
    url = make_url(settings.database.url)
    if url.get_backend_name() == "postgresql":
        _ensure_postgres_database(settings.database.url)
        return create_engine(url, pool_pre_ping=True)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        # The accumulator writes from worker threads; SQLite itself serialises writers.
        return create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
    return create_engine(url, pool_pre_ping=True)


ADDED_COLUMNS = {"retrain_requests": {"gate_job_id": "VARCHAR(200)"}}
"""Columns added after a table first shipped: create_all leaves existing tables as they are."""


def create_schema(engine: Engine) -> None:
    """Create missing tables and add missing columns (idempotent, also on a database made by an older release)."""
    Base.metadata.create_all(engine)
    tables = inspect(engine)
    with engine.begin() as conn:
        for table, columns in ADDED_COLUMNS.items():
            present = {c["name"] for c in tables.get_columns(table)}
            for name, sql_type in columns.items():
                if name not in present:
                    conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {name} {sql_type}"))


# One fixed statement per batch on PostgreSQL, with the rows as one JSON parameter: a multi-row VALUES list
# differs in length per batch (the driver re-parses such long statements every time), and per-column arrays
# cost psycopg a Python call per value; pydantic_core encodes the whole batch in one Rust call.
_PG_COLUMN_TYPES = {
    "event_id": "text", "question": "text", "answer": "text", "source": "text", "qtype": "text", "focus": "text",
    "produced_at": "timestamptz", "model_version": "text", "user_rating": "int", "topic": "text",
    "partition": "int", "offset": "bigint",
}
_PG_INSERT = text(
    "WITH inserted AS (INSERT INTO qa_events ({columns}, ingested_at) "
    "SELECT *, CAST(:now AS timestamptz) FROM json_to_recordset(CAST(:rows AS json)) AS r({typed}) "
    "ON CONFLICT (event_id) DO NOTHING RETURNING 1) SELECT count(*) FROM inserted".format(
        columns=", ".join(f'"{name}"' for name in _PG_COLUMN_TYPES),
        typed=", ".join(f'"{name}" {kind}' for name, kind in _PG_COLUMN_TYPES.items()),
    )
)


def insert_events(conn: Connection, rows: Sequence[dict[str, Any]]) -> InsertResult:
    """Insert event rows, skipping any whose event_id is already stored (or repeats within ``rows``)."""
    if not rows:
        return InsertResult(0, 0)
    now = utcnow()
    if conn.dialect.name == "postgresql":
        new = conn.execute(_PG_INSERT, {"rows": to_json(rows).decode(), "now": now}).scalar_one()
    elif conn.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert

        stmt = insert(QAEventRow).on_conflict_do_nothing(index_elements=["event_id"]).returning(QAEventRow.row_id)
        new = len(conn.execute(stmt, [{"ingested_at": now} | row for row in rows]).all())
    else:
        raise NotImplementedError(f"event inserts are implemented for postgresql and sqlite, not {conn.dialect.name}")
    return InsertResult(new=new, duplicates=len(rows) - new)


def lock_for_watermark(conn: Connection) -> None:
    """Wait for in-flight event inserts, so no row below the watermark read next can still appear.

    Row ids come from a sequence: with several writers a lower id may commit after a higher
    one, and a snapshot cut at the higher one would skip it forever. SHARE mode conflicts only
    with writers, so readers go on. SQLite serialises writers already.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(text("LOCK TABLE qa_events IN SHARE MODE"))


def max_row_id(conn: Connection) -> int:
    return conn.execute(select(func.coalesce(func.max(QAEventRow.row_id), 0))).scalar_one()


def last_snapshot_manifest(conn: Connection) -> dict[str, Any] | None:
    """Manifest of the snapshot with the highest watermark, or None before the first one."""
    stmt = select(SnapshotRow.manifest).order_by(SnapshotRow.max_row_id.desc()).limit(1)
    return conn.execute(stmt).scalar_one_or_none()


def last_watermark(conn: Connection) -> int:
    """Highest row id already covered by a snapshot (0 before the first one)."""
    return conn.execute(select(func.coalesce(func.max(SnapshotRow.max_row_id), 0))).scalar_one()


def count_rows_between(conn: Connection, low_exclusive: int, high_inclusive: int | None = None) -> int:
    stmt = select(func.count()).select_from(QAEventRow).where(QAEventRow.row_id > low_exclusive)
    if high_inclusive is not None:
        stmt = stmt.where(QAEventRow.row_id <= high_inclusive)
    return conn.execute(stmt).scalar_one()


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; everything stored is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def load_request(settings: Settings, request_id: str) -> RetrainRequest:
    """The RetrainRequest stored under ``request_id``; KeyError if the trigger never recorded it."""
    engine = make_engine(settings)
    try:
        with engine.connect() as conn:
            stmt = select(RetrainRequestRow.request_json).where(RetrainRequestRow.request_id == request_id)
            payload = conn.execute(stmt).scalar_one_or_none()
    finally:
        engine.dispose()
    if payload is None:
        raise KeyError(f"no retrain request {request_id!r} in {make_url(settings.database.url).render_as_string()}")
    return RetrainRequest.model_validate(payload)
