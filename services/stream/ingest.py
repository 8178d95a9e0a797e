"""The accumulator's core without faust: validate raw records, split a batch, store it.

    outcome = validate_record(raw, max_bytes=1_000_000, max_text_chars=20_000)  # QAEvent | Rejection
    batch = split_batch(records, settings)                                   # rows + rejections
    result, rejected = store_batch(engine, batch.rows)                        # InsertResult + store rejects

Kept apart from ``services/stream/accumulator.py`` so every rule here is unit-tested on SQLite.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from schemas.events import DeadLetter, QAEvent, describe_errors
from schemas.settings import Settings
from services.store import InsertResult, insert_events

log = logging.getLogger(__name__)

_TEXT_FIELDS = ("question", "answer", "source", "qtype", "focus", "model_version")


@dataclass(frozen=True)
class SourceRecord:
    """One record as fetched: where it came from and its value bytes."""

    topic: str
    partition: int
    offset: int
    value: bytes | None


@dataclass(frozen=True)
class Rejection:
    category: str
    """Short, fixed label (metric label and DLQ reason prefix)."""
    detail: str

    @property
    def reason(self) -> str:
        return f"{self.category}: {self.detail}"


@dataclass
class Batch:
    rows: list[tuple[SourceRecord, dict[str, Any]]] = field(default_factory=list)
    rejected: list[tuple[SourceRecord, Rejection]] = field(default_factory=list)


def _classify(error: ValidationError) -> Rejection:
    """Name the first problem class that explains the failure; the detail lists every problem."""
    problems = error.errors()
    detail = describe_errors(error)[:1000]
    types = {p["type"] for p in problems}
    locs = {p["loc"][0] for p in problems if p["loc"]}
    if types & {"json_invalid", "json_type"}:
        return Rejection("invalid_json", detail)
    if "schema_version" in locs:
        return Rejection("unsupported_version", detail)
    if any(
        p["type"] in {"string_too_short", "missing"} and p["loc"][:1] in {("question",), ("answer",)} for p in problems
    ):
        return Rejection("empty_field", detail)
    if "string_too_long" in types:
        return Rejection("too_long", detail)
    return Rejection("schema", detail)


def validate_record(raw: bytes | None, max_bytes: int, max_text_chars: int) -> QAEvent | Rejection:
    """A QAEvent, or why the record cannot be accepted. Never raises on input."""
    if raw is None:
        return Rejection("empty_record", "record has no value")
    if len(raw) > max_bytes:
        return Rejection("oversize", f"{len(raw)} bytes > {max_bytes}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Rejection("undecodable", f"value is not UTF-8: {e}")
    try:
        event = QAEvent.model_validate_json(text)
    except ValidationError as e:
        return _classify(e)
    too_long = [name for name in ("question", "answer") if len(getattr(event, name)) > max_text_chars]
    if too_long:
        return Rejection("too_long", f"{', '.join(too_long)} longer than {max_text_chars} characters")
    # PostgreSQL text cannot hold NUL; accepting it would wedge the batch in the database.
    with_nul = [name for name in _TEXT_FIELDS if "\x00" in (getattr(event, name) or "")]
    if with_nul:
        return Rejection("nul_character", f"NUL character in {', '.join(with_nul)}")
    return event


def event_row(event: QAEvent, record: SourceRecord) -> dict[str, Any]:
    """The qa_events row of an accepted event."""
    values = event.model_dump(exclude={"schema_version"})
    values["event_id"] = str(event.event_id)
    return values | {"topic": record.topic, "partition": record.partition, "offset": record.offset}


def dead_letter(record: SourceRecord, rejection: Rejection) -> DeadLetter:
    return DeadLetter(
        reason=rejection.reason,
        source_topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        original=base64.b64encode(record.value or b"").decode("ascii"),
    )


def split_batch(records: Sequence[SourceRecord], settings: Settings) -> Batch:
    batch = Batch()
    for record in records:
        outcome = validate_record(record.value, settings.kafka.max_message_bytes, settings.stream.max_text_chars)
        if isinstance(outcome, Rejection):
            batch.rejected.append((record, outcome))
        else:
            batch.rows.append((record, event_row(outcome, record)))
    return batch


def is_retryable(error: DBAPIError) -> bool:
    """Connection trouble is worth waiting for; data the database refuses is not."""
    return isinstance(error, OperationalError | InterfaceError) or error.connection_invalidated


def store_batch(
    engine: Engine, rows: Sequence[tuple[SourceRecord, dict[str, Any]]]
) -> tuple[InsertResult, list[tuple[SourceRecord, Rejection]]]:
    """Insert a batch in one transaction; if the database refuses it, find the refused rows one by one.

    Retryable (connection) errors propagate: the caller waits and retries, offsets stay uncommitted.
    """
    try:
        with engine.begin() as conn:
            return insert_events(conn, [row for _, row in rows]), []
    except DBAPIError as e:
        if is_retryable(e):
            raise
        log.warning("database refused a batch of %d rows (%s); retrying row by row", len(rows), e.orig)
    new = duplicates = 0
    refused: list[tuple[SourceRecord, Rejection]] = []
    for record, row in rows:
        try:
            with engine.begin() as conn:
                result = insert_events(conn, [row])
        except DBAPIError as e:
            if is_retryable(e):
                raise
            refused.append((record, Rejection("store_refused", str(e.orig)[:500])))
            continue
        new, duplicates = new + result.new, duplicates + result.duplicates
    return InsertResult(new=new, duplicates=duplicates), refused
