"""A retrain request that can never run goes to the dead-letter topic with its reason; good ones around it are kept."""

from __future__ import annotations

import base64
import uuid

import pytest
from kafka import KafkaProducer, TopicPartition
from sqlalchemy import select
from stream_stack import close_env, open_env, read_topic

from schemas.events import DeadLetter, RetrainRequest
from services.loop.orchestrator import Orchestrator, make_consumer
from services.store import RetrainRequestRow

pytestmark = pytest.mark.integration


def test_bad_retrain_requests_are_dead_lettered_with_source_and_reason(stack):
    env = open_env(stack, {"kafka.orchestrator_group": f"orchestrator-{uuid.uuid4().hex[:8]}"})
    settings, engine = env.settings, env.engine()
    good = RetrainRequest(request_id=f"rr-manual-0-{uuid.uuid4().hex[:8]}", reason="manual", watermark=0)
    bad = [b"{not json", b'{"request_id": "rr-x", "reason": "bored", "watermark": 0}']
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap)
    try:
        offsets = [producer.send(settings.kafka.requests_topic, value=v, partition=0).get(timeout=30).offset for v in
                   (bad[0], good.model_dump_json().encode(), bad[1])]
        consumer = make_consumer(settings)
        orchestrator = Orchestrator(settings, engine, jobs=None, producer=producer)
        waiting, ours = 0, TopicPartition(settings.kafka.requests_topic, 0)
        for _ in range(30):  # until all three records are consumed and committed
            waiting += orchestrator.consume(consumer, timeout_ms=1000)
            if ours in consumer.assignment() and consumer.position(ours) > offsets[2]:
                break
        consumer.close()

        assert waiting == 1
        with engine.connect() as conn:
            assert conn.execute(select(RetrainRequestRow.request_id)).scalars().all() == [good.request_id]
        letters = [DeadLetter.model_validate_json(r.value) for r in read_topic(settings, settings.kafka.dlq_topic)]
        assert [(d.source_topic, d.partition, d.offset) for d in letters] == [
            (settings.kafka.requests_topic, 0, offsets[0]), (settings.kafka.requests_topic, 0, offsets[2])]
        assert [base64.b64decode(d.original) for d in letters] == bad  # nothing lost: the bytes as sent
        assert letters[0].reason.startswith("invalid_request: ") and "JSON" in letters[0].reason
        assert letters[1].reason.startswith("invalid_request: ") and "reason" in letters[1].reason
    finally:
        producer.close()
        engine.dispose()
        close_env(env)
