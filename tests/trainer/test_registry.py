"""Registry conventions on the real embedded MLflow: bootstrap, idempotence, resolve, adapters on top of a base."""

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from deploy.registry import CHAMPION, KIND_ADAPTER, KIND_BASE, mlflow_client
from schemas.settings import LoraSettings, Settings, with_overrides
from services.cli import build_app
from trainer.model import attach_lora, load_base
from trainer.registry import bootstrap, load_resolved, model_files, resolve


def test_model_files_rejects_pickled_or_incomplete_folders(tmp_path: Path, tiny_model_dir: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match=r"safetensors weights.*tokenizer"):
        model_files(tmp_path)
    assert "model.safetensors" in {p.name for p in model_files(tiny_model_dir)}


def test_bootstrap_cli_rejects_a_wrong_path_before_touching_the_registry(tmp_path: Path) -> None:
    args = ["model", "bootstrap", "--from-path", str(tmp_path / "nope")]
    result = CliRunner().invoke(build_app(), args, env={"COLUMNS": "300"})
    assert result.exit_code == 2
    assert "not a directory" in result.output


@pytest.fixture
def registry(stack: Settings) -> Iterator[Settings]:
    """Settings with a registered model name of this test alone; its local download cache goes afterwards."""
    settings = with_overrides(stack, {"mlflow": {"registered_model": f"test-medqa-{uuid.uuid4().hex[:10]}"}})
    yield settings
    shutil.rmtree(settings.stack.home / "models" / settings.mlflow.registered_model, ignore_errors=True)


@pytest.mark.integration
def test_bootstrap_cli_registers_version_1_as_champion_once(registry: Settings, tiny_model_dir: Path) -> None:
    name = registry.mlflow.registered_model
    args = ["--set", f"mlflow.registered_model={name}", "model", "bootstrap", "--from-path", str(tiny_model_dir)]
    result = CliRunner().invoke(build_app(), args, env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "champion" in result.output
    client = mlflow_client(registry)
    version = client.get_model_version(name, "1")
    assert version.tags == {"kind": KIND_BASE, "origin": f"path:{tiny_model_dir.resolve()}"}
    assert version.source == f"runs:/{version.run_id}/model"
    assert client.get_registered_model(name).aliases == {CHAMPION: "1"}

    assert bootstrap(registry, from_path=tiny_model_dir) == "1"
    assert [v.version for v in client.search_model_versions(f"name = '{name}'")] == ["1"]


@pytest.mark.integration
def test_resolve_downloads_once_and_the_model_generates(registry: Settings, tiny_model_dir: Path) -> None:
    bootstrap(registry, from_path=tiny_model_dir)
    resolved = resolve(registry, CHAMPION)
    assert (resolved.version, resolved.base_version, resolved.adapter_dir) == ("1", "1", None)
    assert resolved.base_dir == registry.stack.home / "models" / registry.mlflow.registered_model / "1" / "model"
    assert (resolved.base_dir / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    stamp = (resolved.base_dir / "model.safetensors").stat().st_mtime_ns
    assert resolve(registry, "1") == resolved
    assert (resolved.base_dir / "model.safetensors").stat().st_mtime_ns == stamp

    model, tokenizer = load_resolved(resolved, torch.float32)
    batch = tokenizer("What is gout?", return_tensors="pt")
    generated = model.generate(**batch, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert generated.shape[1] == batch["input_ids"].shape[1] + 5
    assert tokenizer.decode(generated[0, batch["input_ids"].shape[1] :])

    with pytest.raises(LookupError, match="challenger"):
        resolve(registry, "challenger")


@pytest.mark.integration
def test_adapter_version_resolves_with_its_base(registry: Settings, tiny_model_dir: Path, tmp_path: Path) -> None:
    import mlflow

    name = registry.mlflow.registered_model
    base_version = bootstrap(registry, from_path=tiny_model_dir)
    model, tokenizer = load_base(tiny_model_dir)
    adapter = attach_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for param_name, param in adapter.named_parameters():
            if "lora_B" in param_name:
                param.normal_(std=0.5)
    adapter.eval().save_pretrained(tmp_path / "adapter")
    batch = tokenizer("What is gout?", return_tensors="pt")
    with torch.no_grad():
        expected = adapter(**batch).logits

    # What the evaluator does for a candidate, following the registry conventions.
    mlflow.set_experiment(registry.mlflow.experiment)
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(tmp_path / "adapter"), artifact_path="adapter")
    tags = {"kind": KIND_ADAPTER, "base_version": base_version, "parent_version": base_version}
    client = mlflow_client(registry)
    version = client.create_model_version(name, f"runs:/{run.info.run_id}/adapter", run.info.run_id, tags=tags).version

    resolved = resolve(registry, version)
    assert (resolved.version, resolved.base_version) == ("2", "1")
    assert resolved.origin == f"path:{tiny_model_dir.resolve()}"
    assert resolved.adapter_dir is not None and (resolved.adapter_dir / "adapter_model.safetensors").is_file()
    loaded, _ = load_resolved(resolved)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected)
    assert resolve(registry, CHAMPION).version == "1"
