"""Databases on the configured PostgreSQL server (not started by us): created when missing."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql
from sqlalchemy.engine import URL, make_url

from schemas.settings import Settings

log = logging.getLogger(__name__)


def _is_postgres(url: str | None) -> bool:
    return bool(url) and url.startswith("postgresql")


def _target(url: str):
    """(URL, connection arguments of its server's maintenance database)."""
    target = make_url(url)
    if not target.database:
        raise ValueError(f"no database name in {target.render_as_string(hide_password=True)}")
    conninfo = {"host": target.host, "port": target.port, "user": target.username, "password": target.password}
    return target, {k: v for k, v in conninfo.items() if v is not None}


@contextmanager
def _maintenance(url: str) -> Iterator[tuple[URL, psycopg.Connection]]:
    """(the URL, an autocommit connection to the server's maintenance database): CREATE/DROP DATABASE refuse a
    transaction."""
    target, conninfo = _target(url)
    try:
        with psycopg.connect(dbname="postgres", autocommit=True, connect_timeout=5, **conninfo) as conn:
            yield target, conn
    except psycopg.OperationalError as e:
        where = target.render_as_string(hide_password=True)
        raise RuntimeError(f"PostgreSQL unreachable for {where}: is the server running? ({e})") from e


def _exists(conn: psycopg.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


def ensure_database(url: str) -> bool:
    """``CREATE DATABASE`` for the database a SQLAlchemy PostgreSQL URL names, if missing; True if created."""
    with _maintenance(url) as (target, conn):
        if _exists(conn, target.database):
            return False
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(target.database)))
        except psycopg.errors.DuplicateDatabase:
            return False  # created concurrently by another process
    log.info("created database %s", target.database)
    return True


def _stack_urls(settings: Settings) -> list[str]:
    """The MLflow backend and the medretrain store, where they live on PostgreSQL."""
    return [url for url in (settings.mlflow.backend_store_uri, settings.database.url) if _is_postgres(url)]


def ensure_databases(settings: Settings) -> list[str]:
    """The stack's PostgreSQL databases, created when missing; returns the created names."""
    return [url.rsplit("/", 1)[-1] for url in _stack_urls(settings) if ensure_database(url)]


def existing_databases(settings: Settings) -> list[str]:
    """Names of the stack's PostgreSQL databases that exist already."""
    existing = []
    for url in _stack_urls(settings):
        with _maintenance(url) as (target, conn):
            if _exists(conn, target.database):
                existing.append(target.database)
    return existing


def drop_databases(settings: Settings) -> list[str]:
    """``DROP DATABASE`` (closing its sessions) for the stack's PostgreSQL databases; returns the dropped names."""
    dropped = []
    for url in _stack_urls(settings):
        with _maintenance(url) as (target, conn):
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(target.database)))
        dropped.append(target.database)
    return dropped
