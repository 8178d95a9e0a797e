"""Publish the answer service's outbox to Kafka: answers on ``kafka.answers_topic``, verified pairs on ``events_topic``.

    relay = OutboxRelay(settings, engine)
    relay.run_once()                      # publish what is pending now; KafkaError if the broker is down
    relay.serve(stop)                     # loop until ``stop`` is set, backing off while the broker is down

A row is marked published only after the broker acknowledged it (acks=all), so a broker outage or a crash loses
nothing; a crash between the ack and the mark re-sends the row, and the consumers drop the repeat by its id (the
store's unique ``event_id``, the live questions' ``answer_id``).
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from schemas.events import utcnow
from schemas.settings import Settings
from services.answers.records import ANSWERS_STREAM, EVENTS_STREAM, OutboxRow

log = logging.getLogger(__name__)

BATCH_ROWS = 500
IDLE_WAIT_S = 0.5
"""Between polls of an empty outbox."""
MAX_BACKOFF_S = 10.0
"""Longest wait between attempts while the broker is down."""
SEND_TIMEOUT_MS = 10_000
"""How long one attempt waits for the broker before the rows are left for the next one."""


class OutboxRelay:
    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings, self.engine = settings, engine
        self.topics = {ANSWERS_STREAM: settings.kafka.answers_topic, EVENTS_STREAM: settings.kafka.events_topic}
        self._producer = None

    def _connected(self):
        from services.stream.publisher import make_producer

        if self._producer is None:
            self._producer = make_producer(
                self.settings, client_id="medretrain-answers-relay", bootstrap_timeout_ms=SEND_TIMEOUT_MS,
                max_block_ms=SEND_TIMEOUT_MS, request_timeout_ms=SEND_TIMEOUT_MS // 2,
                delivery_timeout_ms=SEND_TIMEOUT_MS)
        return self._producer

    def run_once(self) -> int:
        """Publish up to BATCH_ROWS pending rows in row order; returns how many the broker acknowledged."""
        with Session(self.engine) as session, session.begin():
            # SKIP LOCKED: relays in several replicas share the outbox without sending a row twice.
            stmt = (select(OutboxRow).where(OutboxRow.published_at.is_(None)).order_by(OutboxRow.row_id)
                    .limit(BATCH_ROWS).with_for_update(skip_locked=True))
            rows = session.scalars(stmt).all()
            if not rows:
                return 0
            acked = self._send(rows)
            now = utcnow()
            for row in acked:
                row.published_at = now
        log.debug("published %d of %d outbox rows", len(acked), len(rows))
        return len(acked)

    def _send(self, rows: list[OutboxRow]) -> list[OutboxRow]:
        """The rows the broker acknowledged; raises the first KafkaError when none was."""
        from kafka.errors import KafkaError

        try:
            producer = self._connected()
            futures = [producer.send(self.topics[row.stream], key=row.key.encode(), value=row.value.encode())
                       for row in rows]
            producer.flush(timeout=SEND_TIMEOUT_MS / 1000)
        except KafkaError:
            self.close()  # a fresh producer next time: this one's buffer may still hold the unsent rows
            raise
        acked = [row for row, future in zip(rows, futures, strict=True) if future.succeeded()]
        if len(acked) < len(rows):
            failed = next(f.exception for f in futures if not f.succeeded())
            self.close()
            if not acked:
                raise failed if isinstance(failed, KafkaError) else KafkaError(str(failed))
            log.warning("%d outbox rows not acknowledged (%s); they stay pending", len(rows) - len(acked), failed)
        return acked

    def serve(self, stop: threading.Event) -> None:
        """Relay until ``stop`` is set; while the broker is down, retry with exponential backoff."""
        from kafka.errors import KafkaError

        backoff = IDLE_WAIT_S
        try:
            while not stop.is_set():
                try:
                    sent = self.run_once()
                    backoff = IDLE_WAIT_S
                except KafkaError as e:
                    log.warning("broker unavailable, %d outbox rows wait (%s); retrying in %.1fs",
                                pending_count(self.engine), e, backoff)
                    stop.wait(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF_S)
                    continue
                if sent < BATCH_ROWS:
                    stop.wait(IDLE_WAIT_S)
        finally:
            self.close()

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=1)
            self._producer = None


def pending_count(engine: Engine) -> int:
    """Outbox rows the broker has not acknowledged yet."""
    with engine.connect() as conn:
        stmt = select(func.count()).select_from(OutboxRow).where(OutboxRow.published_at.is_(None))
        return conn.execute(stmt).scalar_one()
