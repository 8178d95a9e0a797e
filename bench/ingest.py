"""Ingest benchmark: events/s from the broker into PostgreSQL end to end, against raw kafka-python consumption.

    .venv/bin/python bench/ingest.py                       # 50,000 events, JSON to stdout and bench/results/ingest.json
    .venv/bin/python bench/ingest.py --events 50000 --batch-size 500 --out /tmp/ingest.json

Runs against the stack the settings name (``MEDRETRAIN_*`` env, e.g. the test stack's), on fresh
topics, consumer group and database that are dropped afterwards. Both rates are steady-state:
first record to last record (raw, measured before and after, averaged) and first stored batch to
last stored batch, by the rows' insert times (end to end: the real ``medretrain serve accumulator``
process: validate, insert with ON CONFLICT, commit, then offset commit), so the worker's group
join is reported apart as ``accumulator_startup_s``.
Goal: end to end >= 50% of raw.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
from sqlalchemy import func, select

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "services")]  # the test helpers that isolate topics and database

from stream_events import build_event  # noqa: E402
from stream_stack import close_env, open_env, start_accumulator, stop, stored_count  # noqa: E402

from schemas.settings import load_settings  # noqa: E402
from services.store import QAEventRow  # noqa: E402
from services.stream.publisher import publish  # noqa: E402

log = logging.getLogger("bench.ingest")


@dataclass(frozen=True)
class Rate:
    per_s: float
    cpu_us_per_record: float
    """CPU time of the consuming process only (not the broker's or PostgreSQL's): load-independent."""


def raw_consume_rate(settings, n: int) -> Rate:
    """kafka-python reading the same records (no decoding, no storage)."""
    from kafka import KafkaConsumer, TopicPartition

    topic = settings.kafka.events_topic
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka.bootstrap, group_id=None, enable_auto_commit=False,
                             consumer_timeout_ms=30_000)
    partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    seen, first, first_cpu = 0, None, 0.0
    for _ in consumer:
        seen += 1
        if first is None:
            first, first_cpu = time.perf_counter(), time.process_time()
        if seen == n:
            break
    elapsed, cpu = time.perf_counter() - first, time.process_time() - first_cpu
    consumer.close()
    if seen != n:
        raise RuntimeError(f"raw consumer saw {seen} of {n} records")
    return Rate((n - 1) / elapsed, cpu / (n - 1) * 1e6)


def _cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def stored_window(engine) -> tuple[float, int]:
    """(seconds from the first stored batch to the last, rows stored after the first batch).

    From the rows' own ``ingested_at`` (one per batch insert), so the rate needs no fast polling,
    whose queries would take CPU from the accumulator and PostgreSQL on a small host.
    """
    with engine.connect() as conn:
        first, last = conn.execute(select(func.min(QAEventRow.ingested_at), func.max(QAEventRow.ingested_at))).one()
        later = select(func.count()).select_from(QAEventRow).where(QAEventRow.ingested_at > first)
        return (last - first).total_seconds(), conn.execute(later).scalar_one()


def end_to_end_rate(env, n: int, log_path: Path) -> tuple[Rate, float]:
    """(rows stored per second after the first batch, seconds from process start to the first stored row)."""
    engine = env.engine()
    started = time.perf_counter()
    accumulator = start_accumulator(env, log_path)
    try:
        first_at, first_count, first_cpu = None, 0, 0.0
        while True:
            count = stored_count(engine)
            now = time.perf_counter()
            if first_at is None and count:
                first_at, first_count, first_cpu = now, count, _cpu_seconds(accumulator.pid)
            if count >= n:
                cpu = _cpu_seconds(accumulator.pid) - first_cpu
                break
            if accumulator.poll() is not None or now - started > 600:
                raise RuntimeError(f"accumulator stopped or stalled at {count}/{n} rows; log {log_path}")
            time.sleep(0.25)
        seconds, later = stored_window(engine)
    finally:
        stop(accumulator)
        engine.dispose()
    return Rate(later / seconds, cpu / (n - first_count) * 1e6), first_at - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 20,000 left kafka-python's raw rate ramping (about 8,500/s there against 12,000/s at 50,000): no steady state.
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=None, help="stream.batch_size (default: settings)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ingest.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)

    extra = {"trigger.threshold": 10**9, "stream.metrics_port": 0}
    if args.batch_size:
        extra["stream.batch_size"] = args.batch_size
    args.out.parent.mkdir(parents=True, exist_ok=True)
    env = open_env(load_settings(), extra)
    try:
        sent = publish(env.settings, (build_event(i) for i in range(args.events)))
        if sent.sent != args.events:
            raise RuntimeError(f"published {sent.sent} of {args.events} events: {sent.errors[:3]}")
        log.info("published %d events at %.0f/s", sent.sent, sent.per_second)
        # Raw before and after: the host is shared, so its load drifts during the run.
        raw_runs = [raw_consume_rate(env.settings, args.events)]
        e2e, startup = end_to_end_rate(env, args.events, Path(tempfile.gettempdir()) / "medretrain-bench-ingest.log")
        raw_runs.append(raw_consume_rate(env.settings, args.events))
        raw = sum(r.per_s for r in raw_runs) / len(raw_runs)
        log.info("raw kafka-python consume: %s records/s; end to end into PostgreSQL: %.0f events/s",
                 " and ".join(f"{r.per_s:.0f}" for r in raw_runs), e2e.per_s)
    finally:
        close_env(env)
    result = {
        "benchmark": "ingest",
        "events": args.events,
        "partitions": env.settings.kafka.partitions,
        "batch_size": env.settings.stream.batch_size,
        "publish_events_per_s": round(sent.per_second, 1),
        "raw_consume_records_per_s": round(raw, 1),
        "raw_runs_records_per_s": [round(r.per_s, 1) for r in raw_runs],
        "end_to_end_events_per_s": round(e2e.per_s, 1),
        "ratio_to_raw": round(e2e.per_s / raw, 3),
        "goal_ratio": 0.5,
        "goal_met": e2e.per_s / raw >= 0.5,
        "raw_cpu_us_per_record": round(sum(r.cpu_us_per_record for r in raw_runs) / len(raw_runs), 1),
        "accumulator_cpu_us_per_event": round(e2e.cpu_us_per_record, 1),
        "accumulator_startup_s": round(startup, 1),
        "database": env.settings.database.url.split("+")[0],
        "host": {"cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
                 "python": platform.python_version(), "machine": platform.machine()},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
