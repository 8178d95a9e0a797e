"""A Ray Train worker process SIGKILLed mid-run (a real kill, not an exception): the run resumes from its
last checkpoint, and the step counter does not start again from 0.

    .venv/bin/pytest tests/faults/test_ray_worker_kill.py -q      # about two minutes on 2 cores

Per /work/shared/RAY_NOTES.md the controller registers a checkpoint only when it next polls the
workers, so the kill waits a few seconds after the first checkpoint reached S3.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import pytest
from mlflow import MlflowClient
from stream_stack import wait_for

from deploy.clients import boto3_s3
from schemas.events import RetrainRequest
from schemas.settings import with_overrides
from trainer.model import build_tiny_llama
from trainer.registry import bootstrap
from trainer.retrain import run

pytestmark = pytest.mark.integration

TINY_TRAIN = {
    "num_workers": 2, "max_steps": 8, "checkpoint_every_steps": 2, "micro_batch_size": 2, "max_length": 64,
    "val_rows": 4, "replay_min_rows": 32, "replay_ratio": 2.0, "warmup_steps": 1, "lora": {"r": 4, "alpha": 8},
    "max_failures": 2,
}  # fmt: skip
REGISTER_DELAY_S = 4.0
"""Wait after a checkpoint lands before killing: a kill within about 2 s of a report loses that checkpoint."""


def _has_checkpoint(settings, request_id: str) -> bool:
    listing = boto3_s3(settings).list_objects_v2(Bucket=settings.s3.checkpoints_bucket, Prefix=f"ray/{request_id}/")
    return any(item["Key"].endswith("checkpoint.ckpt") for item in listing.get("Contents", []))


def _worker_pids(settings, job_id: str) -> set[int]:
    """Live RayTrainWorker processes of this test's Ray job only (other tests may train on the same head)."""
    from ray.util.state import list_actors

    actors = list_actors(address=settings.ray.address, filters=[("class_name", "=", "RayTrainWorker"),
                                                              ("state", "=", "ALIVE"), ("job_id", "=", job_id)])
    return {actor.pid for actor in actors}


class WorkerKiller(threading.Thread):
    """Once the run has a checkpoint, SIGKILL one of its workers; then see a new worker group come up."""

    def __init__(self, settings, request_id: str):
        super().__init__(name="worker-killer", daemon=True)
        self.settings, self.request_id = settings, request_id
        self.killed: int | None = None
        self.replaced = False
        self.error: BaseException | None = None

    def run(self) -> None:
        import ray

        try:
            wait_for(ray.is_initialized, 600, "the run to join Ray", every=0.5)
            job_id = ray.get_runtime_context().get_job_id()
            wait_for(lambda: _has_checkpoint(self.settings, self.request_id), 600, "a first checkpoint", every=0.5)
            time.sleep(REGISTER_DELAY_S)
            workers = wait_for(lambda: _worker_pids(self.settings, job_id), 60, "live workers")
            self.killed = min(workers)
            os.kill(self.killed, signal.SIGKILL)
            wait_for(lambda: _worker_pids(self.settings, job_id) - workers, 300, "a restarted worker group", every=1)
            self.replaced = True
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            self.error = e


def test_sigkill_of_a_ray_worker_resumes_from_the_last_checkpoint(stack, tmp_path):
    settings = with_overrides(stack, {"mlflow": {"registered_model": f"t-faults-ray-{uuid.uuid4().hex[:8]}"},
                                      "train": TINY_TRAIN})
    bootstrap(settings, from_path=build_tiny_llama(tmp_path / "tiny"))
    request = RetrainRequest(request_id=f"rr-fault-{uuid.uuid4().hex[:10]}", reason="manual", watermark=0)
    killer = WorkerKiller(settings, request.request_id)
    killer.start()
    adapter = run(settings, request)
    killer.join(timeout=60)

    assert killer.error is None, repr(killer.error)
    assert killer.killed is not None and killer.replaced, "a worker was killed and its group restarted"
    history = MlflowClient(settings.mlflow.tracking_uri).get_metric_history(adapter.run_id, "step")
    steps = sorted(int(m.value) for m in history)
    assert adapter.steps == TINY_TRAIN["max_steps"] and set(steps) == set(range(1, TINY_TRAIN["max_steps"] + 1))
    assert steps.count(1) == steps.count(2) == 1, f"resumed from a checkpoint, not from step 0: {steps}"
