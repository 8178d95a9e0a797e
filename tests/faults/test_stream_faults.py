"""Infrastructure faults under a flowing stream: broker restart, PostgreSQL connections dropped mid-batch.

    .venv/bin/pytest tests/faults/test_stream_faults.py -q

Both keep the same accumulator process running through the fault: it has to recover by itself,
and the store must end with every published event exactly once.
"""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import create_engine, make_url, text
from stream_events import build_event
from stream_stack import start_accumulator, stop, stored_count, stored_ids, wait_for

from services.stream.publisher import publish

pytestmark = pytest.mark.integration

KILLED_CONNECTIONS = 5


class ChunkedPublisher(threading.Thread):
    """Publishes chunks of fresh events until stopped (or ``max_chunks``); keeps every id it sent."""

    def __init__(self, env, chunk: int, max_chunks: int, rate: float | None = None):
        super().__init__(name="publisher")
        self.env, self.chunk, self.max_chunks, self.rate = env, chunk, max_chunks, rate
        self.sent: list[str] = []
        self.failed = 0
        self.done = threading.Event()

    def run(self) -> None:
        for n in range(self.max_chunks):
            if self.done.is_set():
                return
            events = [build_event(n * self.chunk + i) for i in range(self.chunk)]
            summary = publish(self.env.settings, events, rate=self.rate)
            self.failed += summary.failed
            self.sent += [str(e.event_id) for e in events]

    def finish(self) -> list[str]:
        self.done.set()
        self.join()
        assert self.failed == 0, f"{self.failed} sends were never acknowledged"
        return self.sent


def _drain_and_check(env, accumulator, log, sent: list[str]) -> None:
    """The running accumulator stores every sent event; the store holds each exactly once."""
    engine = env.engine()
    try:
        wait_for(lambda: stored_count(engine) >= len(sent) or accumulator.poll() is not None, 240,
                 "every event stored", every=0.5)
    finally:
        engine.dispose()
    assert accumulator.poll() is None, f"the accumulator died instead of recovering, see {log}"
    ids = stored_ids(env)
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} duplicated rows"
    assert set(ids) == set(sent), f"{len(set(sent) - set(ids))} events lost"


def test_broker_restart_mid_stream_loses_nothing(stack, stream_env, tmp_path):
    from deploy import stack as embedded

    env, log = stream_env(**{"stream.batch_size": 50, "trigger.threshold": 10**9}), tmp_path / "accumulator.log"
    accumulator = start_accumulator(env, log)
    # One producer across the outage: it has to ride it out (a producer created while the broker is down cannot start).
    publisher = ChunkedPublisher(env, chunk=3000, max_chunks=1, rate=250)
    engine = env.engine()
    try:
        publisher.start()
        wait_for(lambda: stored_count(engine) >= 200, 120, "rows flowing before the restart")
        # Only the broker: S3 (its storage), MLflow and Ray stay up for the other tests sharing the stack.
        assert embedded.down(stack, only=["kafka"]) == ["kafka"]
        embedded.up(stack)
        sent = publisher.finish()
        assert len(sent) == 3000
        _drain_and_check(env, accumulator, log, sent)
    finally:
        publisher.done.set()
        engine.dispose()
        stop(accumulator)


def _kill_a_blocked_insert(env, admin) -> int:
    """Block the table, wait until an accumulator insert is stuck on the lock inside its batch transaction,
    terminate that backend, release the table; returns how many backends were terminated.

    The lock makes "mid-batch" certain: unblocked, a batch insert is over too quickly to be caught.
    """
    database = make_url(env.settings.database.url).database
    blocked = text("SELECT pid FROM pg_stat_activity WHERE datname = :db AND wait_event_type = 'Lock' "
                   "AND pid <> :holder AND query ILIKE '%%INSERT INTO qa_events%%'")
    engine = env.engine()
    try:
        with engine.connect() as holder:
            holder.execute(text("LOCK TABLE qa_events IN ACCESS EXCLUSIVE MODE"))
            pid = holder.execute(text("SELECT pg_backend_pid()")).scalar_one()
            with admin.connect() as conn:
                stuck = wait_for(lambda: conn.execute(blocked, {"db": database, "holder": pid}).scalars().all(), 120,
                                 "an accumulator insert blocked mid-batch", every=0.1)
                terminated = sum(conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": p}).scalar_one()
                                 for p in stuck)
            holder.rollback()
    finally:
        engine.dispose()
    return terminated


def test_postgres_connections_dropped_mid_batch_are_retried(stream_env, tmp_path):
    env, log = stream_env(**{"stream.batch_size": 200, "trigger.threshold": 10**9}), tmp_path / "accumulator.log"
    admin = create_engine(make_url(env.settings.database.url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    accumulator = start_accumulator(env, log)
    publisher = ChunkedPublisher(env, chunk=300, max_chunks=20)
    try:
        publisher.start()
        killed = [_kill_a_blocked_insert(env, admin) for _ in range(KILLED_CONNECTIONS)]
        assert all(killed), f"each round terminated a backend caught inside a batch: {killed}"
        sent = publisher.finish()
        _drain_and_check(env, accumulator, log, sent)
    finally:
        publisher.done.set()
        stop(accumulator)
        admin.dispose()
