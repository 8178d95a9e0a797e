"""MLflow tracking and registry server; metadata on PostgreSQL (SQLite fallback), artifacts on the stack's S3.

The server proxies artifacts (``--artifacts-destination``), so only it holds S3 credentials.
"""

from __future__ import annotations

from deploy.clients import s3_credentials
from deploy.embedded import Service, http_ok, venv_bin
from deploy.embedded.postgres import ensure_databases
from deploy.process import Launch
from schemas.settings import Settings


def backend_store_uri(settings: Settings) -> str:
    uri = settings.mlflow.backend_store_uri
    return uri if uri else f"sqlite:///{settings.stack.home / 'mlflow' / 'mlflow.db'}"


def launch(settings: Settings) -> Launch:
    ensure_databases(settings)
    creds = s3_credentials(settings)
    argv = [
        venv_bin("mlflow"), "server", "--backend-store-uri", backend_store_uri(settings),
        "--artifacts-destination", f"s3://{settings.s3.artifacts_bucket}/mlflow",
        "--host", settings.stack.host, "--port", str(settings.mlflow.port), "--workers", "1",
    ]  # fmt: skip
    env = {
        "MLFLOW_S3_ENDPOINT_URL": settings.s3.endpoint,
        "AWS_ACCESS_KEY_ID": creds.access_key,
        "AWS_SECRET_ACCESS_KEY": creds.secret_key,
        "AWS_DEFAULT_REGION": settings.s3.region,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    return Launch(argv=argv, cwd=settings.stack.home / "mlflow", env=env)


def url(settings: Settings) -> str:
    return settings.mlflow.tracking_uri


def healthy(settings: Settings) -> bool:
    return http_ok(settings.mlflow.tracking_uri.rstrip("/") + "/health")


def ensure(settings: Settings) -> None:
    # Also the medretrain store's database, so a stack that was up before that setting changed still gets it.
    ensure_databases(settings)


# Schema migrations on a fresh database take a while on two cores.
SERVICE = Service(name="mlflow", url=url, launch=launch, healthy=healthy, ensure=ensure, timeout_factor=2.0)
