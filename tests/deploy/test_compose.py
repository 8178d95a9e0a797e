"""docker-compose.yaml conforms to the Compose Specification and agrees with Settings (no Docker needed)."""

from __future__ import annotations

import copy
import re
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from sqlalchemy.engine import make_url

from tests.deploy.manifests import (
    REPO,
    SECRET_NAME,
    URL_PASSWORD,
    load_schema,
    schema_errors,
    setting_path,
    settings_from,
)

COMPOSE = REPO / "docker-compose.yaml"
ENV_EXAMPLE = REPO / "deploy" / "compose" / "compose.env.example"
VARIABLE = re.compile(r"\$\{(\w+)(?::[?-][^}]*)?\}")
ONLY_A_VARIABLE = re.compile(r"\$\{\w+:\?[^}]*\}")
LONG_RUNNING_RESTART = "unless-stopped"


def _env_example() -> dict[str, str]:
    lines = [line for line in ENV_EXAMPLE.read_text().splitlines() if line and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:?msg}``, ``${VAR:-default}`` and ``$$``, for the variables we use."""
    missing = sorted({m.group(1) for m in VARIABLE.finditer(text)} - set(env))
    assert not missing, f"compose uses variables the example .env lacks: {missing}"
    return VARIABLE.sub(lambda m: env[m.group(1)], text).replace("$$", "$")


@pytest.fixture(scope="module")
def project() -> dict[str, Any]:
    return yaml.safe_load(_interpolate(COMPOSE.read_text(), _env_example()))


@pytest.fixture(scope="module")
def compose(project: dict[str, Any]) -> dict[str, Any]:
    return project["services"]


def _medretrain_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    return {k: str(v) for k, v in env.items() if k.startswith("MEDRETRAIN_")}


def _flag(command: list[str], name: str) -> str:
    values = [arg.split("=", 1)[1] for arg in command if arg.startswith(f"{name}=")]
    assert len(values) == 1, f"expected one {name}=... in {command}"
    return values[0]


def _exposes(service: dict[str, Any], port: int) -> bool:
    return str(port) in {str(p) for p in service.get("expose", [])}


def _published(service: dict[str, Any]) -> dict[int, str]:
    """Container port -> host address of each ``host:port:port`` mapping."""
    mappings = (str(p).split(":") for p in service.get("ports", []))
    return {int(container): host for host, _, container in mappings}


def _probe_url(service: dict[str, Any]) -> str:
    urls = re.findall(r"https?://[^'\"\s]+", " ".join(service["healthcheck"]["test"]))
    assert len(urls) == 1, f"expected one probed URL in {service['healthcheck']['test']}"
    return urls[0]


def _ray_start(command: list[str]) -> list[str] | None:
    """The `ray start` arguments of a service's command (also inside ``sh -c "ray start ... && ..."``)."""
    line = command[-1] if command[:2] == ["sh", "-c"] else " ".join(command)
    starts = [part.split() for part in line.split("&&") if part.split()[:2] == ["ray", "start"]]
    return starts[0] if starts else None


def _ray_workers(compose: dict[str, Any]) -> dict[str, list[str]]:
    """Every service that starts a non-head Ray node, with its `ray start` arguments."""
    starts = {name: _ray_start(service.get("command") or []) for name, service in compose.items()}
    return {name: words for name, words in starts.items() if words and "--head" not in words}


def test_file_conforms_to_the_compose_specification(project: dict[str, Any]) -> None:
    assert schema_errors(project, load_schema("compose-spec.json")) == []


def test_schema_check_catches_a_misspelt_key(project: dict[str, Any]) -> None:
    broken = copy.deepcopy(project)
    broken["services"]["kafka"]["restart_policy"] = "always"
    assert any("restart_policy" in e for e in schema_errors(broken, load_schema("compose-spec.json")))


def test_every_medretrain_variable_is_a_setting(compose: dict[str, Any]) -> None:
    variables = {v for service in compose.values() for v in _medretrain_env(service)}
    assert len(variables) >= 10
    for variable in variables:
        setting_path(variable)


def test_settings_point_at_compose_services(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from(_medretrain_env(compose["orchestrator"]), monkeypatch)
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
    settings = settings_from(_medretrain_env(compose["orchestrator"]), monkeypatch)
    command = compose["mlflow"]["command"]
    assert _flag(command, "--app-name") == "basic-auth"
    assert int(_flag(command, "--port")) == settings.mlflow.port == urlsplit(settings.mlflow.tracking_uri).port
    assert _flag(command, "--backend-store-uri") == settings.mlflow.backend_store_uri
    assert _flag(command, "--artifacts-destination").startswith(f"s3://{settings.s3.artifacts_bucket}/")
    assert "mlflow" in _flag(command, "--allowed-hosts").split(",")


def test_ray_and_buckets_match_settings(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from(_medretrain_env(compose["orchestrator"]), monkeypatch)
    head = compose["ray-head"]["command"]
    assert int(_flag(head, "--port")) == settings.ray.gcs_port
    assert int(_flag(head, "--dashboard-port")) == settings.ray.dashboard_port == urlsplit(settings.ray.address).port
    workers = _ray_workers(compose)
    assert {"ray-worker", "ray-worker-gpu", "answers"} <= set(workers)
    for name, words in workers.items():
        assert _flag(words, "--address") == f"ray-head:{settings.ray.gcs_port}", name
    created = compose["minio-init"]["command"][0]
    for bucket in (settings.s3.artifacts_bucket, settings.s3.checkpoints_bucket, settings.s3.datasets_bucket):
        assert f"local/{bucket}" in created


def test_services_commands_health_and_dependencies(compose: dict[str, Any]) -> None:
    commands = {
        "accumulator": "medretrain serve accumulator",
        "orchestrator": "medretrain serve orchestrator",
        "drift-monitor": "medretrain serve drift",
        "answers": "medretrain serve answers",
    }
    for name, command in commands.items():
        assert " ".join(compose[name]["command"]).endswith(command), name
    assert {"kafka", "minio", "postgres", "mlflow", "ray-head", "ray-worker"} <= set(compose)
    for name, service in compose.items():
        one_shot = service.get("restart") == "no"
        assert one_shot or "healthcheck" in service, f"{name} has no healthcheck"
        for dependency, rule in (service.get("depends_on") or {}).items():
            assert dependency in compose, f"{name} depends on unknown {dependency}"
            one_shot_dependency = compose[dependency].get("restart") == "no"
            expected = "service_completed_successfully" if one_shot_dependency else "service_healthy"
            assert rule["condition"] == expected, (name, dependency)


def test_every_service_has_a_restart_policy(compose: dict[str, Any]) -> None:
    one_shots = {"minio-init", "topics-init"}
    for name, service in compose.items():
        assert service.get("restart") == ("no" if name in one_shots else LONG_RUNNING_RESTART), name


def test_kafka_keeps_topics_on_its_volume_and_listens_for_containers_and_host(compose: dict[str, Any]) -> None:
    kafka = compose["kafka"]
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    named_volumes = {v.split(":")[1] for v in kafka["volumes"] if not v.startswith((".", "/"))}
    assert env["KAFKA_LOG_DIRS"] in named_volumes, "Kafka's log dir is not on a volume: a restart loses the topics"
    listeners = dict(item.split("://") for item in env["KAFKA_LISTENERS"].split(","))
    pairs = (a.split("://") for a in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    advertised = {name: urlsplit(f"tcp://{address}") for name, address in pairs}
    protocols = dict(item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(listeners) <= set(protocols)
    assert set(advertised) == set(listeners) - {env["KAFKA_CONTROLLER_LISTENER_NAMES"]}
    internal = advertised[env["KAFKA_INTER_BROKER_LISTENER_NAME"]]
    assert (internal.hostname, internal.port) == ("kafka", 9092) and _exposes(kafka, internal.port)
    host_side = [a for a in advertised.values() if a.hostname in {"localhost", "127.0.0.1"}]
    assert len(host_side) == 1 and _published(kafka).get(host_side[0].port) == "127.0.0.1"


def test_accumulator_metrics_bind_where_the_container_port_reaches(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    accumulator = compose["accumulator"]
    settings = settings_from(_medretrain_env(accumulator), monkeypatch)
    # serve_metrics binds stack.host: loopback inside a container is unreachable through `expose`.
    assert settings.stack.host == "0.0.0.0"
    assert _exposes(accumulator, settings.stream.metrics_port)
    assert urlsplit(_probe_url(accumulator)).port == settings.stream.metrics_port


def test_ray_nodes_probe_their_own_raylet(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from(_medretrain_env(compose["orchestrator"]), monkeypatch)
    for name, words in _ray_workers(compose).items():
        assert int(_flag(words, "--dashboard-agent-listen-port")) == settings.ray.dashboard_agent_port, name
        if name == "answers":
            continue  # probes the Serve proxy instead (below)
        probe = urlsplit(_probe_url(compose[name]))
        assert (probe.hostname, probe.port) == ("localhost", settings.ray.dashboard_agent_port), name
        assert probe.path == "/api/local_raylet_healthz", name


def test_gpu_profile_reserves_nvidia_devices_for_a_cuda_worker(compose: dict[str, Any]) -> None:
    gpu_services = {name for name, s in compose.items() if "gpu" in s.get("profiles", [])}
    assert gpu_services == {"ray-worker-gpu"}
    worker = compose["ray-worker-gpu"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert worker["image"].endswith("-cuda") and worker["build"]["args"]["VARIANT"] == "cuda"
    for name, service in compose.items():
        if name not in gpu_services:
            assert "deploy" not in service and "profiles" not in service, f"{name} is not in the default profile"


def test_answer_service_is_served_from_the_ray_head(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    answers = compose["answers"]
    settings = settings_from(_medretrain_env(answers), monkeypatch)
    assert settings.serve.host == "0.0.0.0", "Serve's proxy must bind every interface of its container"
    head = compose["ray-head"]
    assert _exposes(head, settings.serve.port) and _published(head)[settings.serve.port] == "127.0.0.1"
    probe = urlsplit(_probe_url(answers))
    assert (probe.hostname, probe.port, probe.path) == ("ray-head", settings.serve.port, "/-/healthz")
    assert answers["environment"]["RAY_ADDRESS"] == f"ray-head:{settings.ray.gcs_port}"
    # Replicas on any node read the keys `medretrain serve answers` writes under the stack home.
    state = {v for v in answers["volumes"] if v.endswith(f":{settings.stack.home}")}
    for name in ("ray-head", "ray-worker", "ray-worker-gpu"):
        assert state <= set(compose[name]["volumes"]), name
    assert (REPO / "deploy" / "serve" / "answers.yaml").exists()


def _secret_problems(node: Any, where: str) -> list[str]:
    """Secret-named keys whose value is not only a required ``${VAR:?...}``, and URLs with a literal password."""
    if isinstance(node, dict):
        problems = []
        for key, value in node.items():
            if isinstance(value, str) and SECRET_NAME.search(str(key)) and not ONLY_A_VARIABLE.fullmatch(value):
                problems.append(f"{where}.{key}")
            problems += _secret_problems(value, f"{where}.{key}")
        return problems
    if isinstance(node, list):
        return [p for i, item in enumerate(node) for p in _secret_problems(item, f"{where}[{i}]")]
    if isinstance(node, str):
        passwords = URL_PASSWORD.findall(node)
        return [f"{where}: {node}" for password in passwords if not ONLY_A_VARIABLE.fullmatch(password)]
    return []


def test_no_secret_is_written_in_the_compose_file() -> None:
    raw = COMPOSE.read_text()
    assert _secret_problems(yaml.safe_load(raw), "compose") == []
    secrets = [v for k, v in _env_example().items() if SECRET_NAME.search(k)]
    assert len(secrets) >= 4 and not [s for s in secrets if s in raw]
    assert ".env" in (REPO / ".gitignore").read_text().split()


def test_secret_check_catches_a_literal_password() -> None:
    leaky = {"environment": {"POSTGRES_PASSWORD": "hunter2", "URL": "postgresql://u:hunter2@db/x"}}
    assert len(_secret_problems(leaky, "x")) == 2


def test_unknown_variable_is_caught() -> None:
    with pytest.raises(AssertionError, match="no setting kafka.bootstrapp"):
        setting_path("MEDRETRAIN_KAFKA__BOOTSTRAPP")
    with pytest.raises(AssertionError, match="whole section"):
        setting_path("MEDRETRAIN_KAFKA")




def test_ray_speaks_token_auth_everywhere(compose: dict[str, Any]) -> None:
    """Every Ray node and every medretrain process (Ray clients) shares the token; probes of Ray endpoints send it."""
    ray_ports = {"8265", "52365"}
    for name, service in compose.items():
        env = service.get("environment") or {}
        if _ray_start(service.get("command") or []) is not None or _medretrain_env(service):
            assert env.get("RAY_AUTH_MODE") == "token", name
            assert env.get("RAY_AUTH_TOKEN"), name
        probe = " ".join(service.get("healthcheck", {}).get("test", []))
        if any(f"localhost:{port}/" in probe for port in ray_ports):
            assert "os.environ['RAY_AUTH_TOKEN']" in probe and "Bearer" in probe, name
