"""The KubeRay RayService deploys the same answer application as deploy/serve/answers.yaml (no cluster needed)."""

from __future__ import annotations

import yaml

from tests.deploy.test_compose import REPO, _setting_path


def test_rayservice_serves_the_serve_config_application_with_real_settings() -> None:
    service = yaml.safe_load((REPO / "deploy" / "kuberay" / "rayservice-answers.yaml").read_text())
    assert service["kind"] == "RayService"
    served = yaml.safe_load(service["spec"]["serveConfigV2"])
    config = yaml.safe_load((REPO / "deploy" / "serve" / "answers.yaml").read_text())
    keys = ("name", "route_prefix", "import_path", "args")
    assert [{k: a[k] for k in keys} for a in served["applications"]] == \
        [{k: a[k] for k in keys} for a in config["applications"]]
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in head["env"]}
    for variable in env:
        _setting_path(variable)
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports["serve"] == served["http_options"]["port"] == int(env["MEDRETRAIN_SERVE__PORT"])
    keys_mount = next(m for m in head["volumeMounts"] if m["name"] == "answer-keys")
    assert keys_mount["mountPath"] == f"{env['MEDRETRAIN_STACK__HOME']}/answers/keys.json"
