"""The store: dedupe by event_id and verbatim rows (SQLite and PostgreSQL), watermark helpers, stored requests."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from sqlalchemy import create_engine, insert, make_url, select, text
from stream_events import build_event

from schemas.events import RetrainRequest
from schemas.settings import load_settings
from services.store import (
    QAEventRow,
    RetrainRequestRow,
    SnapshotRow,
    count_rows_between,
    create_schema,
    insert_events,
    last_watermark,
    load_request,
    make_engine,
    max_row_id,
)
from services.stream.ingest import SourceRecord, event_row

# Text that a hand-built statement or a JSON encoding would mangle.
AWKWARD = ['quote " and \\ backslash', "it's; DROP TABLE qa_events; --", "é 中文 😀 \u2028", "tab\tand\nnewline",
           '{"looks": ["like", "json"]}', "\\u0000 escaped, not NUL", "$1 %s %(x)s :now ?"]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def store_engine(request, sqlite_engine):
    """The store on each database the event insert has a path for (PostgreSQL: a scratch database)."""
    if request.param == "sqlite":
        yield sqlite_engine
        return
    url = make_url(load_settings().database.url).set(database=f"medretrain_store_{uuid.uuid4().hex[:10]}")
    engine = make_engine(load_settings([f"database.url={url.render_as_string(hide_password=False)}"]))
    create_schema(engine)
    yield engine
    engine.dispose()
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE "{url.database}" WITH (FORCE)'))
    admin.dispose()


def _rows(events, offset0=0):
    return [event_row(e, SourceRecord("t", 0, offset0 + i, b"")) for i, e in enumerate(events)]


def test_duplicates_within_and_across_batches_are_counted_not_stored(store_engine):
    events = [build_event(i) for i in range(3)]
    with store_engine.begin() as conn:
        first = insert_events(conn, _rows(events + events[:1]))
        second = insert_events(conn, _rows(events[1:] + [build_event(9)]))
        assert max_row_id(conn) >= 4
        assert count_rows_between(conn, 0) == 4
    assert (first.new, first.duplicates) == (3, 1)
    assert (second.new, second.duplicates) == (1, 2)


def test_rows_are_stored_verbatim(store_engine):
    produced = datetime(2026, 11, 26, 1, 2, 3, 456789, tzinfo=UTC)
    events = [build_event(i, question=t, answer=t[::-1], qtype=t[:200], focus=None, model_version="v1",
                          user_rating=1 + i % 5, produced_at=produced) for i, t in enumerate(AWKWARD)]
    before = datetime.now(UTC)
    with store_engine.begin() as conn:
        assert insert_events(conn, _rows(events, offset0=2**40)).new == len(events)
    with store_engine.connect() as conn:
        stored = {row.event_id: row for row in conn.execute(select(QAEventRow))}
    for i, event in enumerate(events):
        row = stored[str(event.event_id)]
        assert (row.question, row.answer, row.qtype, row.focus) == (event.question, event.answer, event.qtype, None)
        assert (row.source, row.model_version, row.user_rating) == (event.source, "v1", event.user_rating)
        assert (row.topic, row.partition, row.offset) == ("t", 0, 2**40 + i)
        assert row.produced_at.replace(tzinfo=row.produced_at.tzinfo or UTC) == produced
        assert row.ingested_at.replace(tzinfo=row.ingested_at.tzinfo or UTC) >= before.replace(microsecond=0)


def test_rows_since_last_snapshot_counts_from_the_highest_watermark(sqlite_engine):
    with sqlite_engine.begin() as conn:
        insert_events(conn, _rows([build_event(i) for i in range(7)]))
        assert last_watermark(conn) == 0 and count_rows_between(conn, last_watermark(conn)) == 7
        conn.execute(insert(SnapshotRow).values(snapshot_id="s1", request_id="r", min_row_id=1, max_row_id=4,
                                                row_count=4, train_rows=4, eval_rows=0, manifest={}))
        assert last_watermark(conn) == 4 and count_rows_between(conn, last_watermark(conn)) == 3


def test_load_request_round_trips_and_names_a_missing_id(sqlite_settings, sqlite_engine):
    request = RetrainRequest(request_id="rr-1", reason="manual", watermark=3, overrides={"train": {"lr": 1e-4}})
    with sqlite_engine.begin() as conn:
        conn.execute(
            insert(RetrainRequestRow).values(
                request_id="rr-1",
                reason="manual",
                watermark=3,
                state="requested",
                request_json=request.model_dump(mode="json"),
            )
        )
    assert load_request(sqlite_settings, "rr-1") == request
    with pytest.raises(KeyError, match="rr-missing"):
        load_request(sqlite_settings, "rr-missing")
