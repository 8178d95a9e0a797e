"""The answer service's durable records: served answers, their feedback, and the outbox of events to publish.

    record_answer(engine, answer_event)                       # answer + outbox row, one transaction
    response = record_feedback(engine, settings, feedback)    # UnknownAnswer (404), FeedbackConflict (409)
    stats = online_metrics(engine, since)                     # {model_version: OnlineStats}
    evidence = online_evidence(settings, "4", "3")            # the gate's online input: v4 vs v3, same period

What becomes training data: only a pair a person verified. A +1 publishes the model's answer as a QAEvent
(``user_rating`` 5, the top of QAEvent's 1..5 scale, ``model_version`` set); a correction (with either rating)
publishes the person's text as the answer (``source`` ``answer-service:correction``, ``user_rating`` None: nobody
rated that text, a person wrote it; ``model_version`` names the version that was corrected). A -1 without a
correction and an unrated answer publish nothing.

Feedback is idempotent per answer: the event id is a uuid5 of the answer id, and the first feedback wins. Repeating
it returns ``accepted=False`` and the same event id. A bare -1 may later gain a correction (the usual "this is wrong
-> here is the right answer" flow); any other different second feedback raises ``FeedbackConflict``.

Events are not sent here: they wait in the ``outbox`` table, written in the transaction that records the answer or
the feedback, and ``services.answers.relay.OutboxRelay`` publishes them, so a broker outage loses nothing.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import Engine, ForeignKey, Integer, String, Text, and_, case, func, select
from sqlalchemy.orm import Mapped, mapped_column

from schemas.artifacts import OnlineEvidence, OnlineStats
from schemas.events import QAEvent, utcnow
from schemas.serving import AnswerEvent, FeedbackRequest, FeedbackResponse
from schemas.settings import Settings
from services.store import Base, RowId, as_utc, create_schema, make_engine

ANSWER_EVENT_NAMESPACE = uuid.UUID("0b6f3c52-8a1e-4d7b-9c3f-2e5a7d1b4c60")
"""uuid5 namespace of the QAEvent id derived from an answer id (never change it: repeats would stop matching)."""

SOURCE = "answer-service"
CORRECTION_SOURCE = "answer-service:correction"
UP_RATING = 5
"""QAEvent.user_rating of an answer a person rated +1."""

ANSWERS_STREAM, EVENTS_STREAM = "answers", "events"
"""Outbox rows name a stream, not a topic: the relay resolves it through ``kafka.answers_topic`` / ``events_topic``."""


class UnknownAnswer(LookupError):
    """Feedback names an answer id this service never served."""


class FeedbackConflict(ValueError):
    """A second feedback for an answer that contradicts the first one (which stands)."""


class AnswerRow(Base):
    """One served answer, as published on ``kafka.answers_topic``."""

    __tablename__ = "answers"

    answer_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    question: Mapped[str] = mapped_column(Text)
    answer: Mapped[str] = mapped_column(Text)
    model_version: Mapped[str] = mapped_column(String(200), index=True)
    alias: Mapped[str] = mapped_column(String(20))
    session_id: Mapped[str | None] = mapped_column(String(200))
    answered_at: Mapped[datetime] = mapped_column(index=True)


class FeedbackRow(Base):
    """The feedback that stands for one answer (the first one; a bare -1 may gain a correction)."""

    __tablename__ = "answer_feedback"

    answer_id: Mapped[str] = mapped_column(String(36), ForeignKey("answers.answer_id"), primary_key=True)
    rating: Mapped[int] = mapped_column(Integer)
    corrected_answer: Mapped[str | None] = mapped_column(Text)
    event_id: Mapped[str | None] = mapped_column(String(36))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)


class OutboxRow(Base):
    """An event to publish; ``published_at`` is set once the broker acknowledged it."""

    __tablename__ = "outbox"
    __table_args__ = {"sqlite_autoincrement": True}  # publishing order is row order

    row_id: Mapped[int] = mapped_column(RowId, primary_key=True, autoincrement=True)
    stream: Mapped[str] = mapped_column(String(20))
    key: Mapped[str] = mapped_column(String(36))
    value: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(index=True)


def record_answer(engine: Engine, event: AnswerEvent) -> None:
    """Store the served answer and its outbox row for ``kafka.answers_topic`` in one transaction."""
    with engine.begin() as conn:
        conn.execute(AnswerRow.__table__.insert().values(
            answer_id=str(event.answer_id), question=event.question, answer=event.answer,
            model_version=event.model_version, alias=event.alias, session_id=event.session_id,
            answered_at=event.answered_at))
        conn.execute(OutboxRow.__table__.insert().values(
            stream=ANSWERS_STREAM, key=str(event.answer_id), value=event.model_dump_json()))


def event_id_for(answer_id: uuid.UUID) -> uuid.UUID:
    return uuid.uuid5(ANSWER_EVENT_NAMESPACE, str(answer_id))


def verified_event(answer: AnswerRow, feedback: FeedbackRequest) -> QAEvent | None:
    """The training event a feedback makes of an answer, or None when a person did not verify the pair."""
    common = {"event_id": event_id_for(feedback.answer_id), "question": answer.question,
              "model_version": answer.model_version}
    if feedback.corrected_answer is not None:
        return QAEvent(**common, answer=feedback.corrected_answer, source=CORRECTION_SOURCE)
    if feedback.rating == 1:
        return QAEvent(**common, answer=answer.answer, source=SOURCE, user_rating=UP_RATING)
    return None


def _check_length(settings: Settings, feedback: FeedbackRequest) -> None:
    """A correction the accumulator would dead-letter is refused here, where the person can still shorten it."""
    limit = settings.stream.max_text_chars
    if feedback.corrected_answer is not None and len(feedback.corrected_answer) > limit:
        raise ValueError(f"corrected_answer: {len(feedback.corrected_answer)} characters, at most {limit} "
                         "(stream.max_text_chars)")


def _repeat_or_conflict(prior: FeedbackRow, feedback: FeedbackRequest) -> FeedbackResponse | None:
    """The answer to a second feedback: a repeat, None for a bare -1 gaining a correction, else a conflict."""
    if (prior.rating, prior.corrected_answer) == (feedback.rating, feedback.corrected_answer):
        event_id = uuid.UUID(prior.event_id) if prior.event_id else None
        return FeedbackResponse(answer_id=feedback.answer_id, accepted=False, event_id=event_id)
    if prior.rating == -1 and prior.corrected_answer is None and feedback.corrected_answer is not None:
        return None
    raise FeedbackConflict(f"answer {feedback.answer_id} already has feedback (rating {prior.rating:+d}"
                           f"{', corrected' if prior.corrected_answer else ''}); the first feedback stands")


def record_feedback(engine: Engine, settings: Settings, feedback: FeedbackRequest) -> FeedbackResponse:
    """Record one feedback and, for a verified pair, its QAEvent outbox row, in one transaction."""
    _check_length(settings, feedback)
    answer_id = str(feedback.answer_id)
    with engine.begin() as conn:
        # The answer row's lock serialises concurrent feedback for one answer (SQLite serialises writers anyway).
        answer = conn.execute(select(AnswerRow).where(AnswerRow.answer_id == answer_id).with_for_update()).first()
        if answer is None:
            raise UnknownAnswer(f"no answer {answer_id} was served")
        prior = conn.execute(select(FeedbackRow).where(FeedbackRow.answer_id == answer_id)).first()
        if prior is not None and (repeat := _repeat_or_conflict(prior, feedback)) is not None:
            return repeat
        event = verified_event(answer, feedback)
        values = {"rating": feedback.rating, "corrected_answer": feedback.corrected_answer,
                  "event_id": str(event.event_id) if event else None, "received_at": utcnow()}
        table = FeedbackRow.__table__
        if prior is None:
            conn.execute(table.insert().values(answer_id=answer_id, **values))
        else:
            conn.execute(table.update().where(table.c.answer_id == answer_id).values(**values))
        if event is not None:
            conn.execute(OutboxRow.__table__.insert().values(
                stream=EVENTS_STREAM, key=str(event.event_id), value=event.model_dump_json()))
    return FeedbackResponse(answer_id=feedback.answer_id, accepted=True, event_id=event.event_id if event else None)


def online_metrics(engine: Engine, since: datetime | None = None) -> dict[str, OnlineStats]:
    """Per served model version: answers, rated, +1 and corrected counts (answers served at or after ``since``)."""
    fb = FeedbackRow
    stmt = (select(AnswerRow.model_version, func.count(), func.count(fb.answer_id),
                   func.sum(case((and_(fb.rating == 1, fb.corrected_answer.is_(None)), 1), else_=0)),
                   func.sum(case((fb.corrected_answer.is_not(None), 1), else_=0)))
            .outerjoin(fb, fb.answer_id == AnswerRow.answer_id)
            .group_by(AnswerRow.model_version))
    if since is not None:
        stmt = stmt.where(AnswerRow.answered_at >= since)
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    return {version: OnlineStats(answers=answers, rated=rated, up=int(up or 0), corrections=int(fixed or 0))
            for version, answers, rated, up, fixed in rows}


def online_evidence(settings: Settings, candidate_version: str | None, champion_version: str | None) -> OnlineEvidence:
    """A candidate's live feedback and the champion's over the same period (from the candidate's first answer)."""
    engine = make_engine(settings)
    try:
        create_schema(engine)  # a store the answer service never wrote to still answers "nothing served"
        with engine.connect() as conn:
            since = conn.execute(select(func.min(AnswerRow.answered_at))
                                 .where(AnswerRow.model_version == str(candidate_version))).scalar_one()
        stats = online_metrics(engine, since) if since is not None else {}
    finally:
        engine.dispose()
    none = OnlineStats(answers=0, rated=0, up=0, corrections=0)
    return OnlineEvidence(candidate_version=candidate_version, baseline_version=champion_version, since=as_utc(since),
                          candidate=stats.get(str(candidate_version), none),
                          baseline=stats.get(str(champion_version), none))
