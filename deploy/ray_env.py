"""The Ray runtime environment of a retrain job: ``deploy/ray_runtime.json`` plus the current Settings.

The CLI path reads the file alone (then the job sees default settings):

    ray job submit --address http://127.0.0.1:18265 --runtime-env deploy/ray_runtime.json -- python -m trainer.retrain

The orchestrator submits with :func:`runtime_env`, which adds ``MEDRETRAIN_*`` variables
that rebuild the submitter's exact Settings inside the job (``load_settings()`` there).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from schemas.settings import Settings

REPO = Path(__file__).resolve().parents[1]
ENV_PREFIX = "MEDRETRAIN_"


def _env_value(value: Any) -> str:
    if value is None:
        return "null"  # Settings parses "null" as None (env_parse_none_str)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value)  # pydantic-settings decodes complex values from JSON
    return str(value)


def settings_env(settings: Settings) -> dict[str, str]:
    """One ``MEDRETRAIN_SECTION__FIELD`` variable per leaf setting (nested sections joined with ``__``)."""
    env: dict[str, str] = {}

    def walk(prefix: str, node: dict[str, Any], fields: dict[str, Any]) -> None:
        for key, value in node.items():
            name = f"{prefix}{key.upper()}"
            annotation = fields[key].annotation
            if isinstance(value, dict) and hasattr(annotation, "model_fields"):
                walk(f"{name}__", value, annotation.model_fields)
            else:
                env[name] = _env_value(value)

    walk(ENV_PREFIX, settings.model_dump(mode="json"), type(settings).model_fields)
    return env


def load_runtime_file(settings: Settings) -> dict[str, Any]:
    """The JSON file named by ``ray.runtime_env`` (relative paths: from the repository root)."""
    path = settings.ray.runtime_env
    path = path if path.is_absolute() else REPO / path
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RuntimeError(f"cannot read the Ray runtime env {path}: {e}") from e


def runtime_env(settings: Settings) -> dict[str, Any]:
    """``runtime_env`` for ``JobSubmissionClient.submit_job``: the file, an absolute working_dir, Settings as env."""
    env = load_runtime_file(settings)
    working_dir = Path(env.get("working_dir", "."))
    # The submitter's cwd may be anywhere; "." in the file means the repository root.
    env["working_dir"] = str(working_dir if working_dir.is_absolute() else (REPO / working_dir).resolve())
    env["env_vars"] = {**env.get("env_vars", {}), **settings_env(settings)}
    return env


def exit_driver() -> None:
    """End a Ray job's driver once its output is flushed. The job ends when the process does, and the
    interpreter's teardown after torch, Lightning and Ray took 20-40 s on a busy 2-core host."""
    import logging
    import os
    import sys

    if "ray" in sys.modules:  # a driver that joined the cluster leaves it cleanly first
        sys.modules["ray"].shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
