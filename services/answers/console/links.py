"""Where a person opens what the console names: MLflow runs and versions, Ray jobs."""

from __future__ import annotations

from schemas.settings import Settings


def mlflow_run_url(settings: Settings, client, run_id: str) -> str:
    experiment = client.get_run(run_id).info.experiment_id
    return f"{settings.mlflow.tracking_uri}/#/experiments/{experiment}/runs/{run_id}"


def mlflow_version_url(settings: Settings, name: str, version: str) -> str:
    return f"{settings.mlflow.tracking_uri}/#/models/{name}/versions/{version}"


def ray_job_url(settings: Settings, job_id: str) -> str:
    return f"{settings.ray.address}/#/jobs/{job_id}"


def ray_dashboard_url(settings: Settings) -> str:
    return settings.ray.address
