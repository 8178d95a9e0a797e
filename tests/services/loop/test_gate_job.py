"""The gate runs as a Ray job that a restarted orchestrator reattaches to, on the real stack (Ray, MLflow, Kafka, PG).

A training run made the way the trainer makes it (adapter + ``trained_adapter.json``) and a finished training job
stand in for the expensive training; the gate job itself is the real ``python -m evaluator.gate_job``.
"""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path

import pytest
from ray.job_submission import JobStatus, JobSubmissionClient
from stream_stack import close_env, open_env, read_topic, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "evaluator"))  # the evaluator's candidate builders

from eval_fixtures import CHEAP_EVAL, PASS_RULES, log_candidate, save_adapter, write_rules  # noqa: E402

from deploy.registry import CHAMPION, KIND_TAG, REQUEST_TAG, mlflow_client  # noqa: E402
from schemas.events import RetrainRequest, RetrainStatus  # noqa: E402
from services.loop.orchestrator import (  # noqa: E402
    Orchestrator,
    gate_submission_id,
    next_request,
    record_request,
    set_state,
    submission_id,
)
from services.stream.publisher import make_producer  # noqa: E402
from trainer.model import build_tiny_llama  # noqa: E402
from trainer.registry import bootstrap  # noqa: E402

pytestmark = pytest.mark.integration


def _trained_request(env, tmp_path: Path) -> tuple[RetrainRequest, str]:
    """A stored request whose training job SUCCEEDED and whose MLflow run holds a real adapter."""
    settings = env.settings
    tiny = build_tiny_llama(tmp_path / "tiny")
    base = bootstrap(settings, from_path=tiny)
    candidate = log_candidate(settings, save_adapter(tiny, tmp_path / "adapter", 0), base, None)
    request = RetrainRequest(request_id=candidate.lineage.request_id, reason="manual", watermark=0)
    client = mlflow_client(settings)
    client.set_tag(candidate.run_id, REQUEST_TAG, request.request_id)
    client.set_tag(candidate.run_id, KIND_TAG, "retrain")
    engine = env.engine()
    record_request(engine, request)
    train_id = submission_id(settings.mlflow.registered_model, request.request_id, 1)
    jobs = JobSubmissionClient(settings.ray.address)
    jobs.submit_job(entrypoint="python -c pass", submission_id=train_id)
    set_state(engine, request.request_id, state="started", ray_job_id=train_id, attempts=1)
    wait_for(lambda: jobs.get_job_status(train_id) == JobStatus.SUCCEEDED, 120, "the stand-in training job", every=1)
    engine.dispose()
    return request, candidate.run_id


def _orchestrator(settings, engine) -> Orchestrator:
    """A fresh process's clients: nothing but the database and Ray carry over a restart."""
    producer = make_producer(settings, client_id=f"gate-test-{uuid.uuid4().hex[:6]}")
    return Orchestrator(settings, engine, JobSubmissionClient(settings.ray.address), producer)


def test_a_restarted_orchestrator_reattaches_to_the_running_gate_job(stack, tmp_path):
    suffix = uuid.uuid4().hex[:8]
    rules = write_rules(tmp_path / "rules.json", PASS_RULES)
    env = open_env(
        stack,
        {
            "mlflow.registered_model": f"gate-{suffix}",
            "mlflow.experiment": f"gate-{suffix}",
            "evaluate.promotion": "auto",
            "evaluate.gate_rules": str(rules),
            **{f"evaluate.{k}": v for k, v in CHEAP_EVAL.items()},
        },
    )
    settings, engine = env.settings, env.engine()
    try:
        request, run_id = _trained_request(env, tmp_path)
        first = _orchestrator(settings, engine)
        first.tick()  # training SUCCEEDED: the gate id is recorded, then the gate job submitted
        row = next_request(engine)
        gate_id = gate_submission_id(settings.mlflow.registered_model, request.request_id, 1)
        assert (row.state, row.gate_job_id, row.run_id) == ("evaluating", gate_id, run_id)
        jobs = JobSubmissionClient(settings.ray.address)
        assert not jobs.get_job_status(gate_id).is_terminal()  # the crash below falls while the gate runs
        first.producer.close()  # the orchestrator dies; its successor knows only the database and Ray

        second = _orchestrator(settings, engine)
        deadline = time.monotonic() + 600
        while (row := next_request(engine)) is not None and time.monotonic() < deadline:
            second.tick()
            time.sleep(2)
        second.producer.close()
        assert row is None, f"still {row.state}: {row.detail}"

        ours = submission_id(settings.mlflow.registered_model, request.request_id, 1)
        submitted = sorted(j.submission_id for j in jobs.list_jobs() if (j.submission_id or "").startswith(ours))
        assert submitted == [ours, gate_id]  # one training job, one gate job: reattached, not resubmitted
        versions = mlflow_client(settings).search_model_versions(f"name = '{settings.mlflow.registered_model}'")
        assert sorted(v.run_id for v in versions if v.run_id == run_id) == [run_id]  # registered once
        phases = [RetrainStatus.model_validate_json(r.value) for r in read_topic(settings, settings.kafka.status_topic)]
        assert [(s.phase, s.run_id) for s in phases] == [("succeeded", run_id), ("promoted", run_id)]
        assert (
            phases[-1].model_version
            == mlflow_client(settings).get_registered_model(settings.mlflow.registered_model).aliases[CHAMPION]
        )
    finally:
        engine.dispose()
        close_env(env)
