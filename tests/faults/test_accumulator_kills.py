"""kill -9 of the accumulator at random points while events are published: nothing lost, nothing doubled.

    .venv/bin/pytest tests/faults/test_accumulator_kills.py -q

Each round publishes a chunk in the background while a fresh accumulator starts and joins the
group, then SIGKILLs it once a random number of that round's rows are stored (plus a random
sub-batch delay), so kills land before, between and inside batches and between the database
commit and the offset commit. A final run drains the topic; the store must hold every valid
published id exactly once, and every malformed record must be dead-lettered.
"""

from __future__ import annotations

import base64
import random
import signal
import threading
import time

import pytest
from stream_events import build_event
from stream_stack import read_topic, start_accumulator, stop, stored_count, stored_ids, wait_for

from schemas.events import DeadLetter
from services.stream.publisher import make_producer, publish

pytestmark = pytest.mark.integration

KILLS, CHUNK, MALFORMED_EVERY = 20, 520, 52
"""20 rounds x 520 records = 10,400 records: 10,200 valid events and 200 malformed ones."""


def _publish_round(env, events, malformed: list[bytes]) -> threading.Thread:
    def send() -> None:
        summary = publish(env.settings, events)
        assert (summary.sent, summary.failed) == (len(events), 0), summary.errors
        producer = make_producer(env.settings, client_id="fault-malformed")
        for value in malformed:
            producer.send(env.settings.kafka.events_topic, value=value)
        producer.flush()
        producer.close()

    thread = threading.Thread(target=send, name="publisher")
    thread.start()
    return thread


def test_20_kills_over_10000_events_lose_and_double_nothing(stream_env, tmp_path):
    env = stream_env(**{"stream.batch_size": 50, "stream.batch_window_s": 0.2, "trigger.threshold": 10**9})
    rng, log = random.Random(11), tmp_path / "accumulator.log"
    valid, malformed, killed_at = [], [], []
    engine, accumulator = env.engine(), None
    try:
        for round_ in range(KILLS):
            events = [build_event(round_ * CHUNK + i) for i in range(CHUNK - CHUNK // MALFORMED_EVERY)]
            bad = [b'{"round": %d, "bad": %d' % (round_, i) for i in range(CHUNK // MALFORMED_EVERY)]
            valid += events
            malformed += bad
            before = stored_count(engine)
            accumulator = start_accumulator(env, log)
            publisher = _publish_round(env, events, bad)
            target = before + rng.randint(1, len(events))  # kill once a random share of this round is stored
            wait_for(lambda target=target, accumulator=accumulator: (
                stored_count(engine) >= target or accumulator.poll() is not None
            ), 180, "the accumulator to store rows", every=0.02)
            time.sleep(rng.uniform(0, 0.3))  # and then anywhere inside the next batches
            assert accumulator.poll() is None, f"accumulator exited on its own, see {log}"
            stop(accumulator, signal.SIGKILL)
            publisher.join()
            killed_at.append((stored_count(engine), len(valid)))
        accumulator = start_accumulator(env, log)
        # Each round's malformed records follow its valid ones: the drain is done when both have landed.
        wait_for(lambda: stored_count(engine) >= len(valid) and _originals(_letters(env)) >= set(malformed), 300,
                 "every valid event stored and every malformed one dead-lettered", every=0.5)
    finally:
        if accumulator is not None:  # the drained last run, or the one a failed round left behind
            stop(accumulator)
        engine.dispose()

    mid_stream = [stored for stored, published in killed_at if stored < published]
    assert len(mid_stream) >= KILLS // 2, f"most kills landed with rows still unstored: {killed_at}"
    ids = stored_ids(env)
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} duplicated rows"
    assert set(ids) == {str(e.event_id) for e in valid}, "lost or foreign rows"
    # The dead-letter topic is at-least-once: a kill may repeat an entry, never drop one.
    letters = _letters(env)
    assert _originals(letters) == set(malformed)
    assert all(letter.reason.startswith("invalid_json: ") for letter in letters)


def _letters(env) -> list[DeadLetter]:
    return [DeadLetter.model_validate_json(r.value) for r in read_topic(env.settings, env.settings.kafka.dlq_topic)]


def _originals(letters: list[DeadLetter]) -> set[bytes]:
    return {base64.b64decode(letter.original) for letter in letters}
