"""The whole loop on the real embedded stack with the tiny model.

Events past the threshold -> exactly one retrain -> a version with complete lineage ->
promoted (auto mode); a manual request with an override runs a second retrain, and
killing the orchestrator while its Ray job runs does not submit a second job (each attempt: one
training job, then one gate job).
"""

import json
import signal
import uuid

import pytest
from ray.job_submission import JobSubmissionClient
from sqlalchemy import select
from stream_stack import close_env, drop_bucket, open_env, read_topic, start_service, stop, wait_for

from deploy.registry import CHAMPION, REQUEST_TAG, alias_version, open_registry
from schemas.events import RetrainStatus
from services.loop.orchestrator import gate_submission_id, submission_id
from services.loop.timeline import retrain_timeline
from services.store import RetrainRequestRow
from services.stream.publisher import medquad_events, publish
from services.trigger.trigger import emit_manual
from trainer import tracking
from trainer.model import build_tiny_llama
from trainer.registry import bootstrap

pytestmark = pytest.mark.integration

LENIENT_RULES = {"schema_version": 1, "rules": [
    # The gate's own logic is tested in tests/evaluator; here any trained candidate may pass.
    {"name": "production_loss_bounded", "metric": "production.loss", "kind": "delta", "op": "<=", "threshold": 100.0,
     "on_missing": "pass"},
    {"name": "degenerate_bounded", "metric": "medquad.degenerate_rate", "kind": "value", "op": "<=", "threshold": 1.0},
]}


@pytest.fixture
def loop_env(stack, tmp_path):
    from deploy.clients import boto3_s3

    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps(LENIENT_RULES))
    suffix = uuid.uuid4().hex[:8]
    env = open_env(stack, {
        # Request ids follow from the data, the same in every session: runs and checkpoints a test stack
        # kept from an earlier session must not be found (and resumed) as this session's.
        "mlflow.experiment": f"loop-{suffix}", "s3.checkpoints_bucket": f"medretrain-checkpoints-{suffix}",
        "mlflow.registered_model": f"loop-{suffix}",
        "kafka.orchestrator_group": f"orchestrator-{uuid.uuid4().hex[:8]}",
        "trigger.threshold": 40, "trigger.cooldown_s": 0,
        "train.max_steps": 4, "train.micro_batch_size": 2, "train.max_length": 64, "train.warmup_steps": 1,
        "train.checkpoint_every_steps": 2, "train.val_rows": 4, "train.replay_min_rows": 8,
        "evaluate.promotion": "auto", "evaluate.sample_size": 2, "evaluate.loss_rows": 4,
        "evaluate.max_new_tokens": 4, "evaluate.gate_rules": str(rules),
    })
    boto3_s3(env.settings).create_bucket(Bucket=env.settings.s3.checkpoints_bucket)
    bootstrap(env.settings, from_path=build_tiny_llama(tmp_path / "tiny"))
    yield env
    drop_bucket(env.settings, env.settings.s3.checkpoints_bucket)
    close_env(env)


def statuses(settings) -> list[RetrainStatus]:
    return [RetrainStatus.model_validate_json(r.value) for r in read_topic(settings, settings.kafka.status_topic, 1500)]


def final_status(settings, request_id: str) -> RetrainStatus | None:
    return next((s for s in statuses(settings) if s.request_id == request_id
                 and s.phase in ("promoted", "rejected", "failed")), None)


def jobs_of(settings, request_id: str) -> list[str]:
    jobs = JobSubmissionClient(settings.ray.address).list_jobs()
    prefix = submission_id(settings.mlflow.registered_model, request_id, 1)[:-1]  # any attempt's id
    return sorted(j.submission_id for j in jobs if (j.submission_id or "").startswith(prefix))


def requests_in_store(env) -> list:
    engine = env.engine()
    with engine.connect() as conn:
        rows = conn.execute(select(RetrainRequestRow).order_by(RetrainRequestRow.created_at)).all()
    engine.dispose()
    return rows


def test_threshold_to_promotion_then_manual_retrain_survives_orchestrator_kill(loop_env, tmp_path):
    settings = loop_env.settings
    accumulator = start_service(loop_env, tmp_path / "accumulator.log", "accumulator", "--loglevel", "warn")
    orchestrator = start_service(loop_env, tmp_path / "orchestrator.log", "orchestrator")
    try:
        events = medquad_events(60, seed=3)
        publish(settings, events[:50])
        first = wait_for(lambda: [r for r in requests_in_store(loop_env) if r.reason == "threshold"], 120, "threshold")
        request_id = first[0].request_id
        done = wait_for(lambda: final_status(settings, request_id), 400, "the first retrain", every=3)
        assert done.phase == "promoted", done.detail
        assert [r.reason for r in requests_in_store(loop_env)] == ["threshold"]  # exactly one retrain
        model = settings.mlflow.registered_model
        assert jobs_of(settings, request_id) == [
            submission_id(model, request_id, 1),
            gate_submission_id(model, request_id, 1),
        ]
        started = next(s for s in statuses(settings) if s.request_id == request_id and s.phase == "started")
        timeline = retrain_timeline(settings, request_id, started, done)
        assert sum(seconds for _, seconds in timeline.stages) == pytest.approx(timeline.total_s)
        assert 0 < timeline.trigger_latency_s and 0 < timeline.training_s < timeline.ray_job_s < timeline.total_s

        client, name = open_registry(settings)
        assert alias_version(client, name, CHAMPION) == done.model_version != "1"
        tags = client.get_model_version(name, done.model_version).tags
        assert tags["lineage.parent_version"] == "1"
        assert tags["lineage.request_id"] == request_id
        assert tags["lineage.snapshot_id"] == first[0].snapshot_id
        assert settings.kafka.events_topic in tags["lineage.kafka_offsets"]

        publish(settings, events[50:])  # 10 new rows: below the threshold, in the manual snapshot
        manual = emit_manual(settings, "operator retrain with more steps", {"train": {"max_steps": 6}}, "test")
        wait_for(
            lambda: any(s.request_id == manual.request_id and s.phase == "started" for s in statuses(settings)),
            120,
            "the manual job to start",
            every=1,
        )
        orchestrator.send_signal(signal.SIGKILL)
        orchestrator.wait()
        orchestrator = start_service(loop_env, tmp_path / "orchestrator.log", "orchestrator")
        second = wait_for(lambda: final_status(settings, manual.request_id), 400, "the manual retrain", every=3)
        assert second.phase == "promoted", second.detail
        reattached = submission_id(model, manual.request_id, 1)
        assert jobs_of(settings, manual.request_id) == [reattached, gate_submission_id(model, manual.request_id, 1)]
        run_id = tracking.find_run(settings, REQUEST_TAG, manual.request_id, kind="retrain")
        assert tracking.run_param(settings, run_id, "max_steps") == "6"
        assert client.get_model_version(name, second.model_version).tags["lineage.parent_version"] == done.model_version
    finally:
        stop(orchestrator)
        stop(accumulator)
