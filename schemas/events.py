"""Event contracts carried on Kafka topics (versioned, frozen, unknown fields rejected).

Validate at the edge: ``QAEvent.model_validate_json(raw)``; a wrong ``schema_version``
fails with a message naming the supported version.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


def describe_errors(error: ValidationError, whole: str = "record") -> str:
    """Every problem of a validation error on one line: ``field.path: message; ...`` (``whole`` names an empty path)."""
    return "; ".join(f"{'.'.join(map(str, p['loc'])) or whole}: {p['msg']}" for p in error.errors())


MAX_QUESTION_CHARS = 4_000
MAX_ANSWER_CHARS = 20_000
MAX_SHORT_CHARS = 200


def utcnow() -> datetime:
    return datetime.now(UTC)


class Contract(BaseModel):
    """Base of every contract: immutable, strict about unknown fields, versioned."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

    @field_validator("schema_version", mode="before", check_fields=False)
    @classmethod
    def _known_version(cls, value: Any) -> Any:
        expected = cls.model_fields["schema_version"].default
        if value != expected:
            raise ValueError(f"unsupported schema_version {value!r} for {cls.__name__}: this service reads {expected}")
        return value


class QAEvent(Contract):
    """A medical question-answer pair produced by a production system."""

    schema_version: Literal[1] = 1
    event_id: uuid.UUID
    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)
    answer: str = Field(min_length=1, max_length=MAX_ANSWER_CHARS)
    source: str = Field(min_length=1, max_length=MAX_SHORT_CHARS)
    qtype: str | None = Field(None, max_length=MAX_SHORT_CHARS)
    focus: str | None = Field(None, max_length=MAX_SHORT_CHARS)
    produced_at: datetime = Field(default_factory=utcnow)
    model_version: str | None = Field(None, max_length=MAX_SHORT_CHARS)
    """Version of the model that answered in production, when the answer came from one."""
    user_rating: int | None = Field(None, ge=1, le=5)


RetrainReason = Literal["threshold", "drift", "manual"]


class RetrainRequest(Contract):
    """Ask the orchestrator for one retrain over the data up to ``watermark``."""

    schema_version: Literal[1] = 1
    request_id: str = Field(min_length=1, max_length=MAX_SHORT_CHARS)
    reason: RetrainReason
    evidence: dict[str, Any] = Field(default_factory=dict)
    """Why: row counts for a threshold, statistics and p-values for drift, operator text for manual."""
    watermark: int = Field(ge=0)
    """Highest store row id the retrain covers (the snapshot boundary)."""
    snapshot_id: str | None = Field(None, max_length=MAX_SHORT_CHARS)
    requested_by: str = Field("trigger", max_length=MAX_SHORT_CHARS)
    requested_at: datetime = Field(default_factory=utcnow)
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Nested settings overrides for this retrain only, e.g. ``{"train": {"lr": 1e-4}}``."""

    @staticmethod
    def derive_id(reason: RetrainReason, watermark: int, salt: str = "") -> str:
        """Same data, same id: a trigger that fires twice for one watermark yields one request."""
        digest = hashlib.sha256(f"{reason}:{watermark}:{salt}".encode()).hexdigest()[:16]
        return f"rr-{reason}-{watermark}-{digest}"


RetrainPhase = Literal["requested", "coalesced", "started", "succeeded", "failed", "promoted", "rejected"]


class RetrainStatus(Contract):
    """Lifecycle of one retrain request, published on ``retrain.status``."""

    schema_version: Literal[1] = 1
    request_id: str
    phase: RetrainPhase
    at: datetime = Field(default_factory=utcnow)
    detail: str = ""
    ray_job_id: str | None = None
    run_id: str | None = None
    model_version: str | None = None


class DeadLetter(Contract):
    """A record the accumulator could not accept: the original bytes and why."""

    schema_version: Literal[1] = 1
    reason: str
    source_topic: str
    partition: int
    offset: int
    original: str
    """The original value, base64 encoded (it may not be UTF-8)."""
    at: datetime = Field(default_factory=utcnow)
