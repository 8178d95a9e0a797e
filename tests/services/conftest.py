"""Fixtures of the stream tests: SQLite stores for unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Engine

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
