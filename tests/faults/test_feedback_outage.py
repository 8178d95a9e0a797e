"""Broker outage under live feedback: answers and feedback go on, the outbox holds the events, nothing lost or doubled.

    .venv/bin/pytest tests/faults/test_feedback_outage.py -q

The test runs its own broker (the stack's Tansu binary, its own S3 bucket) that advertises a FaultyProxy as its
address, so every client (relay, accumulator) reaches it only through the proxy; severing the proxy is the outage.
The shared test broker is never touched.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import uuid

import pytest
from faulty_proxy import FaultyProxy
from stream_stack import (
    close_env,
    drop_bucket,
    free_port,
    open_env,
    read_topic,
    start_accumulator,
    stop,
    stored_ids,
    wait_for,
)

from deploy.clients import boto3_s3
from deploy.embedded import kafka
from schemas.serving import AnswerEvent, FeedbackRequest
from schemas.settings import Settings, with_overrides
from services.answers.records import FeedbackConflict, event_id_for, record_answer, record_feedback
from services.answers.relay import SEND_TIMEOUT_MS, OutboxRelay, pending_count

pytestmark = pytest.mark.integration

ITEMS = 60
SEVER_AT, RESTORE_AT = 20, 40


@pytest.fixture
def broker_behind_proxy(stack: Settings, tmp_path):
    """A private broker whose advertised address is a proxy in front of it; yields (proxy, bootstrap)."""
    port, bucket = free_port(), f"medretrain-broker-{uuid.uuid4().hex[:10]}"
    boto3_s3(stack).create_bucket(Bucket=bucket)
    with FaultyProxy("127.0.0.1", port) as proxy:
        bootstrap = proxy.url.removeprefix("http://")
        own = with_overrides(stack, {"kafka": {"bootstrap": f"127.0.0.1:{port}"}, "stack": {"broker_bucket": bucket}})
        launch = kafka.launch(own)
        argv = list(launch.argv)
        argv[argv.index("--advertised-listener-url") + 1] = f"tcp://{bootstrap}"
        with (tmp_path / "broker.log").open("ab") as log:
            broker = subprocess.Popen(argv, cwd=tmp_path, env=os.environ | launch.env, stdout=log,
                                      stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: kafka.healthy(own, timeout_s=2), 60, "the private broker")
            yield proxy, bootstrap
        finally:
            stop(broker)
            drop_bucket(stack, bucket)


def rating_of(i: int) -> tuple[int, str | None] | None:
    """+1, bare -1, correction, unrated, in turn."""
    return [(1, None), (-1, None), (-1, f"Corrected answer {i}."), None][i % 4]


def serve_and_rate(env, engine, i: int) -> AnswerEvent:
    """What one user does: get an answer (recorded), rate it, and for verified pairs retry the feedback once."""
    answer = AnswerEvent(answer_id=uuid.uuid4(), question=f"Outage question {i}?", answer=f"Model answer {i}.",
                         model_version="2", alias="champion")
    record_answer(engine, answer)
    if (rating := rating_of(i)) is not None:
        request = FeedbackRequest(answer_id=answer.answer_id, rating=rating[0], corrected_answer=rating[1])
        first = record_feedback(engine, env.settings, request)
        assert first.accepted
        if first.event_id is not None:
            assert not record_feedback(engine, env.settings, request).accepted  # a client's retry
            with pytest.raises(FeedbackConflict):
                record_feedback(engine, env.settings, FeedbackRequest(answer_id=answer.answer_id, rating=-rating[0]))
    return answer


def test_feedback_during_a_broker_outage_reaches_the_store_exactly_once(stack, broker_behind_proxy, tmp_path, caplog):
    proxy, bootstrap = broker_behind_proxy
    env = open_env(stack, {"kafka.bootstrap": bootstrap, "kafka.session_timeout_ms": 3000,
                           "kafka.heartbeat_interval_ms": 500})
    engine = env.engine()
    accumulator = start_accumulator(env, tmp_path / "accumulator.log")
    relay, stop_relay = OutboxRelay(env.settings, engine), threading.Event()
    thread = threading.Thread(target=relay.serve, args=(stop_relay,), daemon=True)
    caplog.set_level(logging.WARNING, logger="services.answers.relay")
    thread.start()
    try:
        answers = []
        for i in range(ITEMS):
            if i == SEVER_AT:
                proxy.sever()
            if i == RESTORE_AT:
                # The outage outlasts one send attempt, so the relay has failed and its rows wait in the outbox.
                wait_for(lambda: "broker unavailable" in caplog.text, SEND_TIMEOUT_MS / 1000 * 3, "a failed send")
                waiting = pending_count(engine)
                proxy.restore()
            answers.append(serve_and_rate(env, engine, i))
        assert waiting >= (RESTORE_AT - SEVER_AT) * 3 // 2  # every answer of the outage and half of them as events
        wait_for(lambda: pending_count(engine) == 0, 120, "the relay to drain the outbox after the outage")
        verified = sorted(str(event_id_for(a.answer_id)) for i, a in enumerate(answers) if i % 4 in (0, 2))
        wait_for(lambda: len(stored_ids(env)) >= len(verified), 120, "the accumulator to store every verified pair")
        assert sorted(stored_ids(env)) == verified
        published = {AnswerEvent.model_validate_json(r.value).answer_id
                     for r in read_topic(env.settings, env.settings.kafka.answers_topic)}
        assert published == {a.answer_id for a in answers}
    finally:
        stop_relay.set()
        thread.join(timeout=30)
        stop(accumulator)
        engine.dispose()
        close_env(env)
    assert accumulator.returncode == 0, (tmp_path / "accumulator.log").read_text()[-3000:]
