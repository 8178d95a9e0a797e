"""deploy/k8s validates against Kubernetes 1.37 (kubernetes-validate, offline) and KubeRay v1.7's CRD schemas,
keeps credentials in Secrets, and agrees with Settings and deploy/serve/answers.yaml (no cluster needed)."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from sqlalchemy.engine import make_url

from tests.deploy.manifests import (
    REPO,
    SECRET_NAME,
    URL_PASSWORD,
    closed,
    image_variant,
    load_schema,
    mappings_with,
    schema_errors,
    setting_path,
    settings_from,
    yaml_documents,
)

K8S = REPO / "deploy" / "k8s"
KUBERNETES_VERSION = "1.37.0"
"""The newest version kubernetes-validate 1.37 ships schemas for (it validates offline)."""
CRD_SCHEMAS = {"RayCluster": "kuberay-v1.7.0-raycluster.json", "RayService": "kuberay-v1.7.0-rayservice.json"}
SECRET_KEYS = {
    "MEDRETRAIN_S3__ACCESS_KEY", "MEDRETRAIN_S3__SECRET_KEY", "MEDRETRAIN_DATABASE__URL",
    "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
}  # fmt: skip


def _manifest_files() -> dict[str, Path]:
    """Kustomization resource name -> file here; secrets.yaml is the operator's copy of secrets.example.yaml."""
    files = {p.name: p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"}
    files["secrets.yaml"] = files.pop("secrets.example.yaml")
    return files


@pytest.fixture(scope="module")
def documents() -> list[dict[str, Any]]:
    return [d for path in _manifest_files().values() for d in yaml_documents(path)]


def _one(documents: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in documents if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _pod_specs(node: Any) -> Iterator[dict[str, Any]]:
    """Every pod spec in a manifest (Deployments', the Job's, and each Ray group's template)."""
    return mappings_with(node, "containers", list)


def _containers(documents: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for document in documents:
        for spec in _pod_specs(document):
            for container in spec["containers"]:
                yield f"{document['kind']}/{document['metadata']['name']}/{container['name']}", container


def _settings_env(documents: list[dict[str, Any]]) -> dict[str, str]:
    """What a pod with ``envFrom`` the settings ConfigMap and the credentials Secret sees."""
    config = _one(documents, "ConfigMap", "medretrain-settings")["data"]
    return config | _one(documents, "Secret", "medretrain-secrets")["stringData"]


def _manifest_settings(documents: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch):
    """The Settings the manifests' MEDRETRAIN_* variables give a pod."""
    env = {k: v for k, v in _settings_env(documents).items() if k.startswith("MEDRETRAIN_")}
    return settings_from(env, monkeypatch)


def test_kustomization_applies_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(_manifest_files())
    assert "deploy/k8s/secrets.yaml" in (REPO / ".gitignore").read_text().split()


def test_core_objects_conform_to_kubernetes(documents: list[dict[str, Any]]) -> None:
    core = [d for d in documents if not d["apiVersion"].startswith("ray.io/")]
    kinds = {"Namespace", "ConfigMap", "Secret", "Deployment", "Service", "Job", "NetworkPolicy"}
    assert {d["kind"] for d in core} == kinds
    for document in core:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_kubernetes_check_catches_a_misspelt_field(documents: list[dict[str, Any]]) -> None:
    broken = copy.deepcopy(_one(documents, "Deployment", "medretrain-orchestrator"))
    broken["spec"]["template"]["spec"]["containers"][0]["envFrm"] = []
    with pytest.raises(kubernetes_validate.ValidationError, match="envFrm"):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("kind", sorted(CRD_SCHEMAS))
def test_kuberay_objects_conform_to_the_operators_crds(documents: list[dict[str, Any]], kind: str) -> None:
    schema = closed(load_schema(CRD_SCHEMAS[kind]))
    found = [d for d in documents if d["kind"] == kind]
    assert found and all(d["apiVersion"] == "ray.io/v1" for d in found)
    for document in found:
        assert schema_errors(document, schema) == [], document["metadata"]["name"]


def test_crd_check_catches_a_misspelt_field(documents: list[dict[str, Any]]) -> None:
    broken = copy.deepcopy(_one(documents, "RayCluster"))
    broken["spec"]["workerGroupSpecs"][0]["minReplica"] = 1
    assert any("minReplica" in e for e in schema_errors(broken, closed(load_schema(CRD_SCHEMAS["RayCluster"]))))


def test_every_medretrain_variable_is_a_setting(documents: list[dict[str, Any]]) -> None:
    variables = set(_settings_env(documents))
    variables |= {e["name"] for _, c in _containers(documents) for e in c.get("env", [])}
    medretrain = {v for v in variables if v.startswith("MEDRETRAIN_")}
    assert len(medretrain) >= 15
    for variable in medretrain:
        setting_path(variable)


def test_endpoints_are_defined_here_or_documented(
    documents: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _manifest_settings(documents, monkeypatch)
    cluster = _one(documents, "RayCluster")
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    address = urlsplit(settings.ray.address)
    assert address.hostname == f"{cluster['metadata']['name']}-head-svc"
    assert address.port == ports["dashboard"] == settings.ray.dashboard_port
    assert ports["gcs"] == settings.ray.gcs_port
    deploy_doc = (REPO / "docs" / "deploy.md").read_text()
    external = {
        "kafka": urlsplit(f"tcp://{settings.kafka.bootstrap}").hostname,
        "s3": urlsplit(settings.s3.endpoint).hostname,
        "mlflow": urlsplit(settings.mlflow.tracking_uri).hostname,
        "database": make_url(settings.database.url).host,
    }
    services = {d["metadata"]["name"] for d in documents if d["kind"] == "Service"}
    for role, host in external.items():
        why = f"{role} endpoint {host}: neither a Service here nor in docs/deploy.md"
        assert host in services or f"`{host}`" in deploy_doc, why


def test_credentials_live_in_secrets_only(documents: list[dict[str, Any]]) -> None:
    for config in (d for d in documents if d["kind"] == "ConfigMap"):
        for key, value in config["data"].items():
            assert not SECRET_NAME.search(key), key
            assert not URL_PASSWORD.search(value), key
    credentials = _one(documents, "Secret", "medretrain-secrets")["stringData"]
    assert set(credentials) == SECRET_KEYS
    assert make_url(credentials["MEDRETRAIN_DATABASE__URL"]).password
    keys = json.loads(_one(documents, "Secret", "medretrain-answers-keys")["stringData"]["keys.json"])
    assert set(keys) == {"api_key", "reviewer_key"}
    # The shipped example holds placeholders only, never a credential.
    values = [*credentials.values(), *keys.values()]
    assert all("change-me" in value for value in values)


def test_every_referenced_configmap_and_secret_is_defined(documents: list[dict[str, Any]]) -> None:
    defined = {(d["kind"], d["metadata"]["name"]) for d in documents}
    for where, container in _containers(documents):
        for source in container.get("envFrom", []):
            kind, ref = next(iter(source.items()))
            assert ({"configMapRef": "ConfigMap", "secretRef": "Secret"}[kind], ref["name"]) in defined, where
    for document in documents:
        for spec in _pod_specs(document):
            for volume in spec.get("volumes", []):
                if "secret" in volume:
                    assert ("Secret", volume["secret"]["secretName"]) in defined, document["metadata"]["name"]


def test_gpus_are_asked_only_of_cuda_images(documents: list[dict[str, Any]]) -> None:
    variants = {}
    for where, container in _containers(documents):
        variants[where] = image_variant(container["image"])
        wants_gpu = "nvidia.com/gpu" in container.get("resources", {}).get("limits", {})
        assert wants_gpu == (variants[where] == "cuda"), f"{where}: {container['image']} with GPU={wants_gpu}"
    assert variants["RayCluster/medretrain/ray-worker"] == "cuda"
    assert list(variants.values()).count("cuda") == 1


def test_rayservice_serves_the_answers_serve_config(
    documents: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    service = _one(documents, "RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    shipped = yaml.safe_load((REPO / "deploy" / "serve" / "answers.yaml").read_text())
    assert config["applications"] == shipped["applications"]
    settings = _manifest_settings(documents, monkeypatch)
    assert config["http_options"] == {"host": settings.serve.host, "port": settings.serve.port}
    ray_cluster = service["spec"]["rayClusterConfig"]
    head = ray_cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "serve", "containerPort": settings.serve.port} in head["ports"]
    # Every replica's node reads the keys where ensure_keys looks: <stack home>/answers/keys.json.
    for spec in _pod_specs(ray_cluster):
        mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
        volumes = {v["name"]: v.get("secret", {}).get("secretName") for v in spec["volumes"]}
        assert [mounts[n] for n, secret in volumes.items() if secret == "medretrain-answers-keys"] == [
            str(settings.stack.home / "answers")
        ]


def test_accumulator_metrics_reach_its_service(
    documents: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment = _one(documents, "Deployment", "medretrain-accumulator")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {k: v for k, v in _settings_env(documents).items() if k.startswith("MEDRETRAIN_")}
    settings = settings_from(env | {e["name"]: e["value"] for e in container["env"]}, monkeypatch)
    assert settings.stack.host == "0.0.0.0"
    assert {"name": "metrics", "containerPort": settings.stream.metrics_port} in container["ports"]
    service = _one(documents, "Service", "medretrain-accumulator")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"


def test_deployments_run_the_services_commands(documents: list[dict[str, Any]]) -> None:
    commands = {
        "medretrain-accumulator": ["medretrain", "serve", "accumulator"],
        "medretrain-orchestrator": ["medretrain", "serve", "orchestrator"],
        "medretrain-drift-monitor": ["medretrain", "serve", "drift"],
    }
    for name, command in commands.items():
        spec = _one(documents, "Deployment", name)["spec"]["template"]["spec"]
        assert spec["containers"][0]["command"] == command
        assert spec["securityContext"]["runAsNonRoot"] is True


def test_ray_pods_admit_only_medretrain_pods_and_the_operator(documents: list[dict[str, Any]]) -> None:
    policy = _one(documents, "NetworkPolicy", "medretrain-ray-ingress")["spec"]
    assert policy["podSelector"] == {"matchExpressions": [{"key": "ray.io/cluster", "operator": "Exists"}]}
    [rule] = policy["ingress"]
    admitted = next(p["podSelector"]["matchLabels"] for p in rule["from"] if "podSelector" in p)
    assert any("namespaceSelector" in p for p in rule["from"]), "the KubeRay operator drives the dashboard"
    # Every pod that talks to Ray (the orchestrator submits jobs; Ray nodes talk to each other) carries the label.
    for document in documents:
        for template in mappings_with(document, "spec", dict):
            if "containers" in template["spec"]:
                labels = template.get("metadata", {}).get("labels", {})
                assert admitted.items() <= labels.items(), f"{document['kind']}/{document['metadata']['name']}"


def test_ray_speaks_token_auth_with_one_token(documents: list[dict[str, Any]]) -> None:
    """Both Ray clusters require the token of one Secret, and each pod that calls Ray (the orchestrator's jobs,
    `stack check` in a readiness probe) gets that Secret's token; no other pod holds it."""
    token = _one(documents, "Secret", "medretrain-ray-token")["stringData"]
    assert set(token) == {"auth_token"}  # the key KubeRay reads
    assert "change-me" in token["auth_token"]
    for kind in ("RayCluster", "RayService"):
        spec = _one(documents, kind)["spec"]
        auth = spec["authOptions"] if kind == "RayCluster" else spec["rayClusterConfig"]["authOptions"]
        assert auth == {"mode": "token", "secretName": "medretrain-ray-token"}, kind
    ray_clients = {"Deployment/medretrain-orchestrator/orchestrator",
                   "Deployment/medretrain-drift-monitor/drift-monitor"}  # fmt: skip
    for where, container in _containers(documents):
        if not where.startswith("Deployment/") and not where.startswith("Job/"):
            continue  # Ray pods: KubeRay sets RAY_AUTH_MODE and RAY_AUTH_TOKEN from authOptions
        env = {e["name"]: e for e in container.get("env", [])}
        if where in ray_clients:
            assert env["RAY_AUTH_MODE"]["value"] == "token", where
            ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "medretrain-ray-token", "key": "auth_token"}, where
        else:
            assert "RAY_AUTH_TOKEN" not in env, where
    probes = {where for where, c in _containers(documents) if "stack" in str(c.get("readinessProbe", {}))}
    assert probes <= ray_clients, "a `stack check` probe asks the Ray dashboard, which needs the token"
