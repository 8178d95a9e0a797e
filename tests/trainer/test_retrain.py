"""The real distributed path on CPU: Ray Train (2 gloo workers) + Lightning + S3 checkpoints + MLflow.

A worker failing mid-run and resuming from its checkpoint is tests/faults/test_ray_worker_kill.py
(a real SIGKILL); here an injected fault with no retries left fails the run, and a resubmission resumes it.

Slow (a Ray run takes about a minute here): run with ``pytest tests/trainer/test_retrain.py -x -q``.
"""

import json
import re
import shlex
import time
import uuid

import pytest
from mlflow import MlflowClient
from test_snapshot_reader import EVAL, TRAIN, jsonl, upload_snapshot

from deploy.clients import boto3_s3
from deploy.registry import BASE_VERSION_TAG, REQUEST_TAG
from schemas.artifacts import TRAINED_ADAPTER_FILE, TrainedAdapter
from schemas.events import RetrainRequest
from schemas.settings import with_overrides
from trainer import tracking
from trainer.registry import bootstrap
from trainer.retrain import adapter_lora, check_lora_shape, effective_settings, main, run


def ray_test(fn):
    """Needs the stack and takes about a minute per Ray run."""
    return pytest.mark.integration(pytest.mark.slow(fn))

TINY_TRAIN = {
    "num_workers": 2, "max_steps": 4, "checkpoint_every_steps": 2, "micro_batch_size": 2, "max_length": 64,
    "val_rows": 4, "replay_min_rows": 16, "replay_ratio": 2.0, "warmup_steps": 1, "lora": {"r": 4, "alpha": 8},
}  # fmt: skip


@pytest.fixture(scope="module")
def settings(stack, tiny_model_dir):
    """The stack with a registered model of its own whose champion is the tiny base."""
    settings = with_overrides(
        stack, {"mlflow": {"registered_model": f"t-retrain-{uuid.uuid4().hex[:8]}"}, "train": TINY_TRAIN}
    )
    bootstrap(settings, from_path=tiny_model_dir)
    return settings


def _request(**overrides) -> RetrainRequest:
    return RetrainRequest(
        request_id=f"rr-test-{uuid.uuid4().hex[:10]}", reason="manual", watermark=0, overrides=overrides
    )


def _steps_logged(settings, run_id: str) -> list[int]:
    return sorted(int(m.value) for m in MlflowClient(settings.mlflow.tracking_uri).get_metric_history(run_id, "step"))


def _submit_job(settings, request: RetrainRequest) -> tuple[str, str]:
    """Run ``python -m trainer.retrain --request <json>`` through the Ray Jobs API; (final status, log tail)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from deploy.ray_env import runtime_env

    client = JobSubmissionClient(settings.ray.address)
    entrypoint = f"python -m trainer.retrain --request {shlex.quote(request.model_dump_json())}"
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env(settings))
    deadline = time.monotonic() + 600
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, f"job {job_id} still {status}"
        time.sleep(2)
    return str(status.value), client.get_job_logs(job_id)[-5000:]


def _checkpoint_keys(settings, request_id: str) -> list[str]:
    listing = boto3_s3(settings).list_objects_v2(Bucket=settings.s3.checkpoints_bucket, Prefix=f"ray/{request_id}/")
    return [obj["Key"] for obj in listing.get("Contents", [])]


def test_lora_shape_clash_with_the_champion_adapter_fails_fast(tmp_path):
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"r": 16, "lora_alpha": 32, "target_modules": ["v_proj", "q_proj"]})
    )
    adapter = adapter_lora(tmp_path)
    assert adapter == {"r": 16, "alpha": 32, "target_modules": ("q_proj", "v_proj")}
    check_lora_shape(
        _request(train={"lora": {"r": 16, "dropout": 0.2, "target_modules": ["v_proj", "q_proj"]}}), adapter
    )
    with pytest.raises(ValueError, match=r"'r': \(8, 16\)"):
        check_lora_shape(_request(train={"lora": {"r": 8}}), adapter)


def test_request_json_and_overrides_reach_the_settings():
    from schemas.settings import load_settings

    request = RetrainRequest.model_validate_json(_request(train={"lr": 1e-3}).model_dump_json())
    settings = effective_settings(load_settings(), request)
    assert settings.train.lr == 1e-3 and settings.stack.home.is_absolute()


@pytest.mark.parametrize("bad", ['{"reason": "manual"}', '{"request_id": "x", "reason": "bored", "watermark": 0}'])
def test_bad_request_json_is_refused_by_the_ray_entry_point(bad):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        main(["--request", bad])


def test_the_ray_entry_point_takes_json_only_never_a_store_id():
    """A worker never opens the service store: an id is resolved by ``medretrain train`` before submission."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        main(["--request", "rr-threshold-1200-ab12cd34ef567890"])


@ray_test
def test_two_workers_train_log_adapter_and_checkpoint_to_s3(settings):
    snapshot_id = upload_snapshot(settings, {"train.jsonl": jsonl(TRAIN), "eval.jsonl": jsonl(EVAL)})
    # Accumulation and bf16 autocast from the request: the params must record what the workers ran, not the defaults.
    # 4 steps x 2 micro-batches x 2 rows x 2 ranks read 32 rows: 35 rows keep that within one pass (disjoint ranks).
    train = {"keep_checkpoints": 1, "gradient_accum": 2, "precision": "bf16-mixed", "replay_min_rows": 32}
    request = _request(train=train).model_copy(update={"snapshot_id": snapshot_id})
    adapter = run(settings, request)

    assert adapter.steps == 4 and adapter.train_loss is not None and adapter.val_loss is not None
    assert adapter.lineage.snapshot_id == snapshot_id and adapter.lineage.parent_version == "1"
    assert adapter.lineage.kafka_offsets == {"qa.events:0": 4}
    client = MlflowClient(settings.mlflow.tracking_uri)
    mlflow_run = client.get_run(adapter.run_id)
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.tags[REQUEST_TAG] == request.request_id
    assert mlflow_run.data.tags["lineage.snapshot_id"] == snapshot_id
    params = mlflow_run.data.params
    assert (params["lora_r"], params["num_gpus"], params["num_workers"]) == ("4", "0", "2")
    assert (params["gradient_accum"], params["mixed_precision"]) == ("2", "bf16-mixed")
    assert params["global_batch_size"] == "8"  # micro-batch 2 x accumulation 2 x 2 workers
    assert {"tokens_per_s", "time_per_iter", "peak_memory_mb", "lr", "val_loss"} <= set(mlflow_run.data.metrics)
    files = {a.path for a in client.list_artifacts(adapter.run_id, "adapter")}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/tokenizer.json"} <= files
    assert (
        json.loads(open(client.download_artifacts(adapter.run_id, "train_config.json")).read())["train"]["max_steps"]
        == 4
    )
    handed_off = TrainedAdapter.model_validate_json(
        open(client.download_artifacts(adapter.run_id, TRAINED_ADAPTER_FILE)).read()
    )
    assert handed_off == adapter  # the evaluator's input is the trainer's output, not rebuilt from tags

    rows = json.loads(open(client.download_artifacts(adapter.run_id, "data/rows_by_rank.json")).read())
    assert set(rows) == {"0", "1"} and rows["0"] and not set(rows["0"]) & set(rows["1"])
    keys = _checkpoint_keys(settings, request.request_id)
    assert any(k.endswith("checkpoint.ckpt") for k in keys)
    assert len({k.split("/")[2] for k in keys if k.count("/") >= 3}) == 1  # keep_checkpoints pruned the first


@ray_test
def test_resubmitting_an_interrupted_or_finished_request_resumes(settings):
    request = _request(train={"fault_at_step": 3, "max_failures": 0})
    with pytest.raises(Exception, match="injected fault"):
        run(settings, request)
    run_id = tracking.find_run(settings, REQUEST_TAG, request.request_id, kind="retrain")
    assert MlflowClient(settings.mlflow.tracking_uri).get_run(run_id).info.status == "FAILED"

    # Resubmitted the way the orchestrator does it: a Ray job running `python -m trainer.retrain`.
    status, logs = _submit_job(settings, request)
    assert status == "SUCCEEDED", logs
    assert MlflowClient(settings.mlflow.tracking_uri).get_run(run_id).info.status == "FINISHED"
    assert _steps_logged(settings, run_id) == [1, 2, 3, 3, 4]

    again = run(settings, request)
    assert again.run_id == run_id and again.steps == 4
    assert _steps_logged(settings, run_id) == [1, 2, 3, 3, 4]


@ray_test
def test_cli_train_then_a_retrain_continues_the_champion_adapter(settings):
    """Last in this module: it makes an adapter version the champion of the module's registered model."""
    from typer.testing import CliRunner

    from deploy.ray_env import settings_env
    from services.cli import build_app

    result = CliRunner().invoke(build_app(), ["train", "--reason", "manual"], env=settings_env(settings))
    assert result.exit_code == 0, result.output
    first_run = re.search(r'"run_id": "(\w+)"', result.output).group(1)  # Ray's own log lines surround the JSON
    client, name = MlflowClient(settings.mlflow.tracking_uri), settings.mlflow.registered_model
    assert client.get_run(first_run).data.tags[REQUEST_TAG].startswith("rr-manual-0-")

    tags = {"kind": "adapter", "base_version": "1", "parent_version": "1"}
    version = client.create_model_version(name, f"runs:/{first_run}/adapter", first_run, tags=tags).version
    client.set_registered_model_alias(name, "champion", version)

    with pytest.raises(ValueError, match="champion's adapter"):
        run(settings, _request(train={"lora": {"r": 8}}))
    second = run(settings, _request(train={"lora": {"dropout": 0.1}}))
    params = client.get_run(second.run_id).data.params
    assert second.lineage.parent_version == str(version)
    assert params["adapter_init"] == f"continued v{version}" and params["lora_r"] == "4"
    assert client.get_run(second.run_id).data.tags[BASE_VERSION_TAG] == "1"
