"""Where one retrain's time went, read back from the systems that recorded it.

    timeline = retrain_timeline(settings, request_id, started, final)   # started / final: RetrainStatus events

Each point comes from the store (threshold row, snapshot, publication), ``retrain.status``,
Ray (job start and end), MLflow (driver's run, per-step metrics, the gate's step times and
decision time), never from a caller's own clock, so the demo's summary explains its figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from schemas.events import RetrainStatus
from schemas.settings import Settings

GATE_STEPS = ("champion", "candidate")
"""``eval.seconds.<step>`` metrics the evaluator logs on the candidate run, in the order they ran."""


@dataclass(frozen=True)
class Timeline:
    stages: list[tuple[str, float]]
    """Consecutive stages from the threshold crossing to the final status; they add up to ``total_s``."""
    total_s: float
    trigger_latency_s: float
    """Threshold crossed (its row stored) -> Ray job submitted."""
    ray_job_s: float
    training_s: float
    """First optimizer step to the last validation (checkpoints between included): training itself."""

    @property
    def outside_ray_job_s(self) -> float:
        """Snapshot, submit, evaluate, register: everything but the Ray job."""
        return self.total_s - self.ray_job_s

    @property
    def outside_training_s(self) -> float:
        return self.total_s - self.training_s


def _trigger_points(settings: Settings, request_id: str) -> tuple[float, float, float]:
    """(threshold row stored, snapshot recorded, request published) as epoch seconds."""
    from sqlalchemy import select

    from services.store import QAEventRow, RetrainRequestRow, SnapshotRow, as_utc, make_engine

    engine = make_engine(settings)
    with engine.connect() as conn:
        request = conn.execute(select(RetrainRequestRow).where(RetrainRequestRow.request_id == request_id)).one()
        snapshot = conn.execute(select(SnapshotRow).where(SnapshotRow.snapshot_id == request.snapshot_id)).one()
        rows = (
            select(QAEventRow.ingested_at).where(QAEventRow.row_id >= snapshot.min_row_id).order_by(QAEventRow.row_id)
        )
        crossing = conn.execute(rows.offset(settings.trigger.threshold - 1).limit(1)).scalar_one()
    engine.dispose()
    return tuple(as_utc(t).timestamp() for t in (crossing, snapshot.created_at, request.published_at))


def training_window(client, run_id: str) -> tuple[float, float, int]:
    """(first step began, last step or validation ended, steps) from the run's per-step metrics."""
    steps = sorted(client.get_metric_history(run_id, "step"), key=lambda m: m.timestamp)
    first_step = min(client.get_metric_history(run_id, "time_per_iter"), key=lambda m: m.timestamp)
    last = max(m.timestamp for m in [*steps, *client.get_metric_history(run_id, "val_loss")])
    return steps[0].timestamp / 1000 - first_step.value, last / 1000, int(steps[-1].value)


def retrain_timeline(settings: Settings, request_id: str, started: RetrainStatus, final: RetrainStatus) -> Timeline:
    """The stages of a finished retrain whose job ``started`` announced and ``final`` concluded."""
    from ray.job_submission import JobSubmissionClient

    from deploy.registry import mlflow_client
    from evaluator.evaluate import RUN_TAG_PREFIX

    crossed, snapshot, published = _trigger_points(settings, request_id)
    job = JobSubmissionClient(settings.ray.address).get_job_info(started.ray_job_id)
    client = mlflow_client(settings)
    run = client.get_run(final.run_id)
    train_from, train_to, steps = training_window(client, final.run_id)
    decided = datetime.fromisoformat(run.data.tags[f"{RUN_TAG_PREFIX}.decided_at"]).timestamp()
    gate = [run.data.metrics.get(f"eval.seconds.{step}", 0.0) for step in GATE_STEPS]
    points = [
        ("trigger: threshold check, snapshot to S3", snapshot),
        ("trigger: request recorded and published", published),
        ("orchestrator: request picked up, Ray job submitted", started.at.timestamp()),
        ("Ray job: driver start-up (runtime env, imports, MLflow run)", run.info.start_time / 1000),
        ("Ray job: data, worker group, model load", train_from),
        (f"Ray job: training, {steps} steps with validation and checkpoints", train_to),
        ("Ray job: last checkpoint, adapter upload, driver exit", job.end_time / 1000),
        ("gate: job end seen, eval sets read, champion resolved", decided - sum(gate)),
        ("gate: champion scored (sets cached on its run are reused)", decided - gate[1]),
        ("gate: candidate scored", decided),
        ("gate: decision, report, registration, promotion", final.at.timestamp()),
    ]
    stages, previous = [], crossed
    for name, at in points:
        stages.append((name, at - previous))
        previous = at
    return Timeline(
        stages=stages,
        total_s=final.at.timestamp() - crossed,
        trigger_latency_s=started.at.timestamp() - crossed,
        ray_job_s=(job.end_time - job.start_time) / 1000,
        training_s=train_to - train_from,
    )
