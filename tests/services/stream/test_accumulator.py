"""The accumulator's batch sink without a broker: offsets are committed only after the rows are (SQLite)."""

from __future__ import annotations

import asyncio
import threading

from aiokafka import TopicPartition
from sqlalchemy import func, select
from stream_events import build_event

from services.store import QAEventRow
from services.stream import accumulator
from services.stream.accumulator import BatchSink, TriggerCheck
from services.stream.ingest import SourceRecord, store_batch

P0, P1 = TopicPartition("qa.events", 0), TopicPartition("qa.events", 1)


class GroupConsumer:
    """What the sink uses of an aiokafka consumer: the partitions it holds, and commits."""

    def __init__(self, held: set[TopicPartition]) -> None:
        self.held = held
        self.commits: list[dict[TopicPartition, int]] = []

    def assignment(self) -> set[TopicPartition]:
        return set(self.held)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(dict(offsets))


class DeadLetterTopic:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def send(self, key: bytes, value: bytes, force: bool) -> asyncio.Future:
        self.sent.append(key)
        delivered = asyncio.get_running_loop().create_future()
        delivered.set_result(None)
        return delivered


def _record(partition: int, offset: int, value: bytes | None = None) -> SourceRecord:
    return SourceRecord("qa.events", partition, offset, value or build_event(offset).model_dump_json().encode())


def _stored(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(QAEventRow)).scalar_one()


def _sink(settings, engine, consumer: GroupConsumer) -> tuple[BatchSink, DeadLetterTopic]:
    dlq = DeadLetterTopic()
    return BatchSink(settings, engine, dlq, consumer, TriggerCheck(settings, engine)), dlq


def test_offsets_are_committed_only_after_the_rows(sqlite_settings, sqlite_engine, monkeypatch):
    started, commit = threading.Event(), threading.Event()
    calls: list[int] = []

    def store_when_allowed(engine, rows):
        calls.append(len(rows))
        started.set()
        if not commit.wait(timeout=60):  # a deadline against a hung test, not a timing assertion
            raise TimeoutError("the test never let the store commit")
        return store_batch(engine, rows)

    monkeypatch.setattr(accumulator, "store_batch", store_when_allowed)
    consumer = GroupConsumer({P0, P1})
    sink, dlq = _sink(sqlite_settings, sqlite_engine, consumer)
    first = [_record(0, 0), _record(1, 0), _record(0, 1), _record(0, 2, b"{not json")]
    second = [_record(1, 1)]

    async def scenario() -> None:
        await sink.submit(first, sink.epoch)
        next_batch = asyncio.create_task(sink.submit(second, sink.epoch))
        assert await asyncio.to_thread(started.wait, 60)
        await asyncio.sleep(0)  # the next batch runs up to its wait for the write
        assert calls == [3] and not next_batch.done(), "the next batch waits for the one being stored"
        assert consumer.commits == [], "committed before the database commit"
        assert _stored(sqlite_engine) == 0 and dlq.sent == []
        commit.set()
        await next_batch
        await sink.drain()

    asyncio.run(scenario())
    assert calls == [3, 1] and _stored(sqlite_engine) == 4
    assert dlq.sent == [b"qa.events:0:2"]
    assert consumer.commits == [{P0: 3, P1: 1}, {P0: 3, P1: 2}], "per partition, the offset after the last stored"


def test_revocation_finishes_the_write_and_drops_a_batch_fetched_before_it(sqlite_settings, sqlite_engine):
    consumer = GroupConsumer({P0, P1})
    sink, _ = _sink(sqlite_settings, sqlite_engine, consumer)

    async def scenario() -> None:
        await sink.submit([_record(0, 0), _record(1, 0)], sink.epoch)
        fetched_in = sink.epoch
        await sink.on_partitions_revoked({P0, P1})  # the assignment still holds both until the rebalance is done
        assert consumer.commits == [{P0: 1, P1: 1}], "the batch in flight is committed before the partitions go"
        consumer.held = {P0}
        await sink.submit([_record(0, 1), _record(1, 1)], fetched_in)
        await sink.submit([_record(0, 1)], sink.epoch)
        await sink.drain()

    asyncio.run(scenario())
    assert _stored(sqlite_engine) == 3, "the batch fetched before the revocation was dropped unwritten"
    assert consumer.commits[1:] == [{P0: 2}], "only held partitions, and none forgotten at revocation"


class FetchingConsumer:
    """``getmany`` hands out prepared fetches, one per call; the one numbered ``revoke_before`` follows a revocation."""

    def __init__(self, sink: BatchSink, fetches: list[list[SourceRecord]], revoke_before: int) -> None:
        self.sink, self.fetches, self.revoke_before, self.calls = sink, fetches, revoke_before, 0

    async def getmany(self, timeout_ms: int, max_records: int):
        if self.calls == self.revoke_before:
            self.sink.epoch += 1  # what on_partitions_revoked does while getmany waits for the new assignment
        self.calls += 1
        if self.calls > len(self.fetches):  # nothing new: aiokafka waits out the timeout
            await asyncio.sleep(timeout_ms / 1000)
            return {}
        return {(r.topic, r.partition): [r] for r in self.fetches[self.calls - 1][:max_records]}


def test_a_batch_keeps_only_records_fetched_since_the_last_revocation(sqlite_settings, sqlite_engine):
    sink, _ = _sink(sqlite_settings, sqlite_engine, GroupConsumer({P0, P1}))
    before, after = [_record(0, 5), _record(1, 7)], [_record(0, 3)]
    consumer = FetchingConsumer(sink, [before, after, [_record(1, 4)]], revoke_before=1)

    records, epoch = asyncio.run(accumulator.next_batch(consumer, sink, size=3, window_s=0.2))

    assert epoch == sink.epoch == 1
    assert [(r.partition, r.offset) for r in records] == [(0, 3), (1, 4)], "what preceded the revocation is read again"
