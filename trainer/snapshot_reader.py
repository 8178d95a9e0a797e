"""Read a frozen data snapshot from S3: the manifest first, then files checked against its sha256.

    manifest, train, eval_rows = read_snapshot(settings, "snap-000123")

A folder without ``manifest.json`` is an incomplete export (the manifest is written last), so it
is refused rather than half-read.
"""

from __future__ import annotations

import hashlib
import logging

from deploy.clients import boto3_s3
from schemas.artifacts import SnapshotManifest
from schemas.data import SNAPSHOT_FILES, QAPair, snapshot_prefix
from schemas.settings import Settings

log = logging.getLogger(__name__)


class SnapshotError(RuntimeError):
    """The snapshot is missing, incomplete or corrupt: retrying will not help."""


def _get(s3, bucket: str, key: str) -> bytes:
    try:
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except s3.exceptions.NoSuchKey as e:
        raise SnapshotError(f"s3://{bucket}/{key} does not exist") from e


def parse_rows(data: bytes, name: str) -> list[QAPair]:
    """JSON lines of QAPair; a bad line is reported with its number."""
    rows = []
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(QAPair.model_validate_json(line))
        except ValueError as e:
            raise SnapshotError(f"{name} line {number} is not a QAPair: {e}") from e
    return rows


def read_snapshot(settings: Settings, snapshot_id: str) -> tuple[SnapshotManifest, list[QAPair], list[QAPair]]:
    """(manifest, train rows, eval rows) of ``s3://<datasets bucket>/datasets/<snapshot_id>/``."""
    s3 = boto3_s3(settings)
    bucket, prefix = settings.s3.datasets_bucket, snapshot_prefix(snapshot_id)
    try:
        raw = _get(s3, bucket, prefix + "manifest.json")
    except SnapshotError as e:
        raise SnapshotError(f"snapshot {snapshot_id} has no manifest.json: it is incomplete or does not exist") from e
    manifest = SnapshotManifest.model_validate_json(raw)
    if manifest.snapshot_id != snapshot_id:
        raise SnapshotError(f"manifest under {prefix} names snapshot {manifest.snapshot_id}, not {snapshot_id}")
    missing = [name for name in SNAPSHOT_FILES if name not in manifest.files]
    if missing:
        raise SnapshotError(f"manifest of {snapshot_id} lists no checksum for {missing}")
    rows = {}
    for name in SNAPSHOT_FILES:
        data = _get(s3, bucket, prefix + name)
        digest = hashlib.sha256(data).hexdigest()
        if digest != manifest.files[name]:
            raise SnapshotError(
                f"{name} of {snapshot_id} has sha256 {digest}, the manifest says {manifest.files[name]}"
            )
        rows[name] = parse_rows(data, name)
    train, eval_rows = rows["train.jsonl"], rows["eval.jsonl"]
    if len(train) != manifest.train_rows or len(eval_rows) != manifest.eval_rows:
        raise SnapshotError(
            f"{snapshot_id}: {len(train)}/{len(eval_rows)} train/eval rows, manifest says "
            f"{manifest.train_rows}/{manifest.eval_rows}"
        )
    log.info("snapshot %s: %d train rows, %d eval rows", snapshot_id, len(train), len(eval_rows))
    return manifest, train, eval_rows
