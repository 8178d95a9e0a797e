"""Database set-up of the stack: the embedded PostgreSQL by default, an external server by URL (this machine's
PostgreSQL on 127.0.0.1:5432, so both paths run in CI), databases created when missing."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from deploy import stack as embedded
from deploy.clients import database_url, mlflow_backend_uri
from deploy.embedded.postgres import ensure_database
from schemas.settings import load_settings, with_overrides

EXTERNAL = "postgresql+psycopg://postgres@127.0.0.1:5432"
"""This machine's PostgreSQL server (trust auth)."""


def test_unset_database_urls_mean_the_embedded_server() -> None:
    settings = with_overrides(load_settings(), {"database": {"url": None}, "mlflow": {"backend_store_uri": None}})
    port = settings.stack.postgres_port
    assert database_url(settings) == f"postgresql+psycopg://postgres@127.0.0.1:{port}/medretrain"
    assert mlflow_backend_uri(settings) == f"postgresql+psycopg://postgres@127.0.0.1:{port}/mlflow"
    assert embedded.services(settings)[0].name == "postgres"


def test_external_urls_leave_the_embedded_server_out() -> None:
    urls = {"database": {"url": f"{EXTERNAL}/a"}, "mlflow": {"backend_store_uri": f"{EXTERNAL}/b"}}
    settings = with_overrides(load_settings(), urls)
    assert (database_url(settings), mlflow_backend_uri(settings)) == (f"{EXTERNAL}/a", f"{EXTERNAL}/b")
    assert "postgres" not in [s.name for s in embedded.services(settings)]


@pytest.fixture
def scratch_database() -> Iterator[tuple[str, str]]:
    """(name, URL) of a PostgreSQL database name nobody uses; dropped afterwards if a test created it."""
    import psycopg

    try:
        psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", connect_timeout=3).close()
    except psycopg.OperationalError:
        pytest.skip("no PostgreSQL server on 127.0.0.1:5432 for the external-server path")
    name = f"medretrain_t_{uuid.uuid4().hex[:12]}"
    yield name, f"{EXTERNAL}/{name}"
    with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


@pytest.mark.integration
def test_postgres_database_created_once(scratch_database) -> None:
    _, url = scratch_database
    assert ensure_database(url) is True
    assert ensure_database(url) is False


@pytest.mark.integration
def test_the_store_works_on_an_external_server(scratch_database) -> None:
    from sqlalchemy import insert, select

    from schemas.events import RetrainRequest
    from services.store import (
        RetrainRequestRow,
        create_schema,
        load_request,
        make_engine,
    )

    _, url = scratch_database
    settings = with_overrides(load_settings(), {"database": {"url": url}})
    engine = make_engine(settings)  # creates the database on the external server
    try:
        create_schema(engine)
        request = RetrainRequest(request_id="rr-external", reason="manual", watermark=0)
        with engine.begin() as conn:
            conn.execute(
                insert(RetrainRequestRow).values(
                    request_id=request.request_id,
                    reason="manual",
                    watermark=0,
                    request_json=request.model_dump(mode="json"),
                    state="requested",
                )
            )
            assert conn.execute(select(RetrainRequestRow.state)).scalar_one() == "requested"
        assert load_request(settings, "rr-external") == request
    finally:
        engine.dispose()


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


@pytest.mark.integration
def test_databases_in_use_are_never_dropped(scratch_database) -> None:
    """A live stack's session on its database makes `drop_databases` (purge, the test stack's reset) refuse."""
    import psycopg

    from deploy.embedded.postgres import drop_databases

    name, url = scratch_database
    settings = with_overrides(load_settings(), {"database": {"url": url}, "mlflow": {"backend_store_uri": None}})
    ensure_database(url)
    refused = rf"not dropping databases in use by a running stack: {name} \(1 sessions\)"
    with psycopg.connect(f"host=127.0.0.1 user=postgres dbname={name}"):  # the live stack's session
        with pytest.raises(RuntimeError, match=refused):
            drop_databases(settings)
    assert ensure_database(url) is False  # still there
    assert drop_databases(settings) == [name]  # the session closed: dropped
    assert ensure_database(url) is True


def test_unreachable_postgres_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="PostgreSQL unreachable for postgresql\\+psycopg://postgres@127.0.0.1:1/x"):
        ensure_database("postgresql+psycopg://postgres@127.0.0.1:1/x")
