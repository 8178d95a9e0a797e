"""Names and clients of the MLflow tracking server and model registry, shared by every stage.

    client, name = open_registry(settings)
    champion = alias_version(client, name, CHAMPION)        # "3", or None before a bootstrap

A light module (mlflow is imported inside the functions, torch never): ``medretrain status``,
the answer service and the CLI read aliases and tags without loading the training stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from deploy.clients import use_mlflow
from schemas.settings import Settings

if TYPE_CHECKING:
    from mlflow import MlflowClient

CHAMPION, CHALLENGER = "champion", "challenger"
"""Registry aliases: the version production serves, and a version that passed the gate and awaits review."""

KIND_BASE, KIND_ADAPTER = "base", "adapter"
"""``kind`` tag of a model version: base weights, or a LoRA adapter on a base version."""

REQUEST_TAG = "medretrain.request_id"
"""Run tag: the retrain request a training run belongs to."""
BASE_VERSION_TAG = "medretrain.base_version"
"""Run tag: the base version a training run's adapter sits on."""
KIND_TAG = "medretrain.kind"
"""Run tag: ``retrain``, ``tune`` / ``tune-trial``, ``drift``, ``bench`` (kept apart in searches)."""
RUN_VERSION_TAG = "medretrain.model_version"
"""Run tag: the model version registered for a judged candidate run."""


def mlflow_client(settings: Settings) -> MlflowClient:
    """An MlflowClient on the configured tracking server and registry (the one way to build one)."""
    from mlflow import MlflowClient

    use_mlflow(settings)
    return MlflowClient(tracking_uri=settings.mlflow.tracking_uri, registry_uri=settings.mlflow.tracking_uri)


def open_registry(settings: Settings) -> tuple[MlflowClient, str]:
    """(client, registered model name) of the configured registry."""
    return mlflow_client(settings), settings.mlflow.registered_model


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    """The version an alias points at, or None."""
    return client.get_registered_model(name).aliases.get(alias)
