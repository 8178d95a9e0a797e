"""MLflow tracking runs: one run per request, found again by its tags, params and JSON artifacts.

The driver opens (or, on a resubmitted request, reopens) the run and records params and lineage
tags; inside the Ray workers the callbacks of :mod:`trainer.callbacks` log per-step metrics and the
adapter from global rank 0. The orchestrator finds the run by ``REQUEST_TAG``; nothing here moves
registry aliases. A light module (mlflow inside the functions, no torch): services import it.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from deploy.registry import KIND_TAG, mlflow_client
from schemas.settings import Settings

log = logging.getLogger(__name__)

def experiment_id(settings: Settings) -> str:
    """The configured experiment, created on first use (another process may win the race)."""
    from mlflow.exceptions import MlflowException

    client, name = mlflow_client(settings), settings.mlflow.experiment
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        return client.get_experiment_by_name(name).experiment_id


def find_run(settings: Settings, tag: str, value: str, kind: str) -> str | None:
    """Id of the newest run with ``tag == value`` and ``medretrain.kind == kind``, or None."""
    runs = mlflow_client(settings).search_runs(
        [experiment_id(settings)],
        filter_string=f"tags.`{tag}` = '{value}' and tags.`{KIND_TAG}` = '{kind}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def open_run(settings: Settings, tags: dict[str, str], run_name: str, parent_run_id: str | None = None) -> str:
    """A new run with ``tags`` (child of ``parent_run_id`` when given); returns its id."""
    all_tags = dict(tags)
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = mlflow_client(settings).create_run(experiment_id(settings), tags=all_tags, run_name=run_name)
    return run.info.run_id


def start_or_resume(settings: Settings, run_id: str | None, tags: dict[str, str], run_name: str) -> str:
    """Reopen ``run_id`` (a resubmitted request) or open a new run; tags are (re)applied either way."""
    client = mlflow_client(settings)
    if run_id is None:
        return open_run(settings, tags, run_name)
    client.update_run(run_id, status="RUNNING")
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    log.info("resuming MLflow run %s", run_id)
    return run_id


@contextmanager
def finishing(settings: Settings, run_id: str) -> Iterator[None]:
    """Mark the run FINISHED when the block succeeds, FAILED when it raises (the error propagates)."""
    try:
        yield
    except BaseException:
        mlflow_client(settings).set_terminated(run_id, status="FAILED")
        raise
    mlflow_client(settings).set_terminated(run_id, status="FINISHED")


def run_param(settings: Settings, run_id: str, key: str) -> str | None:
    return mlflow_client(settings).get_run(run_id).data.params.get(key)


def latest_metrics(settings: Settings, run_id: str) -> dict[str, float]:
    """The last logged value of every metric of the run."""
    return dict(mlflow_client(settings).get_run(run_id).data.metrics)


def log_params(settings: Settings, run_id: str, params: dict[str, Any]) -> None:
    """Params are write-once in MLflow: a resumed run re-logs the same values, a changed one is only warned about."""
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client(settings).log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
    except MlflowException as e:
        log.warning("run %s keeps its first params (%s)", run_id, e)


def log_text(settings: Settings, run_id: str, name: str, text: str) -> None:
    """A text artifact (e.g. a contract's JSON) at the run's root, written as given."""
    mlflow_client(settings).log_text(run_id, text, name)


def log_json(settings: Settings, run_id: str, name: str, payload: Any, artifact_path: str | None = None) -> None:
    """A JSON artifact (e.g. ``train_config.json``) at the run's root or under ``artifact_path``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
        mlflow_client(settings).log_artifact(run_id, str(path), artifact_path=artifact_path)


TIMELINE_METRIC = "timeline.{point}"
"""Zero-valued metrics whose timestamps mark points inside the Ray job (services/loop/timeline.py reads them)."""


def mark(settings: Settings, run_id: str, point: str, at: float | None = None) -> None:
    """Record that ``point`` (``model_loaded``, ``data_ready``, ``upload_started``, ``uploaded``) was reached."""
    from mlflow.entities import Metric

    stamp = int((time.time() if at is None else at) * 1000)
    mlflow_client(settings).log_batch(run_id, metrics=[Metric(TIMELINE_METRIC.format(point=point), 0.0, stamp, 0)])
