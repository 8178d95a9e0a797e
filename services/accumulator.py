"""The accumulator: a faust-streaming app that stores valid QA events exactly once in effect.

    medretrain serve accumulator
    medretrain --set stream.batch_size=500 --set stream.metrics_port=0 serve accumulator

Per batch (``stream.batch_size`` records or ``stream.batch_window_s`` seconds): validate,
then, while the agent collects and validates the next batch, insert good records with
``ON CONFLICT (event_id) DO NOTHING``, dead-letter bad ones (original bytes, reason, source
position) on ``kafka.dlq_topic``, and only then ack the batch. Only acked records have their
offsets committed, i.e. after the database commit: a crash anywhere replays uncommitted
records, and the unique event_id turns replays into counted duplicates. The dead-letter topic
is at-least-once (a replay may repeat an entry; source topic/partition/offset identify it).
Durable state lives in the database, never in faust tables. After a batch that may reach the
threshold, and on a timer (cooldowns expire while the stream is idle), the trigger checks it;
the timer also publishes requests that a broker outage left recorded but unsent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from typing import NoReturn

import faust
import mode.loop
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from deploy.clients import ensure_topics
from schemas.settings import Settings
from services import stream_metrics as metrics
from services import trigger
from services.ingest import Batch, Rejection, SourceRecord, dead_letter, split_batch, store_batch
from services.store import InsertResult, create_schema, make_engine

log = logging.getLogger(__name__)

TRIGGER_RECHECK_S = 5.0
DB_RETRY_MAX_S = 30.0
EXIT_BATCH_FAILED = 70  # EX_SOFTWARE: a supervisor restarts the worker, which replays the batch


def _exit_uncommitted(records: Sequence[SourceRecord]) -> NoReturn:
    """Exit at once: the batch stays unacked, so its offsets are never committed and a restart reads it again."""
    log.critical("batch of %d records from %s failed; exiting without committing it", len(records),
                 records[0].topic if records else "?", exc_info=True)
    logging.shutdown()
    os._exit(EXIT_BATCH_FAILED)


class BatchSink:
    """What the agent does with each batch; plain methods so the agent body stays a three-line loop."""

    def __init__(self, settings: Settings, engine: Engine, dlq: faust.TopicT) -> None:
        self.settings, self.engine, self.dlq = settings, engine, dlq
        self._trigger_lock = asyncio.Lock()
        self._pending = 0
        """Rows since the last snapshot: the last check's count plus what this worker stored since."""
        self._held = False
        """The last check waited on cooldown or an in-flight retrain; only the timer checks again."""
        self._writing: asyncio.Task | None = None
        """The previous batch, stored while the agent collects and validates the next one."""

    async def submit(self, events: Sequence[faust.EventT]) -> None:
        """Validate a batch, then store it in the background while the agent collects the next one.

        Each message gets one more reference, so the ack ``take_events`` makes once the agent body
        returns does not release it: only ``_finish`` does, after the database commit, so no offset
        is committed sooner. Batches are stored one at a time, in order.
        """
        for event in events:
            event.message.incref()
        records = [record_of(event) for event in events]
        try:
            batch = split_batch(records, self.settings)
        except Exception:
            _exit_uncommitted(records)
        await self.drain()
        self._writing = asyncio.create_task(self._finish(events, records, batch))

    async def drain(self) -> None:
        """Wait for the batch being stored, if any."""
        if self._writing is not None:
            # Shielded: a worker stopping mid-wait must not cancel a write whose rows may already be committed.
            await asyncio.shield(self._writing)
            self._writing = None

    async def _finish(self, events: Sequence[faust.EventT], records: Sequence[SourceRecord], batch: Batch) -> None:
        """Store and dead-letter one batch, then ack it; on an unexpected error, exit without acking it."""
        try:
            await self._handle(records, batch)
        except Exception:
            _exit_uncommitted(records)
        for event in events:
            event.ack()
        await self.after_batch()

    async def _handle(self, records: Sequence[SourceRecord], batch: Batch) -> None:
        started = time.perf_counter()
        metrics.CONSUMED.inc(len(records))
        result, refused = await self._store(batch.rows)
        await self._dead_letter(batch.rejected + refused)
        metrics.ACCEPTED.inc(result.new)
        metrics.DUPLICATES.inc(result.duplicates)
        self._pending += result.new
        metrics.ROWS_SINCE_SNAPSHOT.set(self._pending)
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        log.debug("batch of %d: %d new, %d duplicates, %d dead-lettered", len(records), result.new,
                  result.duplicates, len(batch.rejected) + len(refused))

    async def _store(self, rows) -> tuple[InsertResult, list[tuple[SourceRecord, Rejection]]]:
        """Wait out database outages: nothing is acked, so nothing is committed, until the rows are stored."""
        delay = 0.5
        while True:
            try:
                return await asyncio.to_thread(store_batch, self.engine, rows)
            except DBAPIError as e:
                log.error("database unavailable (%s); retrying the batch in %.1fs", e.orig, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, DB_RETRY_MAX_S)

    async def _dead_letter(self, rejected: Sequence[tuple[SourceRecord, Rejection]]) -> None:
        pending = []
        for record, rejection in rejected:
            letter = dead_letter(record, rejection)
            key = f"{record.topic}:{record.partition}:{record.offset}".encode()
            # force=True: send now instead of attaching to the source event, and await delivery below.
            pending.append(await self.dlq.send(key=key, value=letter.model_dump_json().encode(), force=True))
            metrics.DEAD_LETTERED.labels(rejection.category).inc()
            log.warning("dead-lettered %s:%d@%d: %s", record.topic, record.partition, record.offset, rejection.reason)
        await asyncio.gather(*pending)

    async def after_batch(self) -> None:
        """Check the threshold only when it may be reached: a check costs several queries and a table lock.

        Rows stored by other workers are counted at the next timer check.
        """
        if not self._held and self._pending >= self.settings.trigger.threshold:
            await self.check_trigger()

    async def check_trigger(self, republish: bool = False) -> None:
        """Run the threshold check off the event loop; one at a time, and never fatal to ingestion.

        ``republish`` first sends requests a broker outage left recorded but unsent; under the same
        lock, so an emission in progress is never sent twice.
        """
        if self._trigger_lock.locked():
            return
        async with self._trigger_lock:
            try:
                if republish:
                    await asyncio.to_thread(trigger.republish_pending, self.settings, self.engine)
                decision = await asyncio.to_thread(trigger.check_threshold, self.settings, self.engine)
            except Exception:  # S3 or broker trouble: the next batch or timer tick tries again
                log.exception("threshold check failed; will retry")
                return
            self._pending = 0 if decision.action == "emitted" else decision.pending_rows
            self._held = decision.action in ("cooldown", "coalesced")
            metrics.ROWS_SINCE_SNAPSHOT.set(self._pending)


def observe_lag(app: faust.App, events: Sequence[faust.EventT]) -> None:
    """Lag from the high watermark of fetch responses and the offsets we fetched (ListOffsets is unreliable here)."""
    last: dict[tuple[str, int], int] = {}
    for event in events:
        last[(event.message.topic, event.message.partition)] = event.message.offset
    for (topic, partition), offset in last.items():
        try:
            highwater = app.consumer.highwater(faust.types.TP(topic, partition))
        except AssertionError:  # partition revoked between fetch and now
            continue
        if highwater is not None:
            metrics.CONSUMER_LAG.labels(topic, str(partition)).set(max(0, highwater - offset - 1))


def record_of(event: faust.EventT) -> SourceRecord:
    message = event.message
    return SourceRecord(topic=message.topic, partition=message.partition, offset=message.offset, value=event.value)


def build_app(settings: Settings) -> faust.App:
    """The faust app: one agent over the events topic, one timer for the trigger."""
    k, batching = settings.kafka, settings.stream
    datadir = settings.stack.home / "faust" / k.accumulator_group
    datadir.mkdir(parents=True, exist_ok=True)  # faust creates only the last level
    app = faust.App(
        k.accumulator_group,  # the app id is the consumer group id
        broker=[f"kafka://{host}" for host in k.bootstrap.split(",")],
        datadir=str(datadir),
        store="memory://",
        web_enabled=False,
        key_serializer="raw",
        value_serializer="raw",
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=min(0.5, batching.batch_window_s),
        broker_session_timeout=k.session_timeout_ms / 1000,
        broker_heartbeat_interval=k.heartbeat_interval_ms / 1000,
        producer_acks=-1,
        producer_max_request_size=k.max_message_bytes * 2 + 65536,  # a dead letter carries base64 of the original
        topic_partitions=k.partitions,
    )
    engine = make_engine(settings)
    events = app.topic(k.events_topic, value_type=bytes, key_type=bytes)
    sink = BatchSink(settings, engine, app.topic(k.dlq_topic, value_type=bytes, key_type=bytes))

    @app.agent(events, name="accumulate")
    async def accumulate(stream_: faust.StreamT) -> None:
        try:
            async for batch in stream_.take_events(batching.batch_size, within=batching.batch_window_s):
                await sink.submit(batch)
                observe_lag(app, batch)
        finally:  # a stopping worker still acks what it stored, so a restart does not read it again
            await sink.drain()

    @app.timer(interval=TRIGGER_RECHECK_S)
    async def recheck() -> None:
        await sink.check_trigger(republish=True)

    return app


def run(settings: Settings, loglevel: str = "info") -> None:
    """Prepare topics and tables, expose metrics, then run the faust worker until stopped."""
    logging.getLogger("kafka").setLevel(logging.WARNING)  # kafka-python (topic set-up, trigger) is chatty at INFO
    ensure_topics(settings)
    engine = make_engine(settings)
    create_schema(engine)
    engine.dispose()
    metrics.serve_metrics(settings.stream.metrics_port, settings.stack.host)
    # faust spends several asyncio tasks and futures on every record; uvloop's loop in C cuts the
    # accumulator's CPU per event by about a fifth (docs/benchmarks.md). Set before any loop exists.
    mode.loop.use("uvloop")
    app = build_app(settings)
    log.info("accumulator: %s -> %s (group %s)", settings.kafka.events_topic, settings.database.url.split("@")[-1],
             settings.kafka.accumulator_group)
    faust.Worker(app, loglevel=loglevel).execute_from_commandline()
