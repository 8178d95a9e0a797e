"""Row contracts of training and evaluation data (shipped MedQuAD, snapshots in S3)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from schemas.events import MAX_ANSWER_CHARS, MAX_QUESTION_CHARS, MAX_SHORT_CHARS, Contract

Split = Literal["train", "validation", "test", "production"]

SNAPSHOT_FILES = ("train.jsonl", "eval.jsonl")
"""A snapshot folder ``s3://<datasets bucket>/datasets/<snapshot_id>/`` holds these, then ``manifest.json`` last."""


def snapshot_prefix(snapshot_id: str) -> str:
    """The key prefix of a snapshot folder in the datasets bucket (written by the trigger, read by the trainer)."""
    return f"datasets/{snapshot_id}/"


class QAPair(Contract):
    """One question-answer pair as the trainer and evaluator read it."""

    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)
    answer: str = Field(min_length=1, max_length=MAX_ANSWER_CHARS)
    source: str = Field(min_length=1, max_length=MAX_SHORT_CHARS)
    qtype: str | None = None
    focus: str | None = None
    document_id: str | None = None
    """MedQuAD document id. Ids repeat across collections: a document is (source, document_id), and its rows
    always share a split."""
    event_id: str | None = None
    """Set for production rows (snapshot exports)."""


class MedQuADPair(QAPair):
    """A shipped MedQuAD row with its split (assigned by document)."""

    split: Split
