"""Clients for the stack's services, built from the one Settings object.

Stages import these instead of reading endpoints or credentials themselves, so the
embedded stack, docker-compose and a real deployment differ only in settings.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from schemas.settings import Settings


@dataclass(frozen=True)
class S3Credentials:
    access_key: str
    secret_key: str


def credentials_file(settings: Settings) -> Path:
    """Generated on the first ``stack up``; mode 0600."""
    return settings.stack.home / "credentials.json"


def s3_credentials(settings: Settings) -> S3Credentials:
    """Explicit settings win; otherwise the embedded stack's generated file."""
    if settings.s3.access_key and settings.s3.secret_key:
        return S3Credentials(settings.s3.access_key, settings.s3.secret_key)
    path = credentials_file(settings)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise RuntimeError(
            "no S3 credentials: set MEDRETRAIN_S3__ACCESS_KEY/SECRET_KEY or run `medretrain stack up`"
            f" (expected {path})"
        ) from e
    return S3Credentials(data["s3_access_key"], data["s3_secret_key"])


def boto3_s3(settings: Settings):
    """A boto3 S3 client speaking SigV4 to the configured endpoint."""
    import boto3
    from botocore.config import Config

    creds = s3_credentials(settings)
    return boto3.client(
        "s3",
        endpoint_url=settings.s3.endpoint,
        aws_access_key_id=creds.access_key,
        aws_secret_access_key=creds.secret_key,
        region_name=settings.s3.region,
        config=Config(signature_version="s3v4", retries={"max_attempts": settings.s3.retries, "mode": "standard"}),
    )


def pyarrow_s3(settings: Settings):
    """pyarrow filesystem for Ray Train's ``storage_filesystem`` (storage_path is then ``bucket/prefix``)."""
    from pyarrow import fs

    creds = s3_credentials(settings)
    scheme, _, host = settings.s3.endpoint.partition("://")
    return fs.S3FileSystem(
        endpoint_override=host,
        scheme=scheme,
        access_key=creds.access_key,
        secret_key=creds.secret_key,
        region=settings.s3.region,
    )


def use_mlflow(settings: Settings) -> None:
    """Point the mlflow client at the tracking server (artifacts go through its proxy, so no S3 creds here)."""
    import mlflow

    os.environ["MLFLOW_TRACKING_URI"] = settings.mlflow.tracking_uri
    mlflow.set_tracking_uri(settings.mlflow.tracking_uri)


def topic_names(settings: Settings) -> tuple[str, ...]:
    """Every topic medretrain uses."""
    k = settings.kafka
    return (k.events_topic, k.dlq_topic, k.requests_topic, k.status_topic, k.answers_topic)


def ensure_topics(settings: Settings, names: Iterable[str] | None = None) -> list[str]:
    """Create the missing topics (default: all of :func:`topic_names`) with ``kafka.partitions``; returns the new ones.

    Topics are always created explicitly: auto-created topics would get the broker's partition count.
    """
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    wanted = list(dict.fromkeys(topic_names(settings) if names is None else names))
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap, client_id="medretrain-admin")
    try:
        missing = [name for name in wanted if name not in set(admin.list_topics())]
        created = []
        for name in missing:
            try:
                admin.create_topics([NewTopic(name, num_partitions=settings.kafka.partitions, replication_factor=1)])
                created.append(name)
            except TopicAlreadyExistsError:
                pass  # another process created it between our listing and now
        return created
    finally:
        admin.close()
