"""Reachability of every endpoint the settings name, whoever runs them (embedded stack, compose, cloud).

    medretrain stack check       # exits 1 if one is unreachable; the compose orchestrator's healthcheck
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from deploy.embedded import kafka, mlflow, ray
from schemas.settings import Settings


@dataclass(frozen=True)
class Probe:
    name: str
    url: str
    ok: bool
    detail: str = ""


def _s3(settings: Settings) -> bool:
    from deploy.clients import boto3_s3

    boto3_s3(settings).head_bucket(Bucket=settings.s3.artifacts_bucket)
    return True


def _database(settings: Settings) -> bool:
    import sqlalchemy

    engine = sqlalchemy.create_engine(settings.database.url)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
        return True
    finally:
        engine.dispose()


def _redacted_db_url(settings: Settings) -> str:
    from sqlalchemy.engine import make_url

    return make_url(settings.database.url).render_as_string(hide_password=True)


def probes(settings: Settings) -> list[tuple[str, str, Callable[[Settings], bool]]]:
    return [
        ("kafka", settings.kafka.bootstrap, kafka.healthy),
        ("s3", f"{settings.s3.endpoint}/{settings.s3.artifacts_bucket}", _s3),
        ("mlflow", settings.mlflow.tracking_uri, mlflow.healthy),
        ("ray", settings.ray.address, ray.healthy),
        ("database", _redacted_db_url(settings), _database),
    ]


def check(settings: Settings) -> list[Probe]:
    """Probe each endpoint once; a failure's message goes into ``detail``."""
    results = []
    for name, url, probe in probes(settings):
        try:
            results.append(Probe(name, url, probe(settings)))
        except Exception as e:  # any failure means unreachable; the message says why
            results.append(Probe(name, url, False, f"{type(e).__name__}: {e}"[:200]))
    return results
