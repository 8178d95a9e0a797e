"""Shared readers of the deploy files for tests/deploy (compose, Kubernetes, Dockerfile): no Docker, no cluster."""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from schemas.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = Path(__file__).resolve().parent / "schemas"
IMAGE_REPOSITORY = "ghcr.io/medretrain/medretrain"
VARIANTS = ("cpu", "cuda")


def setting_path(variable: str) -> tuple[str, ...]:
    """``MEDRETRAIN_TRAIN__LORA__R`` -> ("train", "lora", "r"), failing if any part is not a Settings field."""
    parts = tuple(variable.removeprefix("MEDRETRAIN_").lower().split("__"))
    model: Any = Settings
    for part in parts:
        assert model is not None and part in model.model_fields, f"{variable}: no setting {'.'.join(parts)}"
        annotation = model.model_fields[part].annotation
        model = annotation if hasattr(annotation, "model_fields") else None
    assert model is None, f"{variable} names a whole section, not a field"
    return parts


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The Settings a process started with exactly these MEDRETRAIN_* variables would load."""
    for key in [k for k in os.environ if k.startswith("MEDRETRAIN_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return load_settings()


def project_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def image_variant(image: str) -> str:
    """``ghcr.io/medretrain/medretrain:0.1.0-cuda`` -> "cuda", failing for any other repository or version."""
    repository, _, tag = image.rpartition(":")
    assert repository == IMAGE_REPOSITORY, f"{image}: not {IMAGE_REPOSITORY}"
    version, _, variant = tag.rpartition("-")
    assert version == project_version() and variant in VARIANTS, f"{image}: tag is not <{project_version()}>-<cpu|cuda>"
    return variant


def load_schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / name).read_text())


def closed(schema: Any) -> Any:
    """A copy of a structural (CRD) schema that rejects unknown fields,
    as the API server's strict field validation does.

    CRD schemas leave ``additionalProperties`` out and the server prunes or rejects unknown fields; jsonschema would
    accept them silently, so a typo'd key would pass.
    """
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: closed(value) for key, value in schema.items()}
    preserves_unknown = schema.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in schema and "additionalProperties" not in schema and not preserves_unknown:
        result["additionalProperties"] = False
    return result


def schema_errors(document: Any, schema: dict[str, Any]) -> list[str]:
    """Every violation, each as ``path: message`` (empty when the document conforms)."""
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(document)]


def mappings_with(node: Any, key: str, value_type: type) -> Iterator[dict[str, Any]]:
    """Every mapping, at any depth, whose ``key`` holds a ``value_type`` (pod specs by "containers", ...)."""
    if isinstance(node, dict):
        if isinstance(node.get(key), value_type):
            yield node
        for value in node.values():
            yield from mappings_with(value, key, value_type)
    elif isinstance(node, list):
        for item in node:
            yield from mappings_with(item, key, value_type)


def yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


URL_PASSWORD = re.compile(r"://[^/:@\s]+:([^@\s]+)@")
"""The password part of ``scheme://user:password@host`` URLs."""
SECRET_NAME = re.compile(r"(^|_)(PASSWORD|SECRET|ACCESS_KEY|TOKEN)(_|$)")
"""Names of variables that hold a credential (``TOKENIZERS_PARALLELISM`` is not one)."""
