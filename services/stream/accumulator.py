"""The accumulator: a faust-streaming app that stores valid QA events exactly once in effect.

    medretrain serve accumulator
    medretrain --set stream.batch_size=500 --set stream.metrics_port=0 serve accumulator

faust runs the worker (lifecycle, logging, the dead-letter producer, the trigger timer); the
events themselves are read as record batches from an aiokafka consumer of the accumulator group,
a service of the app, because faust's per-record stream cost most of the accumulator's CPU
(docs/benchmarks.md). Per batch (``stream.batch_size`` records or ``stream.batch_window_s``
seconds): validate, then, while the next batch is fetched and validated, insert good records with
``ON CONFLICT (event_id) DO NOTHING``, dead-letter bad ones (original bytes, reason, source
position) on ``kafka.dlq_topic``, and only then commit, per partition, the offset after the last
stored record. A crash anywhere replays uncommitted records, and the unique event_id turns
replays into counted duplicates. Before partitions are revoked, the batch being stored is
finished and committed; a batch fetched before the revocation is dropped unwritten (whoever owns
its partitions next reads it again). The dead-letter topic is at-least-once (a replay may repeat
an entry; source topic/partition/offset identify it). Durable state lives in the database, never
in faust tables. After a batch that may reach the threshold, and on a timer (cooldowns expire
while the stream is idle), the trigger checks it; the timer also publishes requests that a broker
outage left recorded but unsent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from contextlib import suppress
from typing import NoReturn

import faust
import mode
import mode.loop
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from faust.app.base import BootStrategy
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from deploy.clients import ensure_topics
from schemas.settings import Settings
from services.store import InsertResult, create_schema, make_engine
from services.stream import metrics
from services.stream.ingest import Batch, Rejection, SourceRecord, dead_letter, split_batch, store_batch
from services.trigger import trigger

log = logging.getLogger(__name__)

TRIGGER_RECHECK_S = 5.0
DB_RETRY_MAX_S = 30.0
EXIT_BATCH_FAILED = 70  # EX_SOFTWARE: a supervisor restarts the worker, which replays the batch


def _exit_uncommitted(records: Sequence[SourceRecord]) -> NoReturn:
    """Exit at once: the batch's offsets are never committed, so a restart reads it again."""
    log.critical("batch of %d records from %s failed; exiting without committing it", len(records),
                 records[0].topic if records else "?", exc_info=True)
    logging.shutdown()
    os._exit(EXIT_BATCH_FAILED)


class TriggerCheck:
    """Rows since the last snapshot, and the threshold check when they may reach it or on the timer."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings, self.engine = settings, engine
        self._lock = asyncio.Lock()
        self._pending = 0
        """Rows since the last snapshot: the last check's count plus what this worker stored since."""
        self._held = False
        """The last check waited on cooldown or an in-flight retrain; only the timer checks again."""

    def stored(self, new_rows: int) -> None:
        self._pending += new_rows
        metrics.ROWS_SINCE_SNAPSHOT.set(self._pending)

    async def after_batch(self) -> None:
        """Check only when the threshold may be reached: a check costs several queries and a table lock.

        Rows stored by other workers are counted at the next timer check.
        """
        if not self._held and self._pending >= self.settings.trigger.threshold:
            await self.check()

    async def check(self, republish: bool = False) -> None:
        """Run the threshold check off the event loop; one at a time, and never fatal to ingestion.

        ``republish`` first sends requests a broker outage left recorded but unsent; under the same
        lock, so an emission in progress is never sent twice.
        """
        if self._lock.locked():
            return
        async with self._lock:
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


class BatchSink(ConsumerRebalanceListener):
    """Stores validated batches one at a time in the background and commits their offsets afterwards.

    Also the consumer's rebalance listener: revocation waits for the batch being stored.
    """

    def __init__(self, settings: Settings, engine: Engine, dlq: faust.TopicT, consumer: AIOKafkaConsumer,
                 checker: TriggerCheck) -> None:
        self.settings, self.engine, self.dlq, self.consumer, self.checker = settings, engine, dlq, consumer, checker
        self.epoch = 0
        """Counts revocations: a batch fetched in an earlier epoch is dropped, never stored or committed."""
        self._stored_up_to: dict[TopicPartition, int] = {}
        """Per partition held since the last revocation, the offset after the last stored record."""
        self._writing: asyncio.Task | None = None
        """The previous batch, stored while the next one is fetched and validated."""

    async def submit(self, records: Sequence[SourceRecord], epoch: int) -> None:
        """Validate a batch, then store it in the background once the previous one is stored."""
        try:
            batch = split_batch(records, self.settings)
        except Exception:
            _exit_uncommitted(records)
        await self.drain()
        if epoch != self.epoch:
            log.info("dropped %d records fetched before a rebalance; they are read again", len(records))
            return
        self._writing = asyncio.create_task(self._finish(records, batch))

    async def drain(self) -> None:
        """Wait for the batch being stored, if any."""
        if self._writing is not None:
            # Shielded: a worker stopping mid-wait must not cancel a write whose rows may already be committed.
            await asyncio.shield(self._writing)
            self._writing = None

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.epoch += 1
        await self.drain()  # its offsets are committed while this member still holds the partitions
        for tp in revoked:
            self._stored_up_to.pop(tp, None)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("assigned %s", ", ".join(f"{tp.topic}:{tp.partition}" for tp in sorted(assigned)) or "nothing")

    async def _finish(self, records: Sequence[SourceRecord], batch: Batch) -> None:
        """Store and dead-letter one batch, then commit it; on an unexpected error, exit without committing."""
        try:
            await self._handle(records, batch)
        except Exception:
            _exit_uncommitted(records)
        for record in records:  # in offset order within each partition
            self._stored_up_to[TopicPartition(record.topic, record.partition)] = record.offset + 1
        await self._commit()
        await self.checker.after_batch()

    async def _commit(self) -> None:
        """Commit every held partition's stored position; one refused is committed with the next batch."""
        held = self.consumer.assignment()
        offsets = {tp: offset for tp, offset in self._stored_up_to.items() if tp in held}
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except KafkaError as e:  # e.g. the group rebalanced: the next owner reads from the last commit
            log.warning("offset commit refused (%r); the stored rows stay, replays count as duplicates", e)

    async def _handle(self, records: Sequence[SourceRecord], batch: Batch) -> None:
        started = time.perf_counter()
        metrics.CONSUMED.inc(len(records))
        result, refused = await self._store(batch.rows)
        await self._dead_letter(batch.rejected + refused)
        metrics.ACCEPTED.inc(result.new)
        metrics.DUPLICATES.inc(result.duplicates)
        self.checker.stored(result.new)
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        log.debug("batch of %d: %d new, %d duplicates, %d dead-lettered", len(records), result.new,
                  result.duplicates, len(batch.rejected) + len(refused))

    async def _store(self, rows) -> tuple[InsertResult, list[tuple[SourceRecord, Rejection]]]:
        """Wait out database outages: nothing is committed until the rows are stored."""
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
            # force=True: send now (no source event to attach to), and await delivery below.
            pending.append(await self.dlq.send(key=key, value=letter.model_dump_json().encode(), force=True))
            metrics.DEAD_LETTERED.labels(rejection.category).inc()
            log.warning("dead-lettered %s:%d@%d: %s", record.topic, record.partition, record.offset, rejection.reason)
        await asyncio.gather(*pending)


async def next_batch(consumer: AIOKafkaConsumer, sink: BatchSink, size: int,
                     window_s: float) -> tuple[list[SourceRecord], int]:
    """Up to ``size`` records fetched since the last revocation, and that epoch.

    Fewer once ``window_s`` has passed since the first record; none after an idle window.
    """
    records: list[SourceRecord] = []
    epoch, deadline = sink.epoch, None
    while len(records) < size:
        timeout_s = window_s if deadline is None else deadline - time.monotonic()
        if timeout_s <= 0:
            break
        fetched = await consumer.getmany(timeout_ms=max(1, int(timeout_s * 1000)), max_records=size - len(records))
        if sink.epoch != epoch:
            # Partitions were revoked while collecting: aiokafka returns records only once the new assignment
            # is in place, from the committed offsets on, so what was collected before is read again.
            records, epoch, deadline = [], sink.epoch, None
        for partition_records in fetched.values():
            records += [SourceRecord(r.topic, r.partition, r.offset, r.value) for r in partition_records]
        if not records:
            break
        if deadline is None:
            deadline = time.monotonic() + window_s
    return records, epoch


def observe_lag(consumer: AIOKafkaConsumer, records: Sequence[SourceRecord]) -> None:
    """Lag from the high watermark of fetch responses and the offsets we fetched (ListOffsets is unreliable here)."""
    last = {TopicPartition(r.topic, r.partition): r.offset for r in records}
    for tp, offset in last.items():
        try:
            highwater = consumer.highwater(tp)
        except AssertionError:  # partition revoked between fetch and now
            continue
        if highwater is not None:
            metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(max(0, highwater - offset - 1))


def build_consumer(settings: Settings) -> AIOKafkaConsumer:
    """Manual commits only; offsets from the start of the topic for a new group (never ListOffsets(LATEST))."""
    k = settings.kafka
    return AIOKafkaConsumer(
        bootstrap_servers=k.bootstrap.split(","),
        group_id=k.accumulator_group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=k.session_timeout_ms,
        heartbeat_interval_ms=k.heartbeat_interval_ms,
    )


class EventConsumer(mode.Service):
    """The events topic into the store, batch by batch. Started after the app's producer, stopped before it."""

    def __init__(self, settings: Settings, engine: Engine, dlq: faust.TopicT, checker: TriggerCheck) -> None:
        super().__init__()
        self.settings, self.engine, self.dlq, self.checker = settings, engine, dlq, checker
        self._consuming: asyncio.Task | None = None

    async def on_started(self) -> None:
        consumer = build_consumer(self.settings)  # aiokafka binds to the running loop
        sink = BatchSink(self.settings, self.engine, self.dlq, consumer, self.checker)
        consumer.subscribe([self.settings.kafka.events_topic], listener=sink)
        await consumer.start()
        self._consuming = asyncio.create_task(self._consume(consumer, sink))
        self._consuming.add_done_callback(self._crash_on_error)

    async def _consume(self, consumer: AIOKafkaConsumer, sink: BatchSink) -> None:
        batching = self.settings.stream
        try:
            while True:
                records, epoch = await next_batch(consumer, sink, batching.batch_size, batching.batch_window_s)
                if records:
                    await sink.submit(records, epoch)
                    observe_lag(consumer, records)
        finally:  # a stopping worker still commits what it stored, so a restart does not read it again
            await sink.drain()
            await consumer.stop()

    def _crash_on_error(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            asyncio.ensure_future(self.crash(task.exception()))

    async def on_stop(self) -> None:
        if self._consuming is not None:
            self._consuming.cancel()
            with suppress(asyncio.CancelledError):
                await self._consuming


def build_app(settings: Settings) -> faust.App:
    """The faust app: the event consumer as a service, the dead-letter producer, one timer for the trigger."""
    k = settings.kafka
    datadir = settings.stack.home / "faust" / k.accumulator_group
    datadir.mkdir(parents=True, exist_ok=True)  # faust creates only the last level
    app = faust.App(
        k.accumulator_group,
        broker=[f"kafka://{host}" for host in k.bootstrap.split(",")],
        datadir=str(datadir),
        store="memory://",
        web_enabled=False,
        key_serializer="raw",
        value_serializer="raw",
        producer_acks=-1,
        producer_max_request_size=k.max_message_bytes * 2 + 65536,  # a dead letter carries base64 of the original
        topic_partitions=k.partitions,
    )
    # faust's own consumer (and with it its per-record streams, tables and group) stays off.
    app.boot_strategy = BootStrategy(app, enable_kafka_consumer=False)
    engine = make_engine(settings)
    checker = TriggerCheck(settings, engine)
    app.service(EventConsumer(settings, engine, app.topic(k.dlq_topic, value_type=bytes, key_type=bytes), checker))

    @app.timer(interval=TRIGGER_RECHECK_S)
    async def recheck() -> None:
        await checker.check(republish=True)

    return app


def run(settings: Settings, loglevel: str = "info") -> None:
    """Prepare topics and tables, expose metrics, then run the faust worker until stopped."""
    logging.getLogger("kafka").setLevel(logging.WARNING)  # kafka-python (topic set-up, trigger) is chatty at INFO
    ensure_topics(settings)
    engine = make_engine(settings)
    create_schema(engine)
    engine.dispose()
    metrics.serve_metrics(settings.stream.metrics_port, settings.stack.host)
    mode.loop.use("uvloop")  # a cheaper loop for aiokafka's and faust's futures; set before any loop exists
    app = build_app(settings)
    log.info("accumulator: %s -> %s (group %s)", settings.kafka.events_topic, settings.database.url.split("@")[-1],
             settings.kafka.accumulator_group)
    faust.Worker(app, loglevel=loglevel).execute_from_commandline()
