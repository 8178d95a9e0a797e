"""Validation, dead letters and batch storage of the accumulator core (SQLite)."""

from __future__ import annotations

import base64
import json

import pytest
from sqlalchemy import func, select
from stream_events import build_event

from schemas.settings import load_settings
from services.store import QAEventRow, create_schema, make_engine
from services.stream.ingest import (
    Rejection,
    SourceRecord,
    dead_letter,
    event_row,
    split_batch,
    store_batch,
    validate_record,
)


def _raw(**fields) -> bytes:
    record = json.loads(build_event().model_dump_json()) | fields
    return json.dumps(record).encode()


@pytest.mark.parametrize(
    ("raw", "category"),
    [
        (b"\xff\xfe\x00garbage", "undecodable"),
        (b"{not json", "invalid_json"),
        (_raw(schema_version=2), "unsupported_version"),
        (_raw(question="   "), "empty_field"),
        (_raw(answer=""), "empty_field"),
        (_raw(event_id="not-a-uuid"), "schema"),
        (_raw(unknown_field=1), "schema"),
        (_raw(question="q" * 5000), "too_long"),
        (_raw(answer="nul\x00inside"), "nul_character"),
        (b'[1, 2]', "schema"),
        (None, "empty_record"),
    ],
)
def test_bad_records_are_rejected_with_their_category(raw, category):
    outcome = validate_record(raw, max_bytes=100_000, max_text_chars=20_000)
    assert isinstance(outcome, Rejection)
    assert outcome.category == category
    assert outcome.reason.startswith(f"{category}: ") and len(outcome.detail) > 0


def test_oversize_is_rejected_before_decoding():
    outcome = validate_record(b"x" * 101, max_bytes=100, max_text_chars=20_000)
    assert outcome == Rejection("oversize", "101 bytes > 100")


def test_text_limit_from_settings_applies():
    outcome = validate_record(_raw(answer="a" * 50), max_bytes=100_000, max_text_chars=40)
    assert isinstance(outcome, Rejection) and outcome.category == "too_long"


def test_valid_record_passes():
    event = build_event()
    assert validate_record(event.model_dump_json().encode(), 100_000, 20_000) == event


def test_dead_letter_keeps_original_bytes_and_position():
    record = SourceRecord("qa.events", 1, 42, b"\xff\x00binary")
    letter = dead_letter(record, Rejection("undecodable", "bad"))
    assert base64.b64decode(letter.original) == b"\xff\x00binary"
    assert (letter.source_topic, letter.partition, letter.offset) == ("qa.events", 1, 42)
    assert letter.reason == "undecodable: bad"


def test_batch_is_split_and_duplicates_are_counted(sqlite_settings, sqlite_engine):
    events = [build_event(i) for i in range(4)]
    values = [e.model_dump_json().encode() for e in events] + [events[0].model_dump_json().encode(), b"{"]
    records = [SourceRecord("t", 0, offset, value) for offset, value in enumerate(values)]
    batch = split_batch(records, sqlite_settings)
    assert len(batch.rows) == 5 and [r.offset for r, _ in batch.rejected] == [5]
    result, refused = store_batch(sqlite_engine, batch.rows)
    assert (result.new, result.duplicates, refused) == (4, 1, [])
    again, _ = store_batch(sqlite_engine, batch.rows)  # redelivery of the whole batch
    assert (again.new, again.duplicates) == (0, 5)
    with sqlite_engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(QAEventRow)).scalar_one() == 4
        stored = conn.execute(select(QAEventRow.event_id, QAEventRow.offset).order_by(QAEventRow.row_id)).all()
    # the first delivery of an event wins; its source offset is kept
    assert stored == [(str(e.event_id), i) for i, e in enumerate(events)]


def test_database_refusal_is_isolated_to_the_refused_row(tmp_path):
    settings = load_settings([f"database.url=sqlite:///{tmp_path / 's.db'}"])
    engine = make_engine(settings)
    create_schema(engine)
    good = [(SourceRecord("t", 0, i, b""), {**_row(i)}) for i in range(3)]
    bad = (SourceRecord("t", 0, 9, b""), {**_row(9), "partition": "not-an-int-and-not-null", "offset": None})
    result, refused = store_batch(engine, [*good, bad])
    assert result.new == 3
    assert [(r.offset, j.category) for r, j in refused] == [(9, "store_refused")]
    engine.dispose()


def _row(n: int) -> dict:
    return event_row(build_event(n), SourceRecord("t", 0, n, b""))
