"""The seed's own command, verbatim, against the embedded stack: the venv's ``ray job submit --address <ray.address>
--runtime-env deploy/ray_runtime.json -- python -m trainer.retrain --request '<json>'`` trains a candidate that the
gate job (``python -m evaluator.gate_job``, submitted as the orchestrator does) registers; afterwards no secret is in
the Jobs API or Ray's logs.

    .venv/bin/pytest tests/trainer/test_seed_job.py -q       # about two minutes on 2 cores
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
import uuid

import pytest
from sqlalchemy.engine import make_url

from deploy.clients import credentials_file, database_url, ray_token_file
from deploy.embedded import venv_bin
from deploy.embedded.ray import auth_header, temp_dir
from deploy.registry import CHAMPION, REQUEST_TAG, alias_version, open_registry
from schemas.events import RetrainRequest
from schemas.settings import Settings, with_overrides
from trainer import tracking
from trainer.registry import bootstrap

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_TRAIN = {
    "num_workers": 2, "max_steps": 4, "checkpoint_every_steps": 2, "micro_batch_size": 2, "max_length": 64,
    "val_rows": 4, "replay_min_rows": 16, "replay_ratio": 2.0, "warmup_steps": 1, "lora": {"r": 4, "alpha": 8},
}  # fmt: skip
LENIENT_RULES = {"schema_version": 1, "rules": [
    {"name": "medquad_loss_finite", "metric": "medquad.loss", "kind": "value", "op": "<=", "threshold": 1e6},
]}  # fmt: skip
CHEAP_EVAL = {"sample_size": 2, "loss_rows": 4, "max_new_tokens": 4, "batch_size": 4, "promotion": "auto"}


def finished(client, job: str, timeout_s: float = 600) -> str:
    """The job's logs once it SUCCEEDED; fails with them otherwise."""
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    while not (status := client.get_job_status(job)).is_terminal():
        assert time.monotonic() < deadline, f"job {job} still {status} after {timeout_s:.0f} s"
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    return logs


def gate(settings: Settings, run_id: str):
    """(verdict, registered version): the gate job the orchestrator submits once a training job succeeded."""
    from ray.job_submission import JobSubmissionClient

    from deploy.ray_env import runtime_env
    from evaluator import promotion
    from evaluator.decision import read_decision

    client = JobSubmissionClient(settings.ray.address)
    entrypoint = f"python -m evaluator.gate_job --run {run_id}"
    finished(client, client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env(settings), entrypoint_num_cpus=1))
    return read_decision(settings, run_id)[0], promotion.registered_version(settings, run_id)


@pytest.fixture(scope="module")
def seed_job(stack, tiny_model_dir, tmp_path_factory):
    """(settings, request, ``ray job submit`` output) of one retrain through the seed's command."""
    rules = tmp_path_factory.mktemp("seed") / "rules.json"
    rules.write_text(json.dumps(LENIENT_RULES))
    overrides = {"mlflow": {"registered_model": f"t-seed-{uuid.uuid4().hex[:8]}"}, "train": TINY_TRAIN}
    settings = with_overrides(stack, {**overrides, "evaluate": {**CHEAP_EVAL, "gate_rules": str(rules)}})
    bootstrap(settings, from_path=tiny_model_dir)
    request = RetrainRequest(
        request_id=f"rr-seed-{uuid.uuid4().hex[:10]}", reason="manual", watermark=0, overrides=overrides
    )
    command = [venv_bin("ray"), "job", "submit", "--address", stack.ray.address,
               "--runtime-env", "deploy/ray_runtime.json",
               "--", "python", "-m", "trainer.retrain", "--request", request.model_dump_json()]  # fmt: skip
    # No MEDRETRAIN_* setting travels with the command: the job finds the stack through the cluster alone.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDRETRAIN_")}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    return settings, request, done.stdout


def test_the_seed_command_trains_a_version_the_gate_registers(seed_job) -> None:
    settings, request, output = seed_job
    assert "trained adapter" in output and "succeeded" in output.lower()
    run_id = tracking.find_run(settings, REQUEST_TAG, request.request_id, kind="retrain")
    assert run_id is not None, "the job's MLflow run carries the request id"
    verdict, version = gate(settings, run_id)
    client, name = open_registry(settings)
    assert verdict.passed and version is not None
    assert alias_version(client, name, CHAMPION) == version


def _secrets(settings: Settings) -> dict[str, str]:
    """This install's secret values: the stack's credentials file, Ray's token, the database password if any."""
    values = json.loads(credentials_file(settings).read_text())
    found = {k: v for k, v in values.items() if isinstance(v, str) and len(v) >= 12}
    found["ray_token"] = ray_token_file(settings).read_text().strip()
    if password := make_url(database_url(settings)).password:
        found["database_password"] = password
    return found


def _leaks(text: bytes, secrets: dict[str, str]) -> list[str]:
    return [name for name, value in secrets.items() if value.encode() in text]


def _worker_reaches_s3(settings: Settings) -> str:
    """An orchestrator-style job (``runtime_env(settings)``) whose settings name the S3 keys explicitly: the
    keys stay out of its spec, and the worker still reaches S3 (the stack's credentials file)."""
    from ray.job_submission import JobSubmissionClient

    from deploy.ray_env import runtime_env

    creds = json.loads(credentials_file(settings).read_text())
    explicit = with_overrides(
        settings, {"s3": {"access_key": creds["s3_access_key"], "secret_key": creds["s3_secret_key"]}}
    )
    script = ("from deploy.clients import boto3_s3; from schemas.settings import load_settings; "
              "print('buckets', len(boto3_s3(load_settings()).list_buckets()['Buckets']))")  # fmt: skip
    client = JobSubmissionClient(settings.ray.address)
    job = client.submit_job(entrypoint=f'python -c "{script}"', runtime_env=runtime_env(explicit))
    assert "buckets" in finished(client, job, timeout_s=300)
    return job


def test_no_secret_in_the_jobs_api_or_rays_logs(seed_job) -> None:
    from ray.job_submission import JobSubmissionClient

    settings, request, _ = seed_job
    secrets = _secrets(settings)
    _worker_reaches_s3(settings)
    jobs = JobSubmissionClient(settings.ray.address).list_jobs()
    ours = [job for job in jobs if request.request_id in (job.entrypoint or "")]
    assert ours and ours[0].runtime_env, "the seed job's record, with its runtime_env"
    records = json.dumps([job.dict() for job in jobs], default=str).encode()
    with urllib.request.urlopen(
        urllib.request.Request(settings.ray.address.rstrip("/") + "/api/jobs/", headers=auth_header(settings)),
        timeout=10,
    ) as response:
        records += response.read()  # what the dashboard shows
    assert not _leaks(records, secrets), f"secrets in job records: {_leaks(records, secrets)}"
    logs = [path for path in (temp_dir(settings) / "session_latest" / "logs").glob("**/*") if path.is_file()]
    assert len(logs) > 10
    leaked = {str(path): names for path in logs if (names := _leaks(path.read_bytes(), secrets))}
    assert not leaked, f"secrets in Ray's logs: {leaked}"
