"""Nodes join and leave: a second Ray node (``stack add-node``) takes one of two SPREAD workers; SIGKILLing that
node's whole process tree after the first S3 checkpoint resumes the run from it on the head alone.

    .venv/bin/pytest tests/faults/test_ray_node_kill.py -q      # a few minutes on 2 cores

Built like test_ray_worker_kill.py (its helpers), with a node lost instead of a worker process.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid

import psutil
import pytest
from mlflow import MlflowClient
from stream_stack import wait_for
from test_ray_worker_kill import REGISTER_DELAY_S, TINY_TRAIN, _has_checkpoint

from deploy import process, ray_nodes
from schemas.events import RetrainRequest
from schemas.settings import with_overrides
from trainer.model import build_tiny_llama
from trainer.registry import bootstrap
from trainer.retrain import run

pytestmark = pytest.mark.integration


def _worker_group(settings, job_id: str, without: str = "") -> list[str] | None:
    """Node ids of the job's live RayTrainWorkers once a whole group runs (none on node ``without``), else None."""
    from ray.util.state import list_actors

    filters = [("class_name", "=", "RayTrainWorker"), ("job_id", "=", job_id), ("state", "=", "ALIVE")]
    nodes = [actor.node_id for actor in list_actors(address=settings.ray.address, filters=filters)]
    return nodes if len(nodes) == TINY_TRAIN["num_workers"] and without not in nodes else None


def _kill_tree(settings, name: str) -> None:
    root = psutil.Process(process.running_pid(settings.stack.home, name))
    for proc in [root, *root.children(recursive=True)]:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


class NodeKiller(threading.Thread):
    """Once both workers run on different nodes and a checkpoint is in S3, SIGKILL the added node's tree."""

    def __init__(self, settings, request_id: str, node: tuple[str, str]):
        super().__init__(name="node-killer", daemon=True)
        self.settings, self.request_id, (self.name_, self.node_id) = settings, request_id, node
        self.first_nodes: list[str] = []
        self.after: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        import ray

        try:
            wait_for(ray.is_initialized, 600, "the run to join Ray", every=0.5)
            job_id = ray.get_runtime_context().get_job_id()
            self.first_nodes = wait_for(lambda: _worker_group(self.settings, job_id), 600, "a worker group")
            wait_for(lambda: _has_checkpoint(self.settings, self.request_id), 600, "a first checkpoint", every=0.5)
            time.sleep(REGISTER_DELAY_S)
            _kill_tree(self.settings, self.name_)
            self.after = wait_for(lambda: _worker_group(self.settings, job_id, without=self.node_id), 300,
                                  "a worker group on the remaining node", every=1)  # fmt: skip
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            self.error = e


def test_a_lost_node_resumes_the_spread_run_from_its_last_s3_checkpoint(stack, tmp_path):
    train = {**TINY_TRAIN, "placement_strategy": "SPREAD"}
    settings = with_overrides(stack, {"mlflow": {"registered_model": f"t-faults-node-{uuid.uuid4().hex[:8]}"},
                                      "train": train})  # fmt: skip
    bootstrap(settings, from_path=build_tiny_llama(tmp_path / "tiny"))
    node = ray_nodes.add_node(settings)
    try:
        request = RetrainRequest(request_id=f"rr-node-{uuid.uuid4().hex[:10]}", reason="manual", watermark=0)
        killer = NodeKiller(settings, request.request_id, node)
        killer.start()
        adapter = run(settings, request)
        killer.join(timeout=60)
    finally:
        process.stop(settings.stack.home, node[0])

    assert killer.error is None, repr(killer.error)
    assert len(killer.first_nodes) == 2 and node[1] in killer.first_nodes, f"one worker per node: {killer.first_nodes}"
    assert len(set(killer.first_nodes)) == 2 and node[1] not in killer.after
    history = MlflowClient(settings.mlflow.tracking_uri).get_metric_history(adapter.run_id, "step")
    steps = sorted(int(m.value) for m in history)
    assert adapter.steps == train["max_steps"] and set(steps) == set(range(1, train["max_steps"] + 1))
    assert steps.count(1) == steps.count(2) == 1, f"resumed from a checkpoint, not from step 0: {steps}"
