"""The pipeline page: ``medretrain status`` (lag, rows to the next trigger, cooldown, jobs), the answer service's
own status, and the last drift check with its plot."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from deploy.registry import KIND_TAG, REQUEST_TAG
from schemas.settings import Settings
from services.answers.console.links import (
    mlflow_run_url,
    mlflow_version_url,
    ray_dashboard_url,
    ray_job_url,
)
from services.loop.status import SystemStatus, collect

DRIFT_PLOT = "drift_report.png"


@dataclass
class DriftCheck:
    run_id: str
    url: str
    started: datetime
    champion: str
    request: str
    p_values: dict[str, float]
    plot: str | None


@dataclass
class Pipeline:
    status: SystemStatus
    serving: dict[str, Any]
    drift: DriftCheck | None
    links: dict[str, str]
    """Ray job and model version links of the jobs and retrains shown."""

    @property
    def rows_to_trigger(self) -> int:
        return max(0, self.status.threshold - self.status.rows_since_snapshot)


def latest_drift(settings: Settings) -> DriftCheck | None:
    """The newest drift report run of the experiment, or None before the first one."""
    from deploy.registry import mlflow_client
    from services.trigger.drift_monitor import CHAMPION_TAG, DRIFT_KIND

    client = mlflow_client(settings)
    experiment = client.get_experiment_by_name(settings.mlflow.experiment)
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{KIND_TAG}` = '{DRIFT_KIND}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None
    run = runs[0]
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id)}
    return DriftCheck(run_id=run.info.run_id, url=mlflow_run_url(settings, client, run.info.run_id),
                      started=datetime.fromtimestamp(run.info.start_time / 1000, UTC),
                      champion=run.data.tags.get(CHAMPION_TAG, ""),
                      request=run.data.tags.get(REQUEST_TAG, ""),
                      p_values={k.removesuffix("_p_value"): v for k, v in sorted(run.data.metrics.items())
                                if k.endswith("_p_value")},
                      plot=DRIFT_PLOT if DRIFT_PLOT in artifacts else None)


def load_pipeline(settings: Settings, serving: dict[str, Any]) -> Pipeline:
    """Every part that answers; a part whose service is down is a line in ``status.problems``."""
    status = collect(settings)
    try:
        drift = latest_drift(settings)
    except Exception as e:  # noqa: BLE001 - the page renders whatever is down, like `medretrain status`
        status.problems.append(f"drift report: {type(e).__name__}: {e}")
        drift = None
    links = {"ray": ray_dashboard_url(settings)}
    for row in status.recent:
        if row.get("ray_job"):
            links[row["ray_job"]] = ray_job_url(settings, row["ray_job"])
        if row.get("version"):
            links[f"v{row['version']}"] = mlflow_version_url(settings, settings.mlflow.registered_model,
                                                             row["version"])
    return Pipeline(status=status, serving=serving, drift=drift, links=links)
