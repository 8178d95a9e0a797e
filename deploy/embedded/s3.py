"""S3 service: SeaweedFS ``weed mini`` (master, volume, filer and S3 gateway in one process).

Credentials are generated on the first start and kept in ``<home>/credentials.json``
(mode 0600): the SigV4 key pair of the only S3 identity and the JWT keys in
``security.toml`` that make the volume and filer ports refuse unsigned writes.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from deploy.clients import boto3_s3, credentials_file, s3_credentials
from deploy.embedded import Service, host_port, http_ok, venv_bin
from deploy.process import Launch
from schemas.settings import Settings

SECRET_KEYS = ("jwt_signing_key", "jwt_filer_signing_key", "jwt_filer_signing_read_key", "admin_password")


def buckets(settings: Settings) -> tuple[str, ...]:
    s3 = settings.s3
    return (s3.artifacts_bucket, s3.checkpoints_bucket, s3.datasets_bucket, settings.stack.broker_bucket)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to a file only its owner can read, never briefly world-readable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def ensure_credentials(settings: Settings) -> dict[str, str]:
    """Read the stack's secrets, generating them on first use."""
    path = credentials_file(settings)
    if path.exists():
        return json.loads(path.read_text())
    creds = {"s3_access_key": "mr" + secrets.token_hex(9), "s3_secret_key": secrets.token_urlsafe(30)}
    creds.update({key: secrets.token_urlsafe(32) for key in SECRET_KEYS})
    write_private(path, json.dumps(creds, indent=2) + "\n")
    return creds


def _security_toml(creds: dict[str, str]) -> str:
    # Read by every weed component from its working directory.
    return (
        f'[jwt.signing]\nkey = "{creds["jwt_signing_key"]}"\nexpires_after_seconds = 10\n\n'
        f'[jwt.filer_signing]\nkey = "{creds["jwt_filer_signing_key"]}"\nexpires_after_seconds = 10\n\n'
        f'[jwt.filer_signing.read]\nkey = "{creds["jwt_filer_signing_read_key"]}"\nexpires_after_seconds = 10\n\n'
        "[access]\nui = false\n"
    )


def _s3_identities(settings: Settings) -> str:
    creds = s3_credentials(settings)
    identity = {
        "name": "medretrain",
        "credentials": [{"accessKey": creds.access_key, "secretKey": creds.secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    return json.dumps({"identities": [identity]}, indent=2)


def server_dir(settings: Settings) -> Path:
    """The S3 server's files under the stack home: absent until the stack's first start."""
    return settings.stack.home / "s3"


def launch(settings: Settings) -> Launch:
    stack = settings.stack
    workdir = server_dir(settings)
    creds = ensure_credentials(settings)
    write_private(workdir / "security.toml", _security_toml(creds))
    write_private(workdir / "s3.json", _s3_identities(settings))
    # An options file keeps the admin password out of the process list.
    write_private(workdir / "secret.options", f"admin.password={creds['admin_password']}\n")
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    _, s3_port = host_port(settings.s3.endpoint)
    ports = {
        "master": stack.s3_master_port,
        "volume": stack.s3_volume_port,
        "filer": stack.s3_filer_port,
        "s3": s3_port,
        "admin": stack.s3_admin_port,
    }
    argv = [
        venv_bin("weed"), "mini", f"-dir={workdir / 'data'}", f"-ip={stack.host}", f"-ip.bind={stack.host}",
        f"-s3.config={workdir / 's3.json'}", f"-options={workdir / 'secret.options'}",
        "-webdav=false", "-master.telemetry=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.iam=false",
        f"-filer.localSocket={workdir / 'filer.sock'}", f"-s3.localSocket={workdir / 's3.sock'}",
        # Every bucket is a collection that grows several volumes; the automatic cap (from free disk at start)
        # ran out after a few dozen buckets. Volumes are sparse files, so a high cap costs little.
        "-volume.max=2000", "-master.volumeSizeLimitMB=64",
    ]  # fmt: skip
    for component, port in ports.items():
        argv += [f"-{component}.port={port}", f"-{component}.port.grpc={port + stack.s3_grpc_offset}"]
    return Launch(argv=argv, cwd=workdir)


def url(settings: Settings) -> str:
    return settings.s3.endpoint


def healthy(settings: Settings) -> bool:
    return http_ok(settings.s3.endpoint.rstrip("/") + "/healthz")


def ensure(settings: Settings) -> None:
    """Create the stack's buckets that are missing."""
    client = boto3_s3(settings)
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    for bucket in buckets(settings):
        if bucket not in existing:
            client.create_bucket(Bucket=bucket)


SERVICE = Service(name="s3", url=url, launch=launch, healthy=healthy, ensure=ensure)
