"""deploy/Dockerfile builds the CPU and CUDA variants the compose and Kubernetes files name (no Docker needed)."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.deploy.manifests import (
    REPO,
    VARIANTS,
    image_variant,
    mappings_with,
    yaml_documents,
)

DOCKERFILE = REPO / "deploy" / "Dockerfile"


def _build_args() -> dict[str, str]:
    """``ARG NAME=default`` lines of the Dockerfile."""
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), flags=re.MULTILINE))


def test_dockerfile_builds_either_variant_as_a_non_root_user() -> None:
    text = DOCKERFILE.read_text()
    args = _build_args()
    assert args["VARIANT"] == "cpu"
    # A qualified base image: registry host first, so no short-name resolution picks another registry.
    assert re.fullmatch(r"[a-z0-9.-]+\.[a-z]+/[\w./-]+:[\w.-]+", args["BASE_IMAGE"]), args["BASE_IMAGE"]
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, flags=re.MULTILINE)
    branches = re.findall(r"^\s+(\w+)\) ", text, flags=re.MULTILINE)
    assert branches == [*VARIANTS], "each VARIANT needs its own torch index"
    assert "whl/cpu" in text and "whl/${CUDA_WHEELS}" in text and re.fullmatch(r"cu\d+", args["CUDA_WHEELS"])
    users = re.findall(r"^USER (\S+)$", text, flags=re.MULTILINE)
    assert users and users[-1] not in {"root", "0"}


def test_compose_images_name_the_variant_they_build() -> None:
    services = yaml.safe_load((REPO / "docker-compose.yaml").read_text())["services"]
    built = [s for s in mappings_with(services, "image", str) if "build" in s]
    assert len(built) >= 5
    for service in built:
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert image_variant(service["image"]) == service["build"]["args"]["VARIANT"]
    assert {image_variant(s["image"]) for s in built} == set(VARIANTS)


def test_kubernetes_images_are_the_dockerfiles_variants() -> None:
    documents = [d for path in (REPO / "deploy" / "k8s").glob("*.yaml") for d in yaml_documents(path)]
    containers = list(mappings_with(documents, "image", str))
    assert len(containers) >= 7
    assert {image_variant(c["image"]) for c in containers} == set(VARIANTS)


def test_a_foreign_or_unversioned_image_is_caught() -> None:
    for image in ("medretrain:latest", "ghcr.io/medretrain/medretrain:latest", "ghcr.io/other/medretrain:0.1.0-cpu"):
        with pytest.raises(AssertionError):
            image_variant(image)


def test_build_context_leaves_out_the_operators_secrets() -> None:
    ignored = (REPO / "deploy" / "Dockerfile.dockerignore").read_text().split()
    assert {".env", "deploy/k8s/secrets.yaml", ".medretrain"} <= set(ignored)
