"""deploy.ray_env: the job's environment rebuilds the submitter's Settings, secrets left out."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.ray_env import REPO, runtime_env, settings_env
from schemas.settings import SECRET_SETTINGS, Settings, load_settings, with_overrides


def _clear_medretrain_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in [k for k in os.environ if k.startswith("MEDRETRAIN_")]:
        monkeypatch.delenv(key)


def test_settings_round_trip_through_env(monkeypatch: pytest.MonkeyPatch) -> None:
    overrides = {
        "mlflow": {"backend_store_uri": None},
        "ray": {"num_cpus": 3},
        "train": {"lora": {"r": 4, "target_modules": ["q_proj"]}},
    }
    original = with_overrides(load_settings(), overrides)
    assert original.mlflow.backend_store_uri is None and original.train.lora.target_modules == ("q_proj",)
    env = settings_env(original)
    _clear_medretrain_env(monkeypatch)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert Settings() == original


SECRETS = {
    "s3": {"access_key": "AKIA-not-in-a-job-spec", "secret_key": "s3-secret-not-in-a-job-spec"},
    "database": {"url": "postgresql+psycopg://medretrain:db-password-not-in-a-job-spec@db:5432/medretrain"},
    "mlflow": {"backend_store_uri": "postgresql+psycopg://mlflow:mlflow-password-not-in-a-job-spec@db/mlflow"},
}


def test_no_secret_setting_reaches_a_job_spec() -> None:
    settings = with_overrides(load_settings(), SECRETS)
    spec = str(runtime_env(settings))
    assert "not-in-a-job-spec" not in spec
    assert "MEDRETRAIN_S3__ENDPOINT" in spec  # the rest of the settings still travel
    every = settings_env(settings, secrets=True)  # for this machine's own processes (the demo's services)
    assert {f"MEDRETRAIN_{name.upper().replace('.', '__')}" for name in SECRET_SETTINGS} <= set(every)


def test_runtime_env_has_absolute_paths_and_file_vars() -> None:
    settings = load_settings()
    env = runtime_env(settings)
    assert Path(env["working_dir"]) == REPO
    assert ".venv/" in env["excludes"] and ".medretrain/" in env["excludes"]
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    home = Path(env["env_vars"]["MEDRETRAIN_STACK__HOME"])
    assert home.is_absolute() and home == settings.stack.home


def test_missing_runtime_file_names_it(tmp_path: Path) -> None:
    settings = load_settings([f"ray.runtime_env={tmp_path / 'nope.json'}"])
    with pytest.raises(RuntimeError, match="nope.json"):
        runtime_env(settings)
