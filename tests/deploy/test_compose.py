"""docker-compose.yaml and the KubeRay manifest agree with Settings (no Docker needed)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from sqlalchemy.engine import make_url

from schemas.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
ENV_EXAMPLE = REPO / "deploy" / "compose" / "compose.env.example"
VARIABLE = re.compile(r"\$\{(\w+)(?::[?-][^}]*)?\}")


def _env_example() -> dict[str, str]:
    lines = [line for line in ENV_EXAMPLE.read_text().splitlines() if line and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:?msg}``, ``${VAR:-default}`` and ``$$``, for the variables we use."""
    missing = sorted({m.group(1) for m in VARIABLE.finditer(text)} - set(env))
    assert not missing, f"compose uses variables the example .env lacks: {missing}"
    return VARIABLE.sub(lambda m: env[m.group(1)], text).replace("$$", "$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(_interpolate((REPO / "docker-compose.yaml").read_text(), _env_example()))["services"]


def _setting_path(variable: str) -> tuple[str, ...]:
    """``MEDRETRAIN_TRAIN__LORA__R`` -> ("train", "lora", "r"), failing if any part is not a Settings field."""
    parts = tuple(variable.removeprefix("MEDRETRAIN_").lower().split("__"))
    model: Any = Settings
    for part in parts:
        assert model is not None and part in model.model_fields, f"{variable}: no setting {'.'.join(parts)}"
        annotation = model.model_fields[part].annotation
        model = annotation if hasattr(annotation, "model_fields") else None
    assert model is None, f"{variable} names a whole section, not a field"
    return parts


def _medretrain_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    return {k: str(v) for k, v in env.items() if k.startswith("MEDRETRAIN_")}


def _settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key in [k for k in os.environ if k.startswith("MEDRETRAIN_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return load_settings()


def _flag(command: list[str], name: str) -> str:
    values = [arg.split("=", 1)[1] for arg in command if arg.startswith(f"{name}=")]
    assert len(values) == 1, f"expected one {name}=... in {command}"
    return values[0]


def _exposes(service: dict[str, Any], port: int) -> bool:
    return str(port) in {str(p) for p in service.get("expose", [])}


def test_every_medretrain_variable_is_a_setting(compose: dict[str, Any]) -> None:
    variables = {v for service in compose.values() for v in _medretrain_env(service)}
    assert len(variables) >= 10
    for variable in variables:
        _setting_path(variable)


def test_settings_point_at_compose_services(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings_from(_medretrain_env(compose["orchestrator"]), monkeypatch)
    for address in (settings.kafka.bootstrap, settings.s3.endpoint, settings.mlflow.tracking_uri, settings.ray.address):
        parts = urlsplit(address if "://" in address else f"tcp://{address}")
        assert parts.hostname in compose, f"{address}: no service {parts.hostname}"
        assert _exposes(compose[parts.hostname], parts.port), f"{parts.hostname} does not expose {parts.port}"
    for url in (settings.database.url, settings.mlflow.backend_store_uri):
        db = make_url(url)
        assert db.host == "postgres" and _exposes(compose["postgres"], db.port or 5432)
    assert make_url(settings.database.url).database == compose["postgres"]["environment"]["POSTGRES_DB"]
    assert "CREATE DATABASE mlflow" in (REPO / "deploy" / "compose" / "postgres-init.sql").read_text()


def test_mlflow_server_matches_settings(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings_from(_medretrain_env(compose["orchestrator"]), monkeypatch)
    command = compose["mlflow"]["command"]
    assert _flag(command, "--app-name") == "basic-auth"
    assert int(_flag(command, "--port")) == settings.mlflow.port == urlsplit(settings.mlflow.tracking_uri).port
    assert _flag(command, "--backend-store-uri") == settings.mlflow.backend_store_uri
    assert _flag(command, "--artifacts-destination").startswith(f"s3://{settings.s3.artifacts_bucket}/")
    assert "mlflow" in _flag(command, "--allowed-hosts").split(",")


def test_ray_and_buckets_match_settings(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings_from(_medretrain_env(compose["orchestrator"]), monkeypatch)
    head = compose["ray-head"]["command"]
    assert int(_flag(head, "--port")) == settings.ray.gcs_port
    assert int(_flag(head, "--dashboard-port")) == settings.ray.dashboard_port == urlsplit(settings.ray.address).port
    assert _flag(compose["ray-worker"]["command"], "--address") == f"ray-head:{settings.ray.gcs_port}"
    created = compose["minio-init"]["command"][0]
    for bucket in (settings.s3.artifacts_bucket, settings.s3.checkpoints_bucket, settings.s3.datasets_bucket):
        assert f"local/{bucket}" in created


def test_services_commands_health_and_dependencies(compose: dict[str, Any]) -> None:
    required = {"kafka", "minio", "postgres", "mlflow", "ray-head", "ray-worker", "accumulator", "orchestrator"}
    assert required <= set(compose)
    assert compose["accumulator"]["command"] == ["medretrain", "serve", "accumulator"]
    assert compose["orchestrator"]["command"] == ["medretrain", "serve", "orchestrator"]
    for name, service in compose.items():
        one_shot = service.get("restart") == "no"
        assert one_shot or "healthcheck" in service, f"{name} has no healthcheck"
        for dependency, rule in (service.get("depends_on") or {}).items():
            assert dependency in compose, f"{name} depends on unknown {dependency}"
            one_shot_dependency = compose[dependency].get("restart") == "no"
            expected = "service_completed_successfully" if one_shot_dependency else "service_healthy"
            assert rule["condition"] == expected, (name, dependency)
    kafka_env = compose["kafka"]["environment"]
    assert kafka_env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert kafka_env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"


def test_kuberay_manifest_uses_real_settings() -> None:
    documents = list(yaml.safe_load_all((REPO / "deploy" / "kuberay" / "raycluster.yaml").read_text()))
    config = next(d for d in documents if d["kind"] == "ConfigMap")["data"]
    cluster = next(d for d in documents if d["kind"] == "RayCluster")
    for variable in (v for v in config if v.startswith("MEDRETRAIN_")):
        _setting_path(variable)
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    address = urlsplit(config["MEDRETRAIN_RAY__ADDRESS"])
    assert address.hostname == f"{cluster['metadata']['name']}-head-svc"
    assert address.port == ports["dashboard"] == int(config["MEDRETRAIN_RAY__DASHBOARD_PORT"])
    assert ports["gcs"] == int(config["MEDRETRAIN_RAY__GCS_PORT"])


def test_unknown_variable_is_caught() -> None:
    with pytest.raises(AssertionError, match="no setting kafka.bootstrapp"):
        _setting_path("MEDRETRAIN_KAFKA__BOOTSTRAPP")
    with pytest.raises(AssertionError, match="whole section"):
        _setting_path("MEDRETRAIN_KAFKA")
