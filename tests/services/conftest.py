"""Fixtures of the services tests: SQLite stores for unit tests, a scratch PostgreSQL store."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, make_url, text

from deploy.clients import database_url
from schemas.settings import Settings, load_settings
from services.store import create_schema, make_engine


@pytest.fixture
def sqlite_settings(tmp_path: Path) -> Settings:
    return load_settings([f"database.url=sqlite:///{tmp_path / 'store.db'}", "trigger.threshold=5",
                          "trigger.cooldown_s=3600"])


@pytest.fixture
def sqlite_engine(sqlite_settings: Settings) -> Engine:
    engine = make_engine(sqlite_settings)
    create_schema(engine)
    yield engine
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def store_engine(request, sqlite_engine):
    """The store on each database the event insert has a path for (PostgreSQL: a scratch database)."""
    if request.param == "sqlite":
        yield sqlite_engine
        return
    request.getfixturevalue("stack")  # the embedded PostgreSQL server runs with the test stack
    url = make_url(database_url(load_settings())).set(database=f"medretrain_store_{uuid.uuid4().hex[:10]}")
    engine = make_engine(load_settings([f"database.url={url.render_as_string(hide_password=False)}"]))
    create_schema(engine)
    yield engine
    engine.dispose()
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE "{url.database}" WITH (FORCE)'))
    admin.dispose()
