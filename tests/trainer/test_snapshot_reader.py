"""Snapshots on the real S3: manifest first, checksums verified, incomplete folders refused."""

import hashlib
import uuid

import pytest

from deploy.clients import boto3_s3
from schemas.artifacts import SnapshotManifest
from schemas.data import QAPair, snapshot_prefix
from trainer.snapshot_reader import SnapshotError, read_snapshot

pytestmark = pytest.mark.integration

TRAIN = [QAPair(question=f"q{i}?", answer=f"a{i}.", source="prod", event_id=str(uuid.uuid4())) for i in range(3)]
EVAL = [QAPair(question="qe?", answer="ae.", source="prod")]


def jsonl(rows: list[QAPair]) -> bytes:
    return "".join(row.model_dump_json() + "\n" for row in rows).encode()


def upload_snapshot(
    settings, files: dict[str, bytes], manifest_files: dict[str, str] | None = None, with_manifest=True
) -> str:
    snapshot_id = f"snap-test-{uuid.uuid4().hex[:12]}"
    s3, bucket, prefix = boto3_s3(settings), settings.s3.datasets_bucket, snapshot_prefix(snapshot_id)
    for name, data in files.items():
        s3.put_object(Bucket=bucket, Key=prefix + name, Body=data)
    if with_manifest:
        manifest = SnapshotManifest(
            snapshot_id=snapshot_id, request_id="rr-test", uri=f"s3://{bucket}/{prefix}",
            files=manifest_files or {name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
            row_count=len(TRAIN) + len(EVAL), train_rows=len(TRAIN), eval_rows=len(EVAL), min_row_id=1, max_row_id=4,
            first_event_id=None, last_event_id=None, kafka_offsets={"qa.events:0": 4}, produced_from=None,
            produced_to=None,
        )  # fmt: skip
        s3.put_object(Bucket=bucket, Key=prefix + "manifest.json", Body=manifest.model_dump_json().encode())
    return snapshot_id


def test_reads_rows_and_manifest(stack):
    snapshot_id = upload_snapshot(stack, {"train.jsonl": jsonl(TRAIN), "eval.jsonl": jsonl(EVAL)})
    manifest, train, eval_rows = read_snapshot(stack, snapshot_id)
    assert manifest.kafka_offsets == {"qa.events:0": 4}
    assert train == TRAIN and eval_rows == EVAL


def test_folder_without_manifest_is_refused(stack):
    snapshot_id = upload_snapshot(stack, {"train.jsonl": jsonl(TRAIN), "eval.jsonl": jsonl(EVAL)}, with_manifest=False)
    with pytest.raises(SnapshotError, match="no manifest.json"):
        read_snapshot(stack, snapshot_id)


def test_checksum_mismatch_is_refused(stack):
    files = {"train.jsonl": jsonl(TRAIN), "eval.jsonl": jsonl(EVAL)}
    wrong = {
        "train.jsonl": hashlib.sha256(b"other").hexdigest(),
        "eval.jsonl": hashlib.sha256(files["eval.jsonl"]).hexdigest(),
    }
    snapshot_id = upload_snapshot(stack, files, manifest_files=wrong)
    with pytest.raises(SnapshotError, match="train.jsonl .* sha256"):
        read_snapshot(stack, snapshot_id)


def test_bad_row_names_its_line(stack):
    bad = jsonl(TRAIN[:1]) + b'{"question": "no answer"}\n'
    snapshot_id = upload_snapshot(stack, {"train.jsonl": bad, "eval.jsonl": jsonl(EVAL)})
    with pytest.raises(SnapshotError, match="train.jsonl line 2"):
        read_snapshot(stack, snapshot_id)
