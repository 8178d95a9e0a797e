"""The demo's scripted reviewer: +1 close to the reference by ROUGE-L, otherwise the reference as a correction."""

from __future__ import annotations

import uuid

import pytest

from schemas.serving import AnswerResponse
from services.loop.demo_user import CLOSE_ROUGE_L, review_of

REFERENCE = "Glaucoma is a group of eye diseases that damage the optic nerve, often with high eye pressure."


def served(text: str) -> AnswerResponse:
    return AnswerResponse(answer_id=uuid.uuid4(), answer=text, model_version="2", alias="champion", latency_ms=1.0)


def test_an_answer_close_to_the_reference_gets_a_plus_one():
    answer = served("Glaucoma is a group of eye diseases that damage the optic nerve.")
    request, rouge = review_of(answer, REFERENCE)
    assert rouge >= CLOSE_ROUGE_L
    assert (request.answer_id, request.rating, request.corrected_answer) == (answer.answer_id, 1, None)


def test_a_far_or_empty_answer_is_corrected_with_the_reference():
    for text in ("Take two aspirin and call me tomorrow.", ""):
        request, rouge = review_of(served(text), REFERENCE)
        assert rouge < CLOSE_ROUGE_L
        assert (request.rating, request.corrected_answer) == (-1, REFERENCE)


def test_the_demo_waits_until_every_verified_pair_is_stored_then_counts_rows_to_the_trigger(sqlite_settings,
                                                                                              sqlite_engine):
    from stream_events import build_event

    from services.loop.demo import wait_stored
    from services.store import insert_events
    from services.stream.ingest import SourceRecord, event_row

    events = [build_event(i) for i in range(3)]
    with sqlite_engine.begin() as conn:
        insert_events(conn, [event_row(e, SourceRecord("t", 0, i, b"")) for i, e in enumerate(events)])
    assert wait_stored(sqlite_settings, [e.event_id for e in events], timeout_s=5) == 3
    missing = [events[0].event_id, uuid.uuid4()]
    with pytest.raises(TimeoutError, match="1 of 2 verified pairs stored"):
        wait_stored(sqlite_settings, missing, timeout_s=1)
