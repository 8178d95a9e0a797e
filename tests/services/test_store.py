"""The store on SQLite: dedupe by event_id, watermark helpers, stored requests."""

from __future__ import annotations

import pytest
from sqlalchemy import insert
from stream_events import build_event

from schemas.events import RetrainRequest
from services.ingest import SourceRecord, event_row
from services.store import (
    RetrainRequestRow,
    SnapshotRow,
    count_rows_between,
    insert_events,
    last_watermark,
    load_request,
    max_row_id,
)


def _rows(events, offset0=0):
    return [event_row(e, SourceRecord("t", 0, offset0 + i, b"")) for i, e in enumerate(events)]


def test_duplicates_within_and_across_batches_are_counted_not_stored(sqlite_engine):
    events = [build_event(i) for i in range(3)]
    with sqlite_engine.begin() as conn:
        first = insert_events(conn, _rows(events + events[:1]))
        second = insert_events(conn, _rows(events[1:] + [build_event(9)]))
        assert max_row_id(conn) >= 4
        assert count_rows_between(conn, 0) == 4
    assert (first.new, first.duplicates) == (3, 1)
    assert (second.new, second.duplicates) == (1, 2)


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
        conn.execute(insert(RetrainRequestRow).values(request_id="rr-1", reason="manual", watermark=3, state="requested",
                                                       request_json=request.model_dump(mode="json")))
    assert load_request(sqlite_settings, "rr-1") == request
    with pytest.raises(KeyError, match="rr-missing"):
        load_request(sqlite_settings, "rr-missing")
