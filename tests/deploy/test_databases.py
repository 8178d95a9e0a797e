"""Database set-up of the stack: PostgreSQL databases created when missing, SQLite fallback for MLflow."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from deploy.embedded.mlflow import backend_store_uri
from deploy.embedded.postgres import ensure_database
from schemas.settings import load_settings, with_overrides


def test_mlflow_falls_back_to_sqlite_under_the_absolute_home() -> None:
    settings = with_overrides(load_settings(), {"mlflow": {"backend_store_uri": None}, "stack": {"home": "rel/home"}})
    uri = backend_store_uri(settings)
    assert uri.startswith("sqlite:////") and uri.endswith("/rel/home/mlflow/mlflow.db")


@pytest.fixture
def scratch_database() -> Iterator[tuple[str, str]]:
    """(name, URL) of a PostgreSQL database name nobody uses; dropped afterwards if a test created it."""
    import psycopg

    name = f"medretrain_t_{uuid.uuid4().hex[:12]}"
    yield name, f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


@pytest.mark.integration
def test_postgres_database_created_once(scratch_database) -> None:
    _, url = scratch_database
    assert ensure_database(url) is True
    assert ensure_database(url) is False


@pytest.mark.integration
def test_a_new_stack_home_refuses_an_earlier_stacks_databases(scratch_database, tmp_path) -> None:
    from deploy import stack as embedded
    from deploy.process import ServiceError

    name, url = scratch_database
    home = tmp_path / "home"
    settings = with_overrides(
        load_settings(), {"stack": {"home": str(home)}, "database": {"url": url}, "mlflow": {"backend_store_uri": None}}
    )
    ensure_database(url)  # left by a stack whose home was deleted
    with pytest.raises(
        ServiceError,
        match=rf"PostgreSQL already has the databases \['{name}'\], but the stack home .* stack down --purge",
    ):
        embedded.up(settings)
    assert not home.exists()  # refused before any service started


def test_unreachable_postgres_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="PostgreSQL unreachable for postgresql\\+psycopg://postgres@127.0.0.1:1/x"):
        ensure_database("postgresql+psycopg://postgres@127.0.0.1:1/x")
