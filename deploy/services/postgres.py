"""Databases on the configured PostgreSQL server (not started by us): created when missing."""

from __future__ import annotations

import logging

from schemas.settings import Settings

log = logging.getLogger(__name__)


def _is_postgres(url: str | None) -> bool:
    return bool(url) and url.startswith("postgresql")


def _target(url: str):
    """(URL, connection arguments of its server's maintenance database)."""
    from sqlalchemy.engine import make_url

    target = make_url(url)
    if not target.database:
        raise ValueError(f"no database name in {target.render_as_string(hide_password=True)}")
    conninfo = {"host": target.host, "port": target.port, "user": target.username, "password": target.password}
    return target, {k: v for k, v in conninfo.items() if v is not None}


def ensure_database(url: str) -> bool:
    """``CREATE DATABASE`` for the database a SQLAlchemy PostgreSQL URL names, if missing; True if created."""
    import psycopg
    from psycopg import sql

    target, conninfo = _target(url)
    try:
        # CREATE DATABASE cannot run inside a transaction, hence autocommit on the maintenance database.
        with psycopg.connect(dbname="postgres", autocommit=True, connect_timeout=5, **conninfo) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (target.database,)).fetchone():
                return False
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(target.database)))
    except psycopg.errors.DuplicateDatabase:
        return False  # created concurrently by another process
    except psycopg.OperationalError as e:
        where = target.render_as_string(hide_password=True)
        raise RuntimeError(f"PostgreSQL unreachable for {where}: is the server running? ({e})") from e
    log.info("created database %s", target.database)
    return True


def ensure_databases(settings: Settings) -> list[str]:
    """The MLflow backend and the medretrain store, when they live on PostgreSQL; returns the created names."""
    urls = (settings.mlflow.backend_store_uri, settings.database.url)
    return [url.rsplit("/", 1)[-1] for url in urls if _is_postgres(url) and ensure_database(url)]


def drop_databases(settings: Settings) -> list[str]:
    """``DROP DATABASE`` (closing its sessions) for the MLflow backend and the store; returns the dropped names."""
    import psycopg
    from psycopg import sql

    dropped = []
    for url in (settings.mlflow.backend_store_uri, settings.database.url):
        if not _is_postgres(url):
            continue
        target, conninfo = _target(url)
        with psycopg.connect(dbname="postgres", autocommit=True, connect_timeout=5, **conninfo) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(target.database)))
        dropped.append(target.database)
    return dropped
