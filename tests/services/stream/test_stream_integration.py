"""The stream on the real embedded broker, S3 and PostgreSQL (no mocks).

    .venv/bin/pytest tests/services/stream/test_stream_integration.py -q
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import signal

import pytest
from stream_events import build_event
from stream_stack import (
    close_env,
    free_port,
    open_env,
    read_topic,
    scrape,
    start_accumulator,
    stop,
    stored_count,
    stored_ids,
    wait_for,
)

from deploy.clients import boto3_s3
from schemas.events import DeadLetter, RetrainRequest
from services.stream.publisher import make_producer, publish
from services.trigger.export import in_eval_slice

pytestmark = pytest.mark.integration

MAX_BYTES = 20_000


@pytest.fixture
def env_factory(stack):
    opened = []

    def factory(**extra):
        env = open_env(stack, extra)
        opened.append(env)
        return env

    yield factory
    for env in opened:
        close_env(env)


def _malformed(i: int) -> tuple[bytes, str]:
    """The i-th malformed record (each one unique) and the reason category the accumulator must give."""
    valid = json.loads(build_event(i).model_dump_json())
    kinds = [
        (b"\xff\xfe\x00 not utf-8 #%d" % i, "undecodable"),
        (b'{"question": "unterminated #%d' % i, "invalid_json"),
        (json.dumps(valid | {"schema_version": 2}).encode(), "unsupported_version"),
        (json.dumps(valid | {"question": " "}).encode(), "empty_field"),
        (json.dumps(valid | {"answer": ""}).encode(), "empty_field"),
        (json.dumps(valid | {"answer": "x" * (MAX_BYTES + 10)}).encode(), "oversize"),
        (json.dumps(valid | {"surprise": True}).encode(), "schema"),
    ]
    return kinds[i % len(kinds)]


def _send_raw(env, values: list[bytes]) -> None:
    producer = make_producer(env.settings, max_request_size=4 * MAX_BYTES)
    for value in values:
        producer.send(env.settings.kafka.events_topic, value=value)
    producer.flush()
    producer.close()


def _assert_snapshot_matches_store(env, request: RetrainRequest) -> None:
    """The manifest's files in S3 hash to its sha256 and hold exactly the store's rows up to the watermark."""
    from trainer.snapshot_reader import read_snapshot

    manifest, train, evals = read_snapshot(env.settings, request.snapshot_id)  # checks sha256 and counts
    s3, bucket = boto3_s3(env.settings), env.settings.s3.datasets_bucket
    for name, digest in manifest.files.items():
        body = s3.get_object(Bucket=bucket, Key=f"datasets/{manifest.snapshot_id}/{name}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == digest
    engine = env.engine()
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT event_id, topic, partition, \"offset\" FROM qa_events WHERE row_id <= %s ORDER BY row_id",
            (request.watermark,)).all()
    engine.dispose()
    ids = [r.event_id for r in rows]
    assert manifest.max_row_id == request.watermark and manifest.row_count == len(ids)
    assert [p.event_id for p in train] == [
        i for i in ids if not in_eval_slice(i, env.settings.trigger.prod_eval_fraction)
    ]
    assert [p.event_id for p in evals] == [i for i in ids if in_eval_slice(i, env.settings.trigger.prod_eval_fraction)]
    assert (manifest.first_event_id, manifest.last_event_id) == (ids[0], ids[-1])
    expected_offsets: dict[str, int] = {}
    for r in rows:
        key = f"{r.topic}:{r.partition}"
        expected_offsets[key] = max(expected_offsets.get(key, 0), r.offset + 1)
    assert manifest.kafka_offsets == expected_offsets


def test_5000_events_with_malformed_and_duplicates_give_exact_counts(env_factory, tmp_path):
    port = free_port()
    env = env_factory(
        **{
            "kafka.max_message_bytes": MAX_BYTES,
            "stream.metrics_port": port,
            "trigger.threshold": 2000,
            "trigger.cooldown_s": 3600,
        }
    )
    valid = [build_event(i) for i in range(4500)]
    duplicates = random.Random(3).sample(valid, 250)
    malformed = dict(_malformed(i) for i in range(250))

    summary = publish(env.settings, valid)
    assert (summary.sent, summary.failed) == (4500, 0)
    _send_raw(env, [d.model_dump_json().encode() for d in duplicates] + list(malformed))

    accumulator = start_accumulator(env, tmp_path / "accumulator.log")

    def handled_all() -> bool:
        """Every record accepted, counted as a duplicate or dead-lettered (consumed counts at batch start)."""
        assert accumulator.poll() is None, f"accumulator exited, see {tmp_path / 'accumulator.log'}"
        handled = {
            k: v
            for k, v in scrape(port).items()
            if k.startswith(
                (
                    "medretrain_events_accepted_total",
                    "medretrain_events_duplicate_total",
                    "medretrain_events_dead_lettered_total",
                )
            )
        }
        return sum(handled.values()) == 5000

    try:
        wait_for(handled_all, 120, "5000 records handled", every=0.5)
        metrics = scrape(port)
    finally:
        stop(accumulator)

    assert sorted(stored_ids(env)) == sorted(str(e.event_id) for e in valid)
    assert metrics["medretrain_events_consumed_total"] == 5000
    assert metrics["medretrain_events_accepted_total"] == 4500
    assert metrics["medretrain_events_duplicate_total"] == 250
    letters = [DeadLetter.model_validate_json(r.value) for r in read_topic(env.settings, env.settings.kafka.dlq_topic)]
    assert len(letters) == 250
    for letter in letters:
        original = base64.b64decode(letter.original)
        assert letter.reason.split(":")[0] == malformed[original], letter.reason
        assert letter.source_topic == env.settings.kafka.events_topic and letter.offset >= 0
    assert sum(v for k, v in metrics.items() if k.startswith("medretrain_events_dead_lettered_total")) == 250
    assert {k for k in metrics if k.startswith("medretrain_consumer_lag{")} == {
        f'medretrain_consumer_lag{{partition="{p}",topic="{env.settings.kafka.events_topic}"}}' for p in (0, 1)
    }

    requests = [
        RetrainRequest.model_validate_json(r.value) for r in read_topic(env.settings, env.settings.kafka.requests_topic)
    ]
    assert len(requests) == 1, "threshold + cooldown: exactly one request"
    assert requests[0].reason == "threshold" and requests[0].evidence["rows"] >= 2000
    _assert_snapshot_matches_store(env, requests[0])


def test_kill_9_mid_stream_loses_and_duplicates_nothing(env_factory, tmp_path):
    env = env_factory(**{"stream.batch_size": 100, "trigger.threshold": 10**9})
    events = [build_event(i) for i in range(6000)]
    assert publish(env.settings, events).sent == 6000
    engine = env.engine()
    kills = []
    try:
        for _ in range(3):
            accumulator = start_accumulator(env, tmp_path / "accumulator.log")
            before = stored_count(engine)
            # Kill as soon as this run has stored a few batches: records are flowing, most are still unread.
            wait_for(
                lambda before=before, accumulator=accumulator: (
                    stored_count(engine) >= before + 300 or accumulator.poll() is not None
                ),
                120,
                "the accumulator to store rows",
                every=0.05,
            )
            assert accumulator.poll() is None, f"accumulator exited, see {tmp_path / 'accumulator.log'}"
            stop(accumulator, signal.SIGKILL)
            kills.append(stored_count(engine))
        assert all(k < len(events) for k in kills), f"every kill landed mid-stream: {kills}"
        accumulator = start_accumulator(env, tmp_path / "accumulator.log")
        try:
            wait_for(lambda: stored_count(engine) == len(events), 120, "every event stored")
        finally:
            stop(accumulator)
    finally:
        engine.dispose()
    ids = stored_ids(env)
    assert len(ids) == len(set(ids)) == len(events)
    assert set(ids) == {str(e.event_id) for e in events}


def _store_events(env, n: int, start: int = 0) -> None:
    from services.store import insert_events
    from services.stream.ingest import SourceRecord, event_row

    engine = env.engine()
    with engine.begin() as conn:
        rows = [
            event_row(build_event(i), SourceRecord(env.settings.kafka.events_topic, i % 2, i // 2, b""))
            for i in range(start, start + n)
        ]
        insert_events(conn, rows)
    engine.dispose()


def _requests_on_topic(env) -> list[RetrainRequest]:
    return [
        RetrainRequest.model_validate_json(r.value)
        for r in read_topic(env.settings, env.settings.kafka.requests_topic, idle_ms=1500)
    ]


def _set_state(env, request_id: str, state: str) -> None:
    from sqlalchemy import update

    from services.store import RetrainRequestRow

    engine = env.engine()
    with engine.begin() as conn:
        conn.execute(update(RetrainRequestRow).where(RetrainRequestRow.request_id == request_id).values(state=state))
    engine.dispose()


def test_threshold_yields_one_request_across_a_crash_before_publish_and_a_restart(env_factory):
    from schemas.settings import with_overrides
    from services.trigger.trigger import check_threshold, republish_pending

    env = env_factory(**{"trigger.threshold": 10, "trigger.cooldown_s": 0})
    _store_events(env, 12)
    # The trigger "crashes" after recording the request, before the broker has it (the broker is unreachable).
    unreachable = with_overrides(env.settings, {"kafka": {"bootstrap": "127.0.0.1:9"}})
    with pytest.raises(Exception, match="NoBrokersAvailable|Kafka|broker"):
        check_threshold(unreachable)
    assert _requests_on_topic(env) == []

    # Restarted: the snapshot is recorded, so nothing is pending; the unpublished request is sent once.
    assert check_threshold(env.settings).action == "below_threshold"
    assert republish_pending(env.settings) == 1
    assert republish_pending(env.settings) == 0
    requests = _requests_on_topic(env)
    assert [r.request_id for r in requests] == [RetrainRequest.derive_id("threshold", requests[0].watermark)]
    assert requests[0].watermark == 12 and requests[0].evidence["rows"] == 12
    _assert_snapshot_matches_store(env, requests[0])


def test_cooldown_in_flight_manual_and_drift_requests(env_factory):
    from schemas.settings import with_overrides
    from services.trigger.trigger import check_threshold, emit_manual, signal_drift

    env = env_factory(**{"trigger.threshold": 5, "trigger.cooldown_s": 3600})
    _store_events(env, 6)
    first = check_threshold(env.settings)
    assert first.action == "emitted"
    _store_events(env, 6, start=100)
    assert check_threshold(env.settings).action == "coalesced"  # the first is still "requested"
    _set_state(env, first.request.request_id, "failed")
    assert check_threshold(env.settings).action == "cooldown"

    manual = emit_manual(env.settings, "new cardiology guideline", {"train": {"lr": 1e-4}}, "tester")
    assert manual.reason == "manual" and manual.watermark == 12
    again = emit_manual(env.settings, "new cardiology guideline", {"train": {"lr": 1e-4}}, "tester")
    assert again.request_id == manual.request_id  # the same command for the same data is one request

    _set_state(env, manual.request_id, "promoted")
    _store_events(env, 6, start=200)
    no_cooldown = with_overrides(env.settings, {"trigger": {"cooldown_s": 0}})
    assert check_threshold(no_cooldown).action == "emitted"

    third = _requests_on_topic(env)[-1]
    _set_state(env, third.request_id, "rejected")
    assert signal_drift(no_cooldown, {"psi": 0.31}) is None  # no rows since the last snapshot
    _store_events(env, 1, start=300)
    drift = signal_drift(no_cooldown, {"psi": 0.31})
    assert drift.reason == "drift" and drift.evidence["drift"] == {"psi": 0.31} and drift.watermark == 19

    on_topic = _requests_on_topic(env)
    assert [r.reason for r in on_topic] == ["threshold", "manual", "threshold", "drift"]
    assert on_topic[1].overrides == {"train": {"lr": 1e-4}} and on_topic[1].requested_by == "tester"
    assert on_topic[1].evidence["text"] == "new cardiology guideline"
    assert [r.watermark for r in on_topic] == [6, 12, 18, 19]


def _cli(env, *args: str):
    from typer.testing import CliRunner

    from services.cli import build_app

    sets = [part for pair in env.overrides for part in ("--set", pair)]
    return CliRunner().invoke(build_app(), [*sets, *args], catch_exceptions=False)


def test_cli_publish_reports_bad_lines_and_retrain_publishes_a_request(env_factory, tmp_path):
    env = env_factory()
    good = [build_event(i) for i in range(3)]
    lines = [
        good[0].model_dump_json(),
        '{"question": "no answer", "source": "x"}',
        good[1].model_dump_json(),
        "not json",
        good[2].model_dump_json(),
    ]
    source = tmp_path / "events.jsonl"
    source.write_text("\n".join(lines) + "\n")

    published = _cli(env, "publish", str(source))
    assert published.exit_code == 0, published.output
    assert "line 2" in published.output and "line 4" in published.output and "sent 3, rejected 2" in published.output
    on_topic = read_topic(env.settings, env.settings.kafka.events_topic, idle_ms=1500)
    assert sorted(r.key.decode() for r in on_topic) == sorted(str(e.event_id) for e in good)

    requested = _cli(env, "retrain", "--reason", "guideline update", "--override", "train.lr=0.0001")
    assert requested.exit_code == 0, requested.output
    (request,) = _requests_on_topic(env)
    assert request.reason == "manual" and request.overrides == {"train": {"lr": "0.0001"}}
    bad = _cli(env, "retrain", "--reason", "x", "--override", "train.nope=1")
    assert bad.exit_code != 0 and "overrides" in bad.output
