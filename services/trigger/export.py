"""Freeze the rows a retrain covers: export ``(previous watermark, watermark]`` to S3 with a manifest.

    manifest = export_snapshot(settings, engine, request_id, watermark)
    with engine.begin() as conn:
        record_snapshot(conn, manifest)

Layout: ``s3://<datasets bucket>/datasets/<snapshot_id>/{train.jsonl, eval.jsonl, manifest.json}``;
``manifest.json`` is written last, so a folder without it is an unfinished export that
readers refuse (``trainer.snapshot_reader.read_snapshot``). Rows whose event_id hashes below
``trigger.prod_eval_fraction`` form the production evaluation slice (``eval.jsonl``) and
are never trained on; the hash makes the choice the same on every export.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Connection, Engine, insert, select

from deploy.clients import boto3_s3
from schemas.artifacts import SnapshotManifest
from schemas.data import SNAPSHOT_FILES, QAPair, snapshot_prefix
from schemas.settings import Settings
from services.store import QAEventRow, SnapshotRow, as_utc, last_snapshot_manifest, last_watermark

log = logging.getLogger(__name__)

TRAIN_FILE, EVAL_FILE = SNAPSHOT_FILES


class SnapshotWriteError(RuntimeError):
    """S3 kept failing after the bounded retries; nothing was recorded in the store."""


def snapshot_id_for(request_id: str, watermark: int) -> str:
    """Same request, same folder: a repeated export overwrites instead of leaving a second copy."""
    return f"snap-{watermark}-{hashlib.sha256(request_id.encode()).hexdigest()[:12]}"


def in_eval_slice(event_id: str, fraction: float) -> bool:
    """Stable membership of the production evaluation slice, decided by the event id alone."""
    bucket = int.from_bytes(hashlib.sha256(event_id.encode()).digest()[:8], "big")
    return bucket < fraction * 2**64


@dataclass
class _Export:
    """Running statistics while rows stream into the two local files."""

    counts: dict[str, int] = field(default_factory=lambda: {TRAIN_FILE: 0, EVAL_FILE: 0})
    offsets: dict[str, int] = field(default_factory=dict)
    first_event_id: str | None = None
    last_event_id: str | None = None
    produced_from: datetime | None = None
    produced_to: datetime | None = None

    def add(self, row: Any, name: str) -> None:
        self.counts[name] += 1
        key = f"{row.topic}:{row.partition}"
        self.offsets[key] = max(self.offsets.get(key, 0), row.offset + 1)
        self.first_event_id = self.first_event_id or row.event_id
        self.last_event_id = row.event_id
        produced = as_utc(row.produced_at)
        self.produced_from = min(self.produced_from or produced, produced)
        self.produced_to = max(self.produced_to or produced, produced)


def _pair_line(row: Any) -> bytes:
    pair = QAPair(question=row.question, answer=row.answer, source=row.source, qtype=row.qtype, focus=row.focus,
                  event_id=row.event_id)
    return pair.model_dump_json().encode() + b"\n"


def _write_rows(conn: Connection, low: int, high: int, fraction: float, files: dict[str, IO[bytes]]) -> _Export:
    stmt = (
        select(QAEventRow.row_id, QAEventRow.event_id, QAEventRow.question, QAEventRow.answer, QAEventRow.source,
               QAEventRow.qtype, QAEventRow.focus, QAEventRow.produced_at, QAEventRow.topic, QAEventRow.partition,
               QAEventRow.offset)
        .where(QAEventRow.row_id > low, QAEventRow.row_id <= high)
        .order_by(QAEventRow.row_id)
    )
    export = _Export()
    # Stream in chunks: a snapshot may hold more rows than we want in memory at once.
    for row in conn.execution_options(yield_per=2000).execute(stmt):
        name = EVAL_FILE if in_eval_slice(row.event_id, fraction) else TRAIN_FILE
        files[name].write(_pair_line(row))
        export.add(row, name)
    return export


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _put_with_retries(settings: Settings, s3, key: str, body: Path | bytes) -> None:
    """Bounded retries with exponential backoff, then SnapshotWriteError naming the object."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, attempts = settings.s3.datasets_bucket, settings.s3.retries + 1
    for attempt in range(1, attempts + 1):
        try:
            data = body.read_bytes() if isinstance(body, Path) else body
            s3.put_object(Bucket=bucket, Key=key, Body=data)
            return
        except (BotoCoreError, ClientError) as e:
            if attempt == attempts:
                raise SnapshotWriteError(f"could not write s3://{bucket}/{key} after {attempts} attempts: {e}") from e
            delay = min(0.5 * 2 ** (attempt - 1), 8.0)
            log.warning("S3 write of %s failed (%s); retry %d/%d in %.1fs", key, e, attempt, attempts - 1, delay)
            time.sleep(delay)


def _ensure_bucket(settings: Settings, s3) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket = settings.s3.datasets_bucket
    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError:
        try:
            s3.create_bucket(Bucket=bucket)
        except ClientError as e:
            if e.response["Error"]["Code"] not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                raise SnapshotWriteError(f"cannot create bucket {bucket}: {e}") from e
    except BotoCoreError as e:
        raise SnapshotWriteError(f"S3 endpoint {settings.s3.endpoint} unreachable: {e}") from e


def export_snapshot(settings: Settings, engine: Engine, request_id: str, watermark: int) -> SnapshotManifest:
    """Write the files and then the manifest to S3; records nothing in the store (see :func:`record_snapshot`)."""
    snapshot_id = snapshot_id_for(request_id, watermark)
    prefix = snapshot_prefix(snapshot_id)
    with engine.connect() as conn:
        low = last_watermark(conn)
        previous = last_snapshot_manifest(conn) or {}
        with tempfile.TemporaryDirectory(prefix="medretrain-snapshot-") as tmp:
            paths = {name: Path(tmp) / name for name in SNAPSHOT_FILES}
            with paths[TRAIN_FILE].open("wb") as train, paths[EVAL_FILE].open("wb") as evals:
                export = _write_rows(conn, low, watermark, settings.trigger.prod_eval_fraction,
                                     {TRAIN_FILE: train, EVAL_FILE: evals})
            s3 = boto3_s3(settings)
            _ensure_bucket(settings, s3)
            for name, path in paths.items():
                _put_with_retries(settings, s3, prefix + name, path)
            files = {name: _sha256(path) for name, path in paths.items()}
    # Offsets are cumulative: a partition without new rows keeps the position of the last snapshot.
    offsets = dict(previous.get("kafka_offsets", {}))
    offsets.update({k: max(v, offsets.get(k, 0)) for k, v in export.offsets.items()})
    manifest = SnapshotManifest(
        snapshot_id=snapshot_id,
        request_id=request_id,
        uri=f"s3://{settings.s3.datasets_bucket}/{prefix}",
        files=files,
        row_count=sum(export.counts.values()),
        train_rows=export.counts[TRAIN_FILE],
        eval_rows=export.counts[EVAL_FILE],
        min_row_id=low + 1,
        max_row_id=watermark,
        first_event_id=export.first_event_id,
        last_event_id=export.last_event_id,
        kafka_offsets=offsets,
        produced_from=export.produced_from,
        produced_to=export.produced_to,
    )
    _put_with_retries(settings, s3, prefix + "manifest.json", manifest.model_dump_json(indent=2).encode())
    log.info("snapshot %s: rows %d..%d, %d train, %d eval -> %s", snapshot_id, low + 1, watermark,
             manifest.train_rows, manifest.eval_rows, manifest.uri)
    return manifest


def record_snapshot(conn: Connection, manifest: SnapshotManifest) -> None:
    """Insert the snapshots row (advances the watermark the threshold counts from)."""
    conn.execute(insert(SnapshotRow).values(
        snapshot_id=manifest.snapshot_id,
        request_id=manifest.request_id,
        min_row_id=manifest.min_row_id,
        max_row_id=manifest.max_row_id,
        row_count=manifest.row_count,
        train_rows=manifest.train_rows,
        eval_rows=manifest.eval_rows,
        manifest=manifest.model_dump(mode="json"),
    ))
