"""Answers, feedback and the outbox on SQLite and PostgreSQL: what becomes a QAEvent, idempotence, online metrics."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select

from schemas.events import QAEvent, utcnow
from schemas.serving import AnswerEvent, FeedbackRequest
from schemas.settings import load_settings
from services.answers.records import (
    CORRECTION_SOURCE,
    EVENTS_STREAM,
    SOURCE,
    UP_RATING,
    FeedbackConflict,
    OutboxRow,
    UnknownAnswer,
    event_id_for,
    online_metrics,
    record_answer,
    record_feedback,
)

SETTINGS = load_settings()


def served(engine, version: str = "3", question: str = "What causes gout?", **extra) -> AnswerEvent:
    event = AnswerEvent(answer_id=uuid.uuid4(), question=question, answer=f"model answer by v{version}",
                        model_version=version, alias="champion", **extra)
    record_answer(engine, event)
    return event


def outbox(engine, stream: str = EVENTS_STREAM) -> list[OutboxRow]:
    with engine.connect() as conn:
        return list(conn.execute(select(OutboxRow).where(OutboxRow.stream == stream).order_by(OutboxRow.row_id)))


def events(engine) -> list[QAEvent]:
    return [QAEvent.model_validate_json(row.value) for row in outbox(engine)]


def rate(engine, answer: AnswerEvent, rating: int, corrected: str | None = None):
    request = FeedbackRequest(answer_id=answer.answer_id, rating=rating, corrected_answer=corrected)
    return record_feedback(engine, SETTINGS, request)


def test_every_answer_gets_one_outbox_row_with_its_event(store_engine):
    answer = served(store_engine, session_id="s-1")
    [row] = outbox(store_engine, "answers")
    assert row.key == str(answer.answer_id) and row.published_at is None
    assert AnswerEvent.model_validate_json(row.value) == answer


def test_plus_one_publishes_the_models_answer_rated_and_versioned(store_engine):
    answer = served(store_engine, version="4")
    response = rate(store_engine, answer, 1)
    assert response.accepted and response.event_id == event_id_for(answer.answer_id)
    [event] = events(store_engine)
    assert (event.event_id, event.question, event.answer) == (response.event_id, answer.question, answer.answer)
    assert (event.source, event.model_version, event.user_rating) == (SOURCE, "4", UP_RATING)


@pytest.mark.parametrize("rating", [1, -1])
def test_a_correction_publishes_the_persons_text_not_the_models(store_engine, rating):
    answer = served(store_engine)
    response = rate(store_engine, answer, rating, "  Gout is caused by uric acid crystals.  ")
    [event] = events(store_engine)
    assert response.accepted and event.event_id == response.event_id
    assert (event.answer, event.source, event.user_rating) == ("Gout is caused by uric acid crystals.",
                                                              CORRECTION_SOURCE, None)
    assert event.model_version == "3"


def test_a_bare_minus_one_is_recorded_but_never_training_data(store_engine):
    answer = served(store_engine)
    response = rate(store_engine, answer, -1)
    assert response.accepted and response.event_id is None
    assert events(store_engine) == []


@pytest.mark.parametrize(("rating", "corrected"), [(1, None), (-1, None), (-1, "The right answer."), (1, "Better.")])
def test_repeated_feedback_is_accepted_once_and_yields_one_event(store_engine, rating, corrected):
    answer = served(store_engine)
    first = rate(store_engine, answer, rating, corrected)
    again = [rate(store_engine, answer, rating, corrected) for _ in range(3)]
    assert first.accepted and not any(r.accepted for r in again)
    assert {r.event_id for r in again} == {first.event_id}
    assert len(events(store_engine)) == (0 if first.event_id is None else 1)


@pytest.mark.parametrize(("first", "second"), [
    ((1, None), (-1, None)), ((-1, None), (1, None)), ((1, None), (1, "Another text.")),
    ((-1, "Text one."), (-1, "Text two.")), ((-1, "Text one."), (-1, None)),
])
def test_conflicting_feedback_is_refused_and_the_first_one_stands(store_engine, first, second):
    answer = served(store_engine)
    accepted = rate(store_engine, answer, *first)
    with pytest.raises(FeedbackConflict, match="first feedback stands"):
        rate(store_engine, answer, *second)
    assert rate(store_engine, answer, *first).event_id == accepted.event_id
    assert len(events(store_engine)) == (0 if accepted.event_id is None else 1)


def test_a_bare_minus_one_may_gain_a_correction_once(store_engine):
    answer = served(store_engine)
    assert rate(store_engine, answer, -1).event_id is None
    corrected = rate(store_engine, answer, -1, "The corrected answer.")
    assert corrected.accepted and corrected.event_id == event_id_for(answer.answer_id)
    assert [e.answer for e in events(store_engine)] == ["The corrected answer."]
    with pytest.raises(FeedbackConflict):
        rate(store_engine, answer, -1)


def test_feedback_for_an_unknown_answer_is_refused_and_writes_nothing(store_engine):
    stranger = AnswerEvent(answer_id=uuid.uuid4(), question="q?", answer="a", model_version="1", alias="champion")
    with pytest.raises(UnknownAnswer, match=str(stranger.answer_id)):
        rate(store_engine, stranger, 1)
    assert outbox(store_engine) == [] and online_metrics(store_engine) == {}


def test_a_correction_longer_than_the_stream_accepts_is_refused_before_anything_is_written(store_engine):
    answer = served(store_engine)
    tight = load_settings(["stream.max_text_chars=20"])
    with pytest.raises(ValueError, match=r"corrected_answer: 21 characters, at most 20 \(stream.max_text_chars\)"):
        record_feedback(store_engine, tight, FeedbackRequest(answer_id=answer.answer_id, rating=-1,
                                                             corrected_answer="x" * 21))
    assert rate(store_engine, answer, 1).accepted


def test_online_metrics_count_per_version_and_period(store_engine):
    v3 = [served(store_engine, "3") for _ in range(5)]
    v4 = [served(store_engine, "4") for _ in range(2)]
    rate(store_engine, v3[0], 1)
    rate(store_engine, v3[1], 1)
    rate(store_engine, v3[2], -1)
    rate(store_engine, v3[3], -1, "fixed")
    rate(store_engine, v4[0], 1, "improved")
    stats = online_metrics(store_engine)
    assert (stats["3"].answers, stats["3"].rated, stats["3"].up, stats["3"].corrections) == (5, 4, 2, 1)
    assert (stats["3"].up_rate, stats["3"].correction_rate) == (0.5, 0.25)
    assert (stats["4"].answers, stats["4"].rated, stats["4"].up_rate, stats["4"].correction_rate) == (2, 1, 0.0, 1.0)
    assert stats["3"].as_metrics() == {"online.answers": 5.0, "online.rated": 4.0, "online.up_rate": 0.5,
                                       "online.correction_rate": 0.25}
    assert online_metrics(store_engine, since=utcnow() + timedelta(seconds=1)) == {}
