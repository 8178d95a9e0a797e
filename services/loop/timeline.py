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
COMPILE_STAGE = "Ray job: first step beyond a steady step (compile)"
"""Its floor is 0: a compile cache hit leaves the first step about as long as the others."""
WORKER_POINTS = ("model_loaded", "data_ready")
"""``timeline.<point>`` metrics rank 0 logs inside the Ray job (trainer.callbacks.StepMetrics), in order."""


@dataclass(frozen=True)
class StepFigures:
    """What the run's per-step metrics say about its training."""

    steps: int
    tokens: float
    """Real (unpadded) tokens trained on, all ranks."""
    tokens_per_s: float
    """Median rate of the steps after the first (the first pays compilation)."""
    first_step_s: float
    step_s: float
    """Median seconds of a step after the first."""

    @property
    def compile_s(self) -> float:
        """The first step's time beyond a steady step: compilation (and first-touch allocations)."""
        return max(0.0, self.first_step_s - self.step_s)


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
    floors: dict[str, float]
    """Stage name -> the seconds it could take at best, where the run measured a rate to say so."""
    steps: StepFigures | None = None

    @property
    def outside_ray_job_s(self) -> float:
        """Snapshot, submit, evaluate, register: everything but the Ray job."""
        return self.total_s - self.ray_job_s

    @property
    def outside_training_s(self) -> float:
        return self.total_s - self.training_s


def _trigger_points(settings: Settings, request_id: str) -> tuple[tuple[float, float, float], str | None]:
    """((round start, snapshot recorded, request published) as epoch seconds, the gate's Ray job id).

    A threshold round starts when the row that crossed the threshold was stored; any other request
    (manual, drift) when it was recorded.
    """
    from sqlalchemy import select

    from services.store import QAEventRow, RetrainRequestRow, SnapshotRow, as_utc, make_engine

    engine = make_engine(settings)
    with engine.connect() as conn:
        request = conn.execute(select(RetrainRequestRow).where(RetrainRequestRow.request_id == request_id)).one()
        snapshot = conn.execute(select(SnapshotRow).where(SnapshotRow.snapshot_id == request.snapshot_id)).one()
        crossing = request.created_at
        if request.reason == "threshold":
            since = select(QAEventRow.ingested_at).where(QAEventRow.row_id >= snapshot.min_row_id)
            rows = since.order_by(QAEventRow.row_id)
            crossing = conn.execute(rows.offset(settings.trigger.threshold - 1).limit(1)).scalar_one()
    engine.dispose()
    points = tuple(as_utc(t).timestamp() for t in (crossing, snapshot.created_at, request.published_at))
    return points, request.gate_job_id


def _history(client, run_id: str, key: str) -> list:
    return sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)


def training_window(client, run_id: str) -> tuple[float, float, int]:
    """(first step began, last step or validation ended, steps) from the run's per-step metrics."""
    steps = _history(client, run_id, "step")
    first_step = _history(client, run_id, "time_per_iter")[0]
    last = max(m.timestamp for m in [*steps, *_history(client, run_id, "val_loss")])
    return steps[0].timestamp / 1000 - first_step.value, last / 1000, int(steps[-1].value)


def step_figures(client, run_id: str) -> StepFigures:
    """Tokens, steady rate and the first step's extra time, from ``time_per_iter`` and ``tokens_per_s``."""
    from statistics import median

    times = [m.value for m in _history(client, run_id, "time_per_iter")]
    rates = [m.value for m in _history(client, run_id, "tokens_per_s")]
    steady = list(zip(times[1:], rates[1:], strict=True)) or [(times[0], rates[0])]
    return StepFigures(
        steps=len(times),
        tokens=sum(t * r for t, r in zip(times, rates, strict=True)),
        tokens_per_s=median(r for _, r in steady),
        first_step_s=times[0],
        step_s=median(t for t, _ in steady),
    )


def _first_marks(client, run_id: str, points) -> dict[str, float]:
    """Epoch seconds of each ``timeline.<point>`` the run recorded (a resumed run: its first attempt's)."""
    from trainer.tracking import TIMELINE_METRIC

    marks = {}
    for point in points:
        history = _history(client, run_id, TIMELINE_METRIC.format(point=point))
        if history:
            marks[point] = history[0].timestamp / 1000
    return marks


def _job_points(client, run, job_end: float) -> list[tuple[str, float | None]]:
    """Points inside the Ray job; None for one an older trainer did not record (its stage joins the next)."""
    run_id = run.info.run_id
    train_from, train_to, steps = training_window(client, run_id)
    figures = step_figures(client, run_id)
    marks = _first_marks(client, run_id, (*WORKER_POINTS, "upload_started", "uploaded"))
    return [
        ("Ray job: driver start-up (runtime env, imports, MLflow run)", run.info.start_time / 1000),
        ("Ray job: rows read, worker group started, model loaded and LoRA attached", marks.get("model_loaded")),
        ("Ray job: rows tokenized and packed in the workers", marks.get("data_ready")),
        ("Ray job: process group, data loader, first batch", train_from),
        (COMPILE_STAGE, train_from + figures.compile_s),
        (f"Ray job: training, {steps} steps with validation and checkpoints", train_to),
        ("Ray job: last checkpoint, fit end", marks.get("upload_started")),
        ("Ray job: adapter upload", marks.get("uploaded")),
        ("Ray job: driver exit", job_end),
    ]


def _gate_points(settings: Settings, client, run, gate_job, final: RetrainStatus) -> list[tuple[str, float | None]]:
    """Points of the gate's Ray job ``gate_job`` (its JobDetails; None: the gate ran inside the orchestrator)."""
    from evaluator.decision import RUN_TAG_PREFIX
    from services.store import as_utc

    decided = datetime.fromisoformat(run.data.tags[f"{RUN_TAG_PREFIX}.decided_at"]).timestamp()
    gate = [run.data.metrics.get(f"eval.seconds.{step}", 0.0) for step in GATE_STEPS]
    registered = None
    if final.model_version:
        version = client.get_model_version(settings.mlflow.registered_model, final.model_version)
        registered = version.creation_timestamp / 1000
    started, ended = (gate_job.start_time / 1000, gate_job.end_time / 1000) if gate_job else (None, None)
    return [
        ("orchestrator: training job end seen, gate job submitted", started),
        ("gate: job start-up (runtime env, imports), eval sets read, champion resolved", decided - sum(gate)),
        ("gate: champion scored (sets cached on its run are reused)", decided - gate[1]),
        ("gate: candidate scored", decided),
        ("gate: decision and report recorded, version registered", registered),
        ("gate: aliases moved, job exit", ended),
        ("orchestrator: gate job end seen, final status published", as_utc(final.at).timestamp()),
    ]


def _stages(start: float, points: list[tuple[str, float | None]]) -> list[tuple[str, float]]:
    """Consecutive differences; a missing point's time goes to the next stage, which then names both."""
    stages, previous, pending = [], start, []
    for name, at in points:
        if at is None:
            pending.append(name)
            continue
        stages.append((" + ".join([*pending, name]) if pending else name, at - previous))
        previous, pending = at, []
    return stages


def retrain_timeline(settings: Settings, request_id: str, started: RetrainStatus, final: RetrainStatus) -> Timeline:
    """The stages of a finished retrain whose job ``started`` announced and ``final`` concluded."""
    from ray.job_submission import JobSubmissionClient

    from deploy.registry import mlflow_client

    (crossed, snapshot, published), gate_job_id = _trigger_points(settings, request_id)
    jobs = JobSubmissionClient(settings.ray.address)
    job = jobs.get_job_info(started.ray_job_id)
    gate_job = jobs.get_job_info(gate_job_id) if gate_job_id else None
    client = mlflow_client(settings)
    run = client.get_run(final.run_id)
    train_from, train_to, _ = training_window(client, final.run_id)
    figures = step_figures(client, final.run_id)
    points = [
        ("trigger: threshold check, snapshot to S3", snapshot),
        ("trigger: request recorded and published", published),
        ("orchestrator: request picked up, Ray job submitted", started.at.timestamp()),
        *_job_points(client, run, job.end_time / 1000),
        *_gate_points(settings, client, run, gate_job, final),
    ]
    stages = _stages(crossed, points)
    training = next(name for name, _ in stages if name.startswith("Ray job: training"))
    return Timeline(
        stages=stages,
        total_s=final.at.timestamp() - crossed,
        trigger_latency_s=started.at.timestamp() - crossed,
        ray_job_s=(job.end_time - job.start_time) / 1000,
        training_s=train_to - train_from,
        floors={training: figures.tokens / figures.tokens_per_s, COMPILE_STAGE: 0.0},
        steps=figures,
    )
