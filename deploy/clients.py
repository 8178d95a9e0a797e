"""Clients for the stack's services, built from the one Settings object.

Stages import these instead of reading endpoints or credentials themselves, so the
embedded stack, docker-compose and a real deployment differ only in settings.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

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


EMBEDDED_STORE_DB = "medretrain"
EMBEDDED_MLFLOW_DB = "mlflow"


def embedded_postgres_url(settings: Settings, database: str) -> str:
    """A database on the embedded stack's PostgreSQL server (trust auth, 127.0.0.1 only)."""
    return f"postgresql+psycopg://postgres@{settings.stack.host}:{settings.stack.postgres_port}/{database}"


def database_url(settings: Settings) -> str:
    """The medretrain store's URL: ``database.url``, else the embedded server's database."""
    return settings.database.url or embedded_postgres_url(settings, EMBEDDED_STORE_DB)


def mlflow_backend_uri(settings: Settings) -> str:
    """MLflow's metadata store: ``mlflow.backend_store_uri``, else the embedded server's database."""
    return settings.mlflow.backend_store_uri or embedded_postgres_url(settings, EMBEDDED_MLFLOW_DB)


def uses_embedded_postgres(settings: Settings) -> bool:
    return settings.database.url is None or settings.mlflow.backend_store_uri is None


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


def ray_token_file(settings: Settings) -> Path:
    """The Ray cluster's token: ``ray.auth_token_file``, else the embedded head's (0600, written by ``stack up``)."""
    return settings.ray.auth_token_file or settings.stack.home / "ray_token"


def _is_loopback(host: str | None) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def ray_env(settings: Settings) -> dict[str, str]:
    """What a Ray process of this stack needs in its environment: token auth with the cluster's token (where
    there is one: a cluster without a token file keeps Ray's own mode), and, for a head on loopback, loopback
    addresses (Ray otherwise swaps 127.0.0.1 for the machine's external address)."""
    env = {}
    if ray_token_file(settings).exists():
        env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(ray_token_file(settings))}
    if _is_loopback(urlsplit(settings.ray.address).hostname):
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return env


def use_ray(settings: Settings) -> None:
    """Make this process a client of the stack's Ray cluster: ``ray.init``, JobSubmissionClient, Serve, the state API.

    Call it before the first Ray call; it also works after ``import ray``, whose config and token cache it reloads.
    """
    env = ray_env(settings)
    os.environ.update(env)
    if (raylet := sys.modules.get("ray._raylet")) is not None:
        raylet.Config.initialize("")
        raylet.AuthenticationTokenLoader.instance().reset_cache()
    if (
        constants := sys.modules.get("ray._private.ray_constants")
    ) is not None and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" in env:
        constants.ENABLE_RAY_CLUSTER = False  # read once at import


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
