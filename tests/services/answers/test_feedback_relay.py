"""The outbox relay on the real broker and PostgreSQL, and the accumulator storing what it published.

    .venv/bin/pytest tests/services/answers/test_feedback_relay.py -q
"""

from __future__ import annotations

import threading
import uuid

import pytest
from sqlalchemy import select
from stream_stack import close_env, open_env, read_topic, start_accumulator, stop, stored_ids, wait_for

from schemas.events import QAEvent
from schemas.serving import AnswerEvent, FeedbackRequest
from services.answers.records import event_id_for, record_answer, record_feedback
from services.answers.relay import OutboxRelay, pending_count
from services.store import LiveQuestionRow

pytestmark = pytest.mark.integration


@pytest.fixture
def env(stack):
    opened = open_env(stack, {})
    yield opened
    close_env(opened)


def answer_and_rate(env, engine, ratings) -> list[AnswerEvent]:
    """One served answer per rating; a rating of (r, text) is a correction, None leaves the answer unrated."""
    answers = []
    for i, rating in enumerate(ratings):
        answer = AnswerEvent(answer_id=uuid.uuid4(), question=f"Question {i} about asthma?", answer=f"Answer {i}.",
                             model_version="2", alias="champion")
        record_answer(engine, answer)
        if rating is not None:
            value, corrected = rating if isinstance(rating, tuple) else (rating, None)
            record_feedback(engine, env.settings, FeedbackRequest(answer_id=answer.answer_id, rating=value,
                                                                  corrected_answer=corrected))
        answers.append(answer)
    return answers


def test_relay_publishes_each_row_once_and_the_accumulator_stores_verified_pairs_and_every_question(env, tmp_path):
    engine = env.engine()
    ratings = [1, -1, (-1, "Corrected answer."), None, 1]
    answers = answer_and_rate(env, engine, ratings)
    relay = OutboxRelay(env.settings, engine)
    try:
        assert relay.run_once() == len(answers) + 3
        assert relay.run_once() == 0 and pending_count(engine) == 0
    finally:
        relay.close()
    published = read_topic(env.settings, env.settings.kafka.answers_topic)
    assert sorted(AnswerEvent.model_validate_json(r.value).answer_id for r in published) == sorted(
        a.answer_id for a in answers)
    verified = [event_id_for(answers[i].answer_id) for i in (0, 2, 4)]
    events = [QAEvent.model_validate_json(r.value) for r in read_topic(env.settings, env.settings.kafka.events_topic)]
    assert sorted(e.event_id for e in events) == sorted(verified)
    accumulator = start_accumulator(env, tmp_path / "accumulator.log")
    try:
        wait_for(lambda: len(stored_ids(env)) >= 3 and len(live_ids(engine)) >= len(answers), 90,
                 "the accumulator to store the verified pairs and the live questions")
    finally:
        stop(accumulator)
    assert sorted(stored_ids(env)) == sorted(str(v) for v in verified)
    assert sorted(live_ids(engine)) == sorted(str(a.answer_id) for a in answers)
    engine.dispose()


def live_ids(engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(select(LiveQuestionRow.answer_id)).scalars())


def test_serve_relays_rows_written_while_it_runs_and_stops_on_request(env):
    engine = env.engine()
    relay, stop_relay = OutboxRelay(env.settings, engine), threading.Event()
    thread = threading.Thread(target=relay.serve, args=(stop_relay,), daemon=True)
    thread.start()
    try:
        answer_and_rate(env, engine, [1, None])
        wait_for(lambda: pending_count(engine) == 0, 30, "the relay to publish the outbox")
    finally:
        stop_relay.set()
        thread.join(timeout=15)
    assert not thread.is_alive()
    assert len(read_topic(env.settings, env.settings.kafka.answers_topic)) == 2
    engine.dispose()
