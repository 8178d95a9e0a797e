"""S3 failing while snapshotting: bounded retries, a clean failure, and no half-written snapshot ever used.

    .venv/bin/pytest tests/faults/test_storage_faults.py -q

S3 is reached through a real TCP proxy that cuts chosen requests (tests/faults/faulty_proxy.py).
"""

from __future__ import annotations

import pytest
from faulty_proxy import FaultyProxy
from sqlalchemy import func, select
from stream_events import build_event
from stream_stack import free_port

from schemas.settings import with_overrides
from services.store import RetrainRequestRow, SnapshotRow, insert_events
from services.stream.ingest import SourceRecord, event_row
from services.trigger.export import SnapshotWriteError
from services.trigger.trigger import check_threshold
from trainer.snapshot_reader import SnapshotError, read_snapshot

pytestmark = pytest.mark.integration

RETRIES = 2


def _store_events(env, n: int) -> None:
    engine = env.engine()
    with engine.begin() as conn:
        insert_events(conn, [event_row(build_event(i), SourceRecord(env.settings.kafka.events_topic, 0, i, b""))
                             for i in range(n)])
    engine.dispose()


def _recorded(env) -> tuple[int, int]:
    """(snapshot rows, retrain request rows) in the store."""
    engine = env.engine()
    with engine.connect() as conn:
        counts = tuple(conn.execute(select(func.count()).select_from(table)).scalar_one()
                       for table in (SnapshotRow, RetrainRequestRow))
    engine.dispose()
    return counts


def _via(env, proxy: FaultyProxy):
    return with_overrides(env.settings, {"s3": {"endpoint": proxy.url, "retries": RETRIES}})


def test_unreachable_s3_fails_the_snapshot_cleanly_and_records_nothing(stream_env):
    env = stream_env(**{"trigger.threshold": 10, "trigger.cooldown_s": 0})
    _store_events(env, 12)
    closed = with_overrides(env.settings, {"s3": {"endpoint": f"http://127.0.0.1:{free_port()}", "retries": RETRIES}})
    with pytest.raises(SnapshotWriteError, match="unreachable"):
        check_threshold(closed)
    assert _recorded(env) == (0, 0)


def test_s3_failing_at_the_manifest_leaves_a_folder_readers_refuse(stream_env):
    """Data files written, manifest write cut every time: an export interrupted at its last step."""
    env = stream_env(**{"trigger.threshold": 10, "trigger.cooldown_s": 0})
    _store_events(env, 12)
    s3_host, s3_port = env.settings.s3.endpoint.removeprefix("http://").split(":")
    with FaultyProxy(s3_host, int(s3_port), drop=lambda method, path: path.endswith("/manifest.json")) as proxy:
        with pytest.raises(SnapshotWriteError, match=f"manifest.json after {RETRIES + 1} attempts"):
            check_threshold(_via(env, proxy))
    written = {path.rsplit("/", 1)[-1] for method, path in proxy.forwarded if method == "PUT"}
    assert {"train.jsonl", "eval.jsonl"} <= written, "the data files reached S3 before the manifest"
    # Bounded: s3.retries + 1 attempts of ours, each making s3.retries + 1 boto3 attempts, then a clean failure.
    assert len(proxy.dropped) == (RETRIES + 1) ** 2
    assert _recorded(env) == (0, 0), "a failed export records neither a snapshot nor a request"
    snapshot_id = proxy.dropped[0][1].split("/")[-2]
    with pytest.raises(SnapshotError, match="no manifest.json"):
        read_snapshot(env.settings, snapshot_id)

    # S3 back: the same request re-exports into the same folder, now complete and readable.
    decision = check_threshold(env.settings)
    assert decision.action == "emitted" and decision.request.snapshot_id == snapshot_id
    manifest, train, evals = read_snapshot(env.settings, snapshot_id)
    assert manifest.row_count == len(train) + len(evals) == 12 and _recorded(env) == (1, 1)
