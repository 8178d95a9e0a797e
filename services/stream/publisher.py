"""Publish QA events to ``kafka.events_topic``: from JSONL, CSV, stdin or a MedQuAD production sample.

    medretrain publish events.jsonl
    cat events.csv | medretrain publish - --format csv --rate 200
    medretrain publish --medquad-sample 500 --seed 7

Every record is validated as a ``QAEvent`` before sending; a bad line is reported with its
number and reason and nothing is sent for it, the rest still go. A record without
``event_id`` gets one derived from question and answer, so publishing the same pair again
yields a duplicate the store skips. The producer uses acks=all and retries, without idempotence
(see ``make_producer``); the key is the event id.
"""

from __future__ import annotations

import csv
import json
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from pydantic import ValidationError

from schemas.events import QAEvent, describe_errors
from schemas.settings import Settings

log = logging.getLogger(__name__)

EVENT_NAMESPACE = uuid.UUID("5f0c7a8e-2d41-4e8a-9b5e-6d2f0e7c1a93")
"""uuid5 namespace of derived event ids (never change it: old ids would stop matching)."""


@dataclass(frozen=True)
class BadLine:
    line: int
    reason: str


@dataclass
class PublishSummary:
    sent: int = 0
    rejected: int = 0
    failed: int = 0
    """Validated records the broker did not acknowledge."""
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def per_second(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


def derive_event_id(question: str, answer: str) -> uuid.UUID:
    """Same question and answer, same id (whitespace at the ends ignored, as QAEvent strips it)."""
    return uuid.uuid5(EVENT_NAMESPACE, f"{question.strip()}\x1f{answer.strip()}")


def parse_record(line: int, record: Any) -> QAEvent | BadLine:
    """Validate one decoded record; fill a missing event_id from its question and answer."""
    if not isinstance(record, dict):
        return BadLine(line, f"expected a JSON object, got {type(record).__name__}")
    if not record.get("event_id") and isinstance(record.get("question"), str) and isinstance(record.get("answer"), str):
        record = record | {"event_id": str(derive_event_id(record["question"], record["answer"]))}
    try:
        return QAEvent.model_validate(record)
    except ValidationError as e:
        return BadLine(line, describe_errors(e))


def read_jsonl(lines: Iterable[str]) -> Iterator[QAEvent | BadLine]:
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            yield BadLine(number, f"invalid JSON: {e}")
            continue
        yield parse_record(number, record)


def read_csv(stream: TextIO) -> Iterator[QAEvent | BadLine]:
    """A header row names QAEvent fields; empty cells mean "not given"."""
    reader = csv.DictReader(stream)
    for row in reader:
        if None in row:
            yield BadLine(reader.line_num, f"{len(row[None])} more cells than header columns")
            continue
        yield parse_record(reader.line_num, {k: v for k, v in row.items() if v not in ("", None)})


def medquad_events(n: int, seed: int) -> list[QAEvent]:
    """A seeded sample of the shipped MedQuAD production split, as events with derived ids."""
    from trainer.medquad import load_medquad

    pairs = load_medquad("production")
    chosen = random.Random(seed).sample(pairs, min(n, len(pairs)))
    return [
        QAEvent(event_id=derive_event_id(p.question, p.answer), question=p.question, answer=p.answer,
                source=p.source, qtype=p.qtype, focus=p.focus)
        for p in chosen
    ]


def make_producer(settings: Settings, client_id: str = "medretrain-publisher", **config: Any):
    """kafka-python producer that waits for every in-sync replica (acks=all) and retries."""
    from kafka import KafkaProducer

    # Not idempotent: a send retried after a broker restart is appended again, never answered from the broker's
    # sequence state. Tansu keeps that state apart from the data and lost acknowledged records that way; the
    # store already drops a re-sent event by its id.
    defaults = {
        "linger_ms": 5,
        "max_request_size": settings.kafka.max_message_bytes + 4096,
        "enable_idempotence": False,
    }
    return KafkaProducer(
        bootstrap_servers=settings.kafka.bootstrap.split(","), client_id=client_id, acks="all", **(defaults | config)
    )


class _Pacer:
    """Keeps the send rate at or below ``rate`` events per second (None: as fast as possible)."""

    def __init__(self, rate: float | None) -> None:
        self.interval = 1.0 / rate if rate else 0.0
        self.next_at = time.monotonic()

    def wait(self) -> None:
        if not self.interval:
            return
        now = time.monotonic()
        if self.next_at > now:
            time.sleep(self.next_at - now)
        self.next_at = max(self.next_at, now) + self.interval


def publish(
    settings: Settings,
    records: Iterable[QAEvent | BadLine],
    rate: float | None = None,
    on_bad: Callable[[BadLine], None] | None = None,
    on_sent: Callable[[], None] | None = None,
) -> PublishSummary:
    """Send every valid record, report every bad one; returns counts once the broker acknowledged all."""
    summary, pacer = PublishSummary(), _Pacer(rate)
    acked = {"ok": 0}

    def failed(error: Exception) -> None:
        summary.failed += 1
        summary.errors.append(str(error))

    producer = make_producer(settings)
    started = time.perf_counter()
    try:
        for record in records:
            if isinstance(record, BadLine):
                summary.rejected += 1
                if on_bad:
                    on_bad(record)
                continue
            pacer.wait()
            future = producer.send(
                settings.kafka.events_topic, key=str(record.event_id).encode(), value=record.model_dump_json().encode()
            )
            future.add_callback(lambda _: acked.__setitem__("ok", acked["ok"] + 1)).add_errback(failed)
            if on_sent:
                on_sent()
        producer.flush()
    finally:
        producer.close()
    summary.sent, summary.seconds = acked["ok"], time.perf_counter() - started
    log.debug(
        "published %d events (%d rejected, %d failed) in %.1fs",
        summary.sent,
        summary.rejected,
        summary.failed,
        summary.seconds,
    )
    return summary
