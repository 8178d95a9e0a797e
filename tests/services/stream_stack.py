"""Helpers of the stream integration tests: an isolated corner of the shared test stack.

Each test gets its own topics, consumer group, PostgreSQL database and datasets bucket
(uuid suffix), so tests share one stack and run in any order.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, func, make_url, select, text

from deploy.clients import database_url, ensure_topics
from schemas.settings import Settings, load_settings
from services.store import QAEventRow, create_schema, make_engine

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class StreamEnv:
    settings: Settings
    overrides: tuple[str, ...]
    """The same settings as ``--set`` arguments, for subprocesses."""

    def engine(self):
        return make_engine(self.settings)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def open_env(base: Settings, extra: dict[str, Any]) -> StreamEnv:
    suffix = uuid.uuid4().hex[:10]
    url = make_url(database_url(base)).set(database=f"medretrain_stream_{suffix}")
    values = {
        "kafka.events_topic": f"qa.events.{suffix}",
        "kafka.answers_topic": f"qa.answers.{suffix}",
        "kafka.dlq_topic": f"qa.events.dlq.{suffix}",
        "kafka.requests_topic": f"retrain.requests.{suffix}",
        "kafka.status_topic": f"retrain.status.{suffix}",
        "kafka.accumulator_group": f"accumulator-{suffix}",
        "database.url": url.render_as_string(hide_password=False),
        "s3.datasets_bucket": f"medretrain-datasets-{suffix}",
    } | {k: str(v) for k, v in extra.items()}
    overrides = tuple(f"{k}={v}" for k, v in values.items())
    settings = load_settings(list(overrides))
    ensure_topics(settings)
    engine = make_engine(settings)
    create_schema(engine)
    engine.dispose()
    return StreamEnv(settings, overrides)


def drop_bucket(settings: Settings, bucket: str) -> None:
    """Empty and delete one of the test's own buckets."""
    from botocore.exceptions import ClientError

    from deploy.clients import boto3_s3

    s3 = boto3_s3(settings)
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                s3.delete_object(Bucket=bucket, Key=item["Key"])
        s3.delete_bucket(Bucket=bucket)
    except ClientError:  # never created: e.g. the test emitted no snapshot
        pass


def close_env(env: StreamEnv) -> None:
    """Drop the test's database, datasets bucket and topics."""
    drop_bucket(env.settings, env.settings.s3.datasets_bucket)
    url = make_url(env.settings.database.url)
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)'))
    admin.dispose()
    from kafka.admin import KafkaAdminClient

    client = KafkaAdminClient(bootstrap_servers=env.settings.kafka.bootstrap)
    k = env.settings.kafka
    try:
        client.delete_topics([k.events_topic, k.dlq_topic, k.requests_topic, k.status_topic, k.answers_topic])
    except Exception:  # noqa: BLE001 - cleanup of a shared test broker is best effort
        pass
    finally:
        client.close()


def start_accumulator(env: StreamEnv, log_path: Path) -> subprocess.Popen:
    """The real CLI in its own process (so it can be SIGKILLed)."""
    return start_service(env, log_path, "accumulator", "--loglevel", "warn")


def start_service(env: StreamEnv, log_path: Path, name: str, *options: str) -> subprocess.Popen:
    """``medretrain serve <name>`` with the test's settings, in its own process."""
    args = [str(REPO / ".venv" / "bin" / "medretrain")]
    for pair in env.overrides:
        args += ["--set", pair]
    args += ["serve", name, *options]
    with log_path.open("ab") as log:
        return subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_for(condition: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    """Poll until ``condition()`` is truthy; a deadline, not a timing assertion."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def stored_ids(env: StreamEnv) -> list[str]:
    engine = env.engine()
    try:
        with engine.connect() as conn:
            return list(conn.execute(select(QAEventRow.event_id)).scalars())
    finally:
        engine.dispose()


def stored_count(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(QAEventRow)).scalar_one()


def read_topic(settings: Settings, topic: str, idle_ms: int = 3000) -> list:
    """Every record of ``topic`` from the beginning, stopping after ``idle_ms`` without new records."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=settings.kafka.bootstrap, group_id=None,
                             enable_auto_commit=False, consumer_timeout_ms=idle_ms)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        return list(consumer)
    finally:
        consumer.close()


def scrape(port: int) -> dict[str, float]:
    """Prometheus text format -> {"name{labels}": value} (comments and _created samples dropped)."""
    import urllib.error
    import urllib.request

    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except urllib.error.URLError:
        return {}  # not serving yet
    samples = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples
