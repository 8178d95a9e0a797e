"""A bounded cache of derived data in S3: ``s3://<checkpoints bucket>/<s3.cache_prefix>/<kind>/<key>``.

    cache = BlobCache.open(settings, "items")   # None when s3.cache_max_mb is 0
    body = cache.get(key)                       # None on a miss, or for a damaged entry (deleted then)
    cache.put(key, body)                        # then the oldest entries go until the whole cache fits

A key hashes everything its entry depends on (:func:`cache_key`), so a changed input is a miss, never
a stale hit; every entry carries its body's SHA-256, checked on each read. A cache only saves time:
when S3 fails, a read is a miss and a write is skipped, with a warning. ``stack down --purge``
removes it (:func:`purge`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

from schemas.settings import Settings

log = logging.getLogger(__name__)

SHA_META = "sha256"


def cache_key(**parts: Any) -> str:
    """A hex digest naming one entry: every part it depends on, JSON-encoded with sorted keys."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:40]


def _root(settings: Settings) -> str:
    return settings.s3.cache_prefix.strip("/") + "/"


@dataclass
class BlobCache:
    client: Any  # boto3 S3 client
    bucket: str
    root: str
    kind: str
    max_bytes: int

    @classmethod
    def open(cls, settings: Settings, kind: str) -> BlobCache | None:
        if settings.s3.cache_max_mb == 0:
            return None
        from deploy.clients import boto3_s3

        bucket, max_bytes = settings.s3.checkpoints_bucket, settings.s3.cache_max_mb * 2**20
        return cls(boto3_s3(settings), bucket, _root(settings), kind, max_bytes)

    def _name(self, key: str) -> str:
        return f"{self.root}{self.kind}/{key}"

    def get(self, key: str) -> bytes | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self._name(key))
            body = obj["Body"].read()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("NoSuchKey", "404"):
                log.warning("cache %s/%s unreadable (%s): rebuilding", self.kind, key, e)
            return None
        except BotoCoreError as e:
            log.warning("cache %s/%s unreadable (%s): rebuilding", self.kind, key, e)
            return None
        if obj.get("Metadata", {}).get(SHA_META) != hashlib.sha256(body).hexdigest():
            log.warning("cache %s/%s is damaged (checksum mismatch): deleted, rebuilding", self.kind, key)
            self.client.delete_object(Bucket=self.bucket, Key=self._name(key))
            return None
        return body

    def put(self, key: str, body: bytes) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._name(key), Body=body,
                                   Metadata={SHA_META: hashlib.sha256(body).hexdigest()})
            self.evict()
        except (BotoCoreError, ClientError) as e:
            log.warning("cache %s/%s not stored (%s)", self.kind, key, e)

    def evict(self) -> list[str]:
        """Delete the oldest entries (of every kind) until the cache fits ``max_bytes``; returns their names."""
        entries = sorted(_list(self.client, self.bucket, self.root), key=lambda o: o["LastModified"])
        total, dropped = sum(o["Size"] for o in entries), []
        for entry in entries:
            if total <= self.max_bytes:
                break
            self.client.delete_object(Bucket=self.bucket, Key=entry["Key"])
            total -= entry["Size"]
            dropped.append(entry["Key"])
        if dropped:
            log.info("cache over %d MiB: dropped the %d oldest entries", self.max_bytes // 2**20, len(dropped))
        return dropped


def _list(client, bucket: str, prefix: str) -> list[dict[str, Any]]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [obj for page in pages for obj in page.get("Contents", [])]


def purge(settings: Settings) -> int:
    """Delete every cache entry (also on an external S3, where the stack home holds none); returns how many."""
    from deploy.clients import boto3_s3

    client = boto3_s3(settings)
    entries = _list(client, settings.s3.checkpoints_bucket, _root(settings))
    for entry in entries:
        client.delete_object(Bucket=settings.s3.checkpoints_bucket, Key=entry["Key"])
    return len(entries)
