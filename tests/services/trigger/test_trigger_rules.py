"""Trigger decisions that need no S3 (threshold, coalescing, cooldown), ids, and the eval slice."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, insert, select
from stream_events import build_event

from schemas.events import RetrainRequest, utcnow
from schemas.settings import with_overrides
from services.store import RetrainRequestRow, SnapshotRow, insert_events
from services.stream.ingest import SourceRecord, event_row
from services.trigger.export import SnapshotWriteError, in_eval_slice, snapshot_id_for
from services.trigger.trigger import check_threshold, emit_manual, signal_drift


def _store(engine, n):
    with engine.begin() as conn:
        insert_events(conn, [event_row(build_event(i), SourceRecord("t", 0, i, b"")) for i in range(n)])


def _request_row(engine, request_id, state, reason="threshold", age_s=0.0):
    created = utcnow() - timedelta(seconds=age_s)
    with engine.begin() as conn:
        conn.execute(insert(RetrainRequestRow).values(
            request_id=request_id, reason=reason, watermark=0, state=state, request_json={},
            created_at=created, published_at=created))


def test_below_threshold_does_nothing(sqlite_settings, sqlite_engine):
    _store(sqlite_engine, 4)
    decision = check_threshold(sqlite_settings, sqlite_engine)
    assert (decision.action, decision.pending_rows, decision.request) == ("below_threshold", 4, None)


def test_in_flight_retrain_coalesces_the_threshold(sqlite_settings, sqlite_engine):
    _store(sqlite_engine, 6)
    _request_row(sqlite_engine, "rr-running", "started", age_s=10_000)
    decision = check_threshold(sqlite_settings, sqlite_engine)
    assert decision.action == "coalesced" and "rr-running" in decision.detail and decision.request is None


def test_drift_signal_needs_new_rows_and_coalesces_while_one_runs(sqlite_settings, sqlite_engine):
    assert signal_drift(sqlite_settings, {"psi": 0.4}, engine=sqlite_engine) is None
    _store(sqlite_engine, 1)
    _request_row(sqlite_engine, "rr-running", "requested", age_s=10_000)
    assert signal_drift(sqlite_settings, {"psi": 0.4}, engine=sqlite_engine) is None


def test_cooldown_holds_automatic_requests(sqlite_settings, sqlite_engine):
    _store(sqlite_engine, 6)
    _request_row(sqlite_engine, "rr-done", "promoted", age_s=60)  # finished, but only a minute ago
    decision = check_threshold(sqlite_settings, sqlite_engine)
    assert decision.action == "cooldown" and decision.request is None


def test_manual_requests_do_not_start_cooldown_and_s3_failure_records_nothing(sqlite_settings, sqlite_engine):
    _store(sqlite_engine, 6)
    _request_row(sqlite_engine, "rr-manual", "failed", reason="manual", age_s=1)
    dead_s3 = with_overrides(sqlite_settings, {"s3": {"endpoint": "http://127.0.0.1:9", "access_key": "a",
                                                      "secret_key": "b", "retries": 0}})
    # Not held by cooldown: it gets as far as the export, which fails cleanly on the dead endpoint.
    with pytest.raises(SnapshotWriteError, match="127.0.0.1:9"):
        check_threshold(dead_s3, sqlite_engine)
    with sqlite_engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(SnapshotRow)).scalar_one() == 0
        assert conn.execute(select(RetrainRequestRow.request_id)).scalars().all() == ["rr-manual"]


def test_manual_request_rejects_bad_overrides_before_any_work(sqlite_settings, sqlite_engine):
    with pytest.raises(ValueError, match="overrides"):
        emit_manual(sqlite_settings, "try lower lr", {"train": {"lr": "fast"}}, "tester", engine=sqlite_engine)
    with pytest.raises(ValueError, match="reason"):
        emit_manual(sqlite_settings, "  ", {}, "tester", engine=sqlite_engine)


def test_request_and_snapshot_ids_depend_only_on_reason_and_watermark():
    assert RetrainRequest.derive_id("threshold", 10) == RetrainRequest.derive_id("threshold", 10)
    assert RetrainRequest.derive_id("threshold", 10) != RetrainRequest.derive_id("threshold", 11)
    assert RetrainRequest.derive_id("threshold", 10) != RetrainRequest.derive_id("drift", 10)
    rid = RetrainRequest.derive_id("threshold", 10)
    assert snapshot_id_for(rid, 10) == snapshot_id_for(rid, 10) != snapshot_id_for(rid + "x", 10)


def test_eval_slice_is_stable_and_near_its_fraction():
    ids = [str(build_event(i).event_id) for i in range(4000)]
    chosen = [i for i in ids if in_eval_slice(i, 0.1)]
    assert chosen == [i for i in ids if in_eval_slice(i, 0.1)]
    assert 300 < len(chosen) < 500
    assert not any(in_eval_slice(i, 0.0) for i in ids)
