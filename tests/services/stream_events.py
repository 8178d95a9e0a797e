"""Builders shared by the stream tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import uuid

from schemas.events import QAEvent


def build_event(n: int = 0, **fields) -> QAEvent:
    """A valid QAEvent with a fresh event_id; ``fields`` override any value."""
    values = {"event_id": uuid.uuid4(), "question": f"What treats condition {n}?",
              "answer": f"Treatment number {n} is described here.", "source": "test"} | fields
    return QAEvent(**values)
