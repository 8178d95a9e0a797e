"""Database set-up of the stack: PostgreSQL databases created when missing, SQLite fallback for MLflow."""

from __future__ import annotations

import uuid

import pytest

from deploy.services.mlflow import backend_store_uri
from deploy.services.postgres import ensure_database
from schemas.settings import load_settings, with_overrides


def test_mlflow_falls_back_to_sqlite_under_the_absolute_home() -> None:
    settings = with_overrides(load_settings(), {"mlflow": {"backend_store_uri": None}, "stack": {"home": "rel/home"}})
    uri = backend_store_uri(settings)
    assert uri.startswith("sqlite:////") and uri.endswith("/rel/home/mlflow/mlflow.db")


@pytest.mark.integration
def test_postgres_database_created_once() -> None:
    import psycopg

    name = f"medretrain_t_{uuid.uuid4().hex[:12]}"
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    try:
        assert ensure_database(url) is True
        assert ensure_database(url) is False
    finally:
        with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


def test_unreachable_postgres_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="PostgreSQL unreachable for postgresql\\+psycopg://postgres@127.0.0.1:1/x"):
        ensure_database("postgresql+psycopg://postgres@127.0.0.1:1/x")
