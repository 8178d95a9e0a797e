"""The accumulator's batch sink without a broker: a batch is acked only after its rows are committed (SQLite)."""

from __future__ import annotations

import asyncio
import threading

from faust.types.tuples import Message
from sqlalchemy import func, select
from stream_events import build_event

from services import accumulator
from services.accumulator import BatchSink
from services.ingest import store_batch
from services.store import QAEventRow


class DeliveredEvent:
    """A faust event as ``take_events`` hands it over: its message holds the one reference of its stream."""

    def __init__(self, offset: int, value: bytes) -> None:
        self.value = value
        self.message = Message("qa.events", 0, offset, 0.0, 0, None, None, value, None)
        self.message.incref()

    def ack(self) -> bool:
        return self.message.ack(consumer=None)


class DeadLetterTopic:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def send(self, key: bytes, value: bytes, force: bool) -> asyncio.Future:
        self.sent.append(key)
        delivered = asyncio.get_running_loop().create_future()
        delivered.set_result(None)
        return delivered


def _stored(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(QAEventRow)).scalar_one()


def test_batch_is_acked_only_after_its_rows_are_committed(sqlite_settings, sqlite_engine, monkeypatch):
    started, commit = threading.Event(), threading.Event()
    calls: list[int] = []

    def store_when_allowed(engine, rows):
        calls.append(len(rows))
        started.set()
        if not commit.wait(timeout=60):  # a deadline against a hung test, not a timing assertion
            raise TimeoutError("the test never let the store commit")
        return store_batch(engine, rows)

    monkeypatch.setattr(accumulator, "store_batch", store_when_allowed)
    dlq = DeadLetterTopic()
    sink = BatchSink(sqlite_settings, sqlite_engine, dlq)
    first = [DeliveredEvent(i, build_event(i).model_dump_json().encode()) for i in range(3)]
    first.append(DeliveredEvent(3, b"{not json"))
    second = [DeliveredEvent(4, build_event(4).model_dump_json().encode())]

    async def scenario() -> None:
        await sink.submit(first)
        for event in first:  # what take_events does as soon as the agent body returns
            event.ack()
        next_batch = asyncio.create_task(sink.submit(second))
        assert await asyncio.to_thread(started.wait, 60)
        await asyncio.sleep(0)  # the next batch runs up to its wait for the write
        assert calls == [3] and not next_batch.done(), "the next batch waits for the one being stored"
        assert not any(event.message.acked for event in first), "acked before the database commit"
        assert _stored(sqlite_engine) == 0 and dlq.sent == []
        commit.set()
        await next_batch
        await sink.drain()

    asyncio.run(scenario())
    assert calls == [3, 1] and _stored(sqlite_engine) == 4
    assert dlq.sent == [b"qa.events:0:3"]
    assert all(event.message.acked for event in first)
    assert not second[0].message.acked, "the stream's own reference is still held until take_events acks it"
