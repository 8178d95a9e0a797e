"""The Ray runtime environment of a retrain job: ``deploy/ray_runtime.json`` plus the current Settings.

The CLI path reads the file alone; the job then runs with the settings the cluster gives its processes
(the embedded head hands them the stack's, ``stack up``'s; a KubeRay cluster, its pods' environment):

    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=.medretrain/ray_token     # the stack's Ray token
    ray job submit --address http://127.0.0.1:18265 --runtime-env deploy/ray_runtime.json -- \
        python -m trainer.retrain --request '{"request_id": "rr-manual-1", "reason": "manual", "watermark": 0}'

The orchestrator submits with :func:`runtime_env`, which adds ``MEDRETRAIN_*`` variables that rebuild the
submitter's Settings inside the job (``load_settings()`` there), except ``SECRET_SETTINGS``: a job spec is
readable through the Jobs API and the dashboard, so credentials stay where the cluster keeps them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

from schemas.settings import SECRET_SETTINGS, Settings, load_settings

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


def settings_env(settings: Settings, secrets: bool = False) -> dict[str, str]:
    """One ``MEDRETRAIN_SECTION__FIELD`` variable per leaf setting (nested sections joined with ``__``).

    ``SECRET_SETTINGS`` only with ``secrets=True``: for processes of this machine, never for a Ray job.
    """
    env: dict[str, str] = {}

    def walk(path: str, node: dict[str, Any], fields: dict[str, Any]) -> None:
        for key, value in node.items():
            dotted = f"{path}{key}"
            annotation = fields[key].annotation
            if isinstance(value, dict) and hasattr(annotation, "model_fields"):
                walk(f"{dotted}.", value, annotation.model_fields)
            elif secrets or dotted not in SECRET_SETTINGS:
                env[ENV_PREFIX + dotted.upper().replace(".", "__")] = _env_value(value)

    walk("", settings.model_dump(mode="json"), type(settings).model_fields)
    return env


def ray_address(settings: Settings) -> str:
    """The cluster a driver joins: ``RAY_ADDRESS`` (set inside Ray jobs, or any cluster's), else the stack's head."""
    return os.environ.get("RAY_ADDRESS") or f"{settings.stack.host}:{settings.ray.gcs_port}"


def load_runtime_file(settings: Settings) -> dict[str, Any]:
    """The JSON file named by ``ray.runtime_env`` (relative paths: from the repository root)."""
    path = settings.ray.runtime_env
    path = path if path.is_absolute() else REPO / path
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RuntimeError(f"cannot read the Ray runtime env {path}: {e}") from e


def runtime_env(settings: Settings) -> dict[str, Any]:
    """``runtime_env`` for ``JobSubmissionClient.submit_job``: the file, an absolute working_dir, Settings as env
    (secrets left out)."""
    env = load_runtime_file(settings)
    working_dir = Path(env.get("working_dir", "."))
    # The submitter's cwd may be anywhere; "." in the file means the repository root.
    env["working_dir"] = str(working_dir if working_dir.is_absolute() else (REPO / working_dir).resolve())
    env["env_vars"] = {**env.get("env_vars", {}), **settings_env(settings)}
    return env


def job_arguments(prog: str, description: str, option: str, help: str, argv: list[str] | None) -> tuple[Settings, str]:
    """(settings, the option's value) of a Ray job's entry point: ``<option> VALUE [--set section.field=value ...]``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(option, required=True, help=help)
    parser.add_argument("--set", action="append", default=[], help="settings override section.field=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return load_settings(args.set), getattr(args, option.lstrip("-"))


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
