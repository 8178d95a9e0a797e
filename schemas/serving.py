"""Contracts of the answer service: its HTTP API (``/v1``) and the answers it publishes on ``kafka.answers_topic``.

    POST /v1/answers   AnswerRequest  -> AnswerResponse
    POST /v1/feedback  FeedbackRequest -> FeedbackResponse

An answer becomes training data only through verified feedback (a +1 or a correction), never by itself.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import Field

from schemas.events import MAX_ANSWER_CHARS, MAX_QUESTION_CHARS, MAX_SHORT_CHARS, Contract, utcnow

ServedAlias = Literal["champion", "challenger"]


class AnswerRequest(Contract):
    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)
    session_id: str | None = Field(None, min_length=1, max_length=MAX_SHORT_CHARS)
    """Sticky canary routing: one session is always served by the same alias while a challenger waits."""


class AnswerResponse(Contract):
    answer_id: uuid.UUID
    answer: str
    model_version: str
    """The registered version that actually generated this answer."""
    alias: ServedAlias
    latency_ms: float


class FeedbackRequest(Contract):
    answer_id: uuid.UUID
    rating: Literal[1, -1]
    corrected_answer: str | None = Field(None, min_length=1, max_length=MAX_ANSWER_CHARS)
    """A person's correct answer: it, not the model's, becomes the training answer."""


class FeedbackResponse(Contract):
    answer_id: uuid.UUID
    accepted: bool
    """False for a repeat of feedback already recorded (nothing new is published)."""
    event_id: uuid.UUID | None
    """The QAEvent published for a verified pair (+1 or correction); None for -1 without a correction."""


class AnswerEvent(Contract):
    """One served answer, published on ``kafka.answers_topic`` (drift reads live questions from it)."""

    schema_version: Literal[1] = 1
    answer_id: uuid.UUID
    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)
    answer: str = Field(max_length=MAX_ANSWER_CHARS)
    model_version: str = Field(max_length=MAX_SHORT_CHARS)
    alias: ServedAlias
    session_id: str | None = Field(None, max_length=MAX_SHORT_CHARS)
    answered_at: datetime = Field(default_factory=utcnow)
