"""Shared test set-up: a TEST embedded stack on its own ports and state directory.

The environment defaults below are set before any project import, so every
``load_settings()`` in tests (and in subprocesses they start) points at the test stack,
never at a developer's stack. Override any of them in the environment.

    .venv/bin/pytest tests/deploy -q                       # starts the test stack if needed
    MEDRETRAIN_TEST_KEEP_STACK=1 .venv/bin/pytest ...      # leave it running afterwards
    .venv/bin/python -c "import tests.conftest, deploy.stack as s, schemas.settings as c; s.down(c.load_settings())"
                                                           # stop the test stack (status: s.status(...))
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TEST_ENV = {
    # A sibling of the dev home, never inside it: `stack down --purge` of the dev stack must not touch it.
    "MEDRETRAIN_STACK__HOME": str(REPO / ".medretrain-test"),
    "MEDRETRAIN_STACK__S3_MASTER_PORT": "27933",
    "MEDRETRAIN_STACK__S3_VOLUME_PORT": "27080",
    "MEDRETRAIN_STACK__S3_FILER_PORT": "27888",
    "MEDRETRAIN_STACK__S3_ADMIN_PORT": "27646",
    "MEDRETRAIN_S3__ENDPOINT": "http://127.0.0.1:27333",
    "MEDRETRAIN_KAFKA__BOOTSTRAP": "127.0.0.1:29092",
    "MEDRETRAIN_MLFLOW__PORT": "25000",
    "MEDRETRAIN_MLFLOW__TRACKING_URI": "http://127.0.0.1:25000",
    "MEDRETRAIN_STACK__POSTGRES_PORT": "25432",
    "MEDRETRAIN_RAY__GCS_PORT": "26379",
    "MEDRETRAIN_RAY__DASHBOARD_PORT": "28265",
    "MEDRETRAIN_RAY__ADDRESS": "http://127.0.0.1:28265",
    "MEDRETRAIN_RAY__CLIENT_SERVER_PORT": "20001",
    "MEDRETRAIN_RAY__DASHBOARD_AGENT_PORT": "22365",
    "MEDRETRAIN_RAY__MIN_WORKER_PORT": "45000",
    "MEDRETRAIN_RAY__MAX_WORKER_PORT": "49999",
    "MEDRETRAIN_RAY__NODE_PORT_BASE": "60000",
    "MEDRETRAIN_STREAM__METRICS_PORT": "0",
    "MEDRETRAIN_SERVE__PORT": "28100",
    "HF_HUB_OFFLINE": "1",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "TOKENIZERS_PARALLELISM": "false",
}
for _key, _value in TEST_ENV.items():
    os.environ.setdefault(_key, _value)

import pytest  # noqa: E402

from schemas.settings import Settings, load_settings  # noqa: E402


def _other_live_sessions(users: Path) -> list[Path]:
    import psutil

    return [lease for lease in users.iterdir() if lease.name != str(os.getpid()) and psutil.pid_exists(int(lease.name))]


def _disconnect_ray() -> None:
    """Leave the cluster before it may be stopped: a driver whose GCS disappears aborts the process after 60 s."""
    import sys

    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


@pytest.fixture(scope="session")
def stack() -> Settings:
    """Settings of a running test stack: reuses a healthy one, else starts it.

    Parallel sessions share the stack: each holds a lease file ``run/users/<pid>``. At the end,
    the services this session started are stopped only if no other live session holds a lease,
    and never with MEDRETRAIN_TEST_KEEP_STACK=1.
    """
    from deploy import stack as embedded
    from deploy.clients import use_ray
    from deploy.embedded import s3
    from deploy.embedded.postgres import drop_databases

    settings = load_settings()
    if not s3.server_dir(settings).exists():
        # A new stack home means empty S3: registry rows or snapshots left in the test databases by an
        # earlier stack would point at objects that no longer exist (a fresh CI clone on a used machine).
        # Databases a running stack still uses are refused, never dropped (drop_databases).
        drop_databases(settings)
    users = settings.stack.home / "run" / "users"
    users.mkdir(parents=True, exist_ok=True)
    lease = users / str(os.getpid())
    lease.touch()
    started = embedded.up(settings)
    use_ray(settings)  # every Ray client in this session (and its subprocesses) uses the stack's token
    yield settings
    _disconnect_ray()
    lease.unlink(missing_ok=True)
    if started and os.environ.get("MEDRETRAIN_TEST_KEEP_STACK") != "1" and not _other_live_sessions(users):
        embedded.down(settings, only=started)
