"""The demo's wait on ``retrain.status`` (``services.loop.demo.wait_for_final``) against the real broker."""

import threading
import time
import uuid

import pytest

from schemas.events import RetrainStatus, utcnow
from services.loop.demo import wait_for_final
from services.stream.publisher import make_producer

pytestmark = pytest.mark.integration


def test_wait_follows_the_first_request_after_since_to_its_final_phase(stack) -> None:
    producer = make_producer(stack, client_id="test-demo-wait")
    older, ours = (f"rr-test-{uuid.uuid4().hex[:8]}" for _ in range(2))

    def send(request_id: str, phase: str) -> None:
        event = RetrainStatus(request_id=request_id, phase=phase, detail="test")
        producer.send(stack.kafka.status_topic, key=request_id.encode(), value=event.model_dump_json().encode()).get(10)

    send(older, "requested")  # before `since`: not the one to follow
    since = utcnow()

    def retrain() -> None:  # runs while the wait polls, with a pause longer than one poll between phases
        send(ours, "requested")
        send(ours, "started")
        time.sleep(3)
        send(older, "failed")  # another request's final phase does not end the wait
        send(ours, "promoted")

    thread = threading.Thread(target=retrain)
    thread.start()
    try:
        seen = wait_for_final(stack, since, timeout_s=60, show=lambda line: None)
    finally:
        thread.join()
        producer.close()
    assert sorted(seen) == ["promoted", "requested", "started"]
    assert {event.request_id for event in seen.values()} == {ours}
