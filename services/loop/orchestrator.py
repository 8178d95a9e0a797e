"""Orchestrator: ``retrain.requests`` -> Ray training job -> Ray gate job -> ``retrain.status``.

    medretrain serve orchestrator

State lives in the ``retrain_requests`` table, so a restarted orchestrator carries on
where it stopped. One retrain runs at a time. Each attempt has deterministic Ray
submission ids (``medretrain-<model>-<request>-a<n>`` for training, the same with ``-gate``
for the evaluator gate), each written to the database *before* its job is submitted: after a
crash the orchestrator finds the id, asks Ray for it and reattaches (or submits it, if the
crash came first) — never a second job for one attempt. The gate runs where training ran
(``python -m evaluator.gate_job``), so this process never loads torch. A failed job is retried
``orchestrator.max_attempts`` times, then marked failed with the reason; the registry is only
touched by the gate job, and the final phase is read back from the decision it recorded.
"""

from __future__ import annotations

import logging
import shlex
import threading
from dataclasses import dataclass

from kafka import KafkaConsumer
from pydantic import ValidationError
from sqlalchemy import insert, select, update
from sqlalchemy.engine import Engine, Row

from schemas.events import RetrainPhase, RetrainRequest, RetrainStatus, describe_errors, utcnow
from schemas.settings import Settings
from services.store import RetrainRequestRow, create_schema, make_engine

log = logging.getLogger(__name__)

TERMINAL_JOB_STATES = ("SUCCEEDED", "FAILED", "STOPPED")


def submission_id(model: str, request_id: str, attempt: int) -> str:
    """The Ray job of one attempt; a restarted orchestrator finds it again by this id.

    Request ids follow from the data, so the registered model is part of the id: two deployments (or test
    sessions) sharing one Ray cluster never mistake each other's jobs for their own.
    """
    return f"medretrain-{model}-{request_id}-a{attempt}"


def gate_submission_id(model: str, request_id: str, attempt: int) -> str:
    """The gate job that judges one training attempt's run."""
    return f"{submission_id(model, request_id, attempt)}-gate"


def record_request(engine: Engine, request: RetrainRequest) -> bool:
    """Store a request seen on the topic (the trigger usually stored it already); True while it awaits its first job."""
    with engine.begin() as conn:
        stmt = select(RetrainRequestRow.state, RetrainRequestRow.attempts)
        known = conn.execute(stmt.where(RetrainRequestRow.request_id == request.request_id)).first()
        if known:
            return known.state == "requested" and known.attempts == 0
        conn.execute(insert(RetrainRequestRow).values(
            request_id=request.request_id, reason=request.reason, watermark=request.watermark,
            snapshot_id=request.snapshot_id, request_json=request.model_dump(mode="json"), state="requested",
            published_at=utcnow(),
        ))
    return True


def next_request(engine: Engine) -> Row | None:
    """The retrain to work on: one already in a job (reattach) first, else the oldest requested."""
    with engine.connect() as conn:
        for state in ("evaluating", "started", "requested"):
            stmt = select(RetrainRequestRow).where(RetrainRequestRow.state == state)
            row = conn.execute(stmt.order_by(RetrainRequestRow.created_at).limit(1)).first()
            if row is not None:
                return row
    return None


def set_state(engine: Engine, request_id: str, **values) -> None:
    with engine.begin() as conn:
        conn.execute(update(RetrainRequestRow).where(RetrainRequestRow.request_id == request_id).values(**values))


@dataclass
class Orchestrator:
    """One process's clients; :meth:`tick` advances the current retrain by one observation."""

    settings: Settings
    engine: Engine
    jobs: object  # ray.job_submission.JobSubmissionClient
    producer: object  # kafka.KafkaProducer

    def publish(self, request_id: str, phase: RetrainPhase, **fields) -> None:
        status = RetrainStatus(request_id=request_id, phase=phase, **fields)
        self.producer.send(self.settings.kafka.status_topic, key=request_id.encode(),
                           value=status.model_dump_json().encode()).get(timeout=30)
        log.info("retrain %s: %s %s", request_id, phase, fields.get("detail", ""))

    def tick(self) -> bool:
        """Advance the current retrain; True while one is in progress."""
        row = next_request(self.engine)
        if row is None:
            return False
        if row.state == "requested":
            self.submit(row, row.attempts + 1)
        else:
            self.follow(row)
        return True

    def submit(self, row: Row, attempt: int) -> None:
        from deploy.ray_env import runtime_env

        job_id = submission_id(self.settings.mlflow.registered_model, row.request_id, attempt)
        # Once per request (not again when a refused submission is retried): the trigger may have stored
        # the row before this consumer saw the message.
        if attempt == 1 and row.state == "requested":
            self.publish(row.request_id, "requested", detail=row.reason)
        # Write-ahead: the id is durable before Ray hears of it, so a crash cannot lose track of a job.
        set_state(self.engine, row.request_id, state="started", ray_job_id=job_id, attempts=attempt,
                  detail=f"attempt {attempt} submitted")
        request = RetrainRequest.model_validate(row.request_json)
        entrypoint = f"python -m trainer.retrain --request {shlex.quote(request.model_dump_json())}"
        try:
            self.jobs.submit_job(entrypoint=entrypoint, submission_id=job_id, runtime_env=runtime_env(self.settings))
        except RuntimeError as e:
            if "already exists" not in str(e):
                # E.g. "No available agent to submit job" while Ray's agent (re)starts: the recorded id is
                # unknown to Ray, so the next look at the job (follow) submits this attempt again.
                log.warning("submitting %s failed (%s); trying again", job_id, e)
                return
            log.info("job %s was submitted before a restart; reattaching", job_id)
        self.publish(row.request_id, "started", ray_job_id=job_id, detail=f"attempt {attempt}")

    def follow(self, row: Row) -> None:
        gating = row.state == "evaluating"
        job_id = row.gate_job_id if gating else row.ray_job_id
        try:
            status = str(self.jobs.get_job_status(job_id))
        except RuntimeError:
            # Recorded but never reached Ray (crash between the two writes): submit that job now.
            log.info("job %s unknown to Ray; submitting it", job_id)
            if gating:
                self.submit_gate(row.run_id, job_id)
            else:
                self.submit(row, row.attempts)
            return
        status = status.rsplit(".", 1)[-1]
        if status not in TERMINAL_JOB_STATES:
            return
        if status != "SUCCEEDED":
            self.retry_or_fail(row, status, job_id)
        elif gating:
            self.conclude(row)
        else:
            self.start_gate(row)

    def retry_or_fail(self, row: Row, status: str, job_id: str | None = None) -> None:
        job_id = job_id or row.ray_job_id
        logs = self.jobs.get_job_logs(job_id)
        reason = f"Ray job {job_id} {status}: {_last_error(logs)}"
        if row.attempts < self.settings.orchestrator.max_attempts:
            set_state(self.engine, row.request_id, state="requested", detail=reason)
            log.warning("%s; retrying (%d/%d)", reason, row.attempts, self.settings.orchestrator.max_attempts)
            return
        set_state(self.engine, row.request_id, state="failed", detail=reason)
        self.publish(row.request_id, "failed", ray_job_id=row.ray_job_id, detail=reason[:2000])

    def start_gate(self, row: Row) -> None:
        """Training succeeded: find its run and hand it to a gate job."""
        from deploy.registry import REQUEST_TAG
        from trainer import tracking

        run_id = tracking.find_run(self.settings, REQUEST_TAG, row.request_id, kind="retrain")
        if run_id is None:
            self.retry_or_fail(row, "SUCCEEDED without an MLflow run")
            return
        gate_id = gate_submission_id(self.settings.mlflow.registered_model, row.request_id, row.attempts)
        # Write-ahead, as for training: a crash after this line reattaches to this gate job.
        set_state(self.engine, row.request_id, state="evaluating", run_id=run_id, gate_job_id=gate_id,
                  detail=f"attempt {row.attempts} trained; gate submitted")
        self.submit_gate(run_id, gate_id)

    def submit_gate(self, run_id: str, gate_id: str) -> None:
        """Submit the gate job judging ``run_id``: on the GPU when training uses one, else one CPU."""
        from deploy.ray_env import runtime_env

        resources = {"entrypoint_num_gpus": 1} if self.settings.train.use_gpu else {"entrypoint_num_cpus": 1}
        entrypoint = f"python -m evaluator.gate_job --run {shlex.quote(run_id)}"
        try:
            self.jobs.submit_job(entrypoint=entrypoint, submission_id=gate_id,
                                 runtime_env=runtime_env(self.settings), **resources)
        except RuntimeError as e:
            if "already exists" not in str(e):
                # As for training: the recorded id is unknown to Ray, so the next follow submits it again.
                log.warning("submitting gate %s failed (%s); trying again", gate_id, e)
                return
            log.info("gate %s was submitted before a restart; reattaching", gate_id)

    def conclude(self, row: Row) -> None:
        """The gate job ended: publish the phase its recorded decision gives."""
        from evaluator.decision import read_decision
        from evaluator.promotion import registered_version

        run_id = row.run_id
        verdict, _ = read_decision(self.settings, run_id)
        version = registered_version(self.settings, run_id)
        failed = "; ".join(r.name for r in verdict.rules if not r.passed)
        self.publish(row.request_id, "succeeded", run_id=run_id, model_version=version,
                     detail="gate passed" if verdict.passed else f"trained; gate failed: {failed}")
        phase = _final_phase(self.settings, verdict.passed)
        detail = {"promoted": "champion", "succeeded": "challenger awaiting review",
                  "rejected": f"gate failed: {failed}"}
        set_state(self.engine, row.request_id, state=phase, run_id=run_id, model_version=version, detail=detail[phase])
        if phase != "succeeded":
            self.publish(row.request_id, phase, run_id=run_id, model_version=version, detail=detail[phase])

    def dead_letter(self, record, error: ValidationError) -> None:
        """A request that can never run goes to the dead-letter topic with its reason, like a bad QA event."""
        from services.stream.ingest import Rejection, SourceRecord, dead_letter

        source = SourceRecord(record.topic, record.partition, record.offset, record.value)
        letter = dead_letter(source, Rejection("invalid_request", describe_errors(error)[:1000]))
        self.producer.send(self.settings.kafka.dlq_topic, key=record.key, value=letter.model_dump_json().encode()).get(
            timeout=30
        )
        log.error(
            "dead-lettered the retrain request at %s:%d:%d: %s",
            record.topic,
            record.partition,
            record.offset,
            letter.reason,
        )

    def consume(self, consumer: KafkaConsumer, timeout_ms: int) -> int:
        """Store the requests on the topic, waiting up to ``timeout_ms`` for one, then commit their offsets.

        Returns how many await a job. Waiting in the poll rather than in a sleep lets a request
        that arrives meanwhile be submitted at once.
        """
        new = 0
        for records in consumer.poll(timeout_ms=timeout_ms).values():
            for record in records:
                try:
                    request = RetrainRequest.model_validate_json(record.value)
                except ValidationError as e:
                    self.dead_letter(record, e)
                    continue
                new += record_request(self.engine, request)
        consumer.commit()  # after the database and dead-letter writes: a crash re-reads, and record_request dedupes
        return new


def _final_phase(settings: Settings, passed: bool) -> str:
    if not passed:
        return "rejected"
    # In review mode the version waits as challenger: training and the gate succeeded, a human promotes.
    return "promoted" if settings.evaluate.promotion == "auto" else "succeeded"


def _last_error(logs: str, lines: int = 5) -> str:
    tail = [line for line in logs.strip().splitlines() if line.strip()][-lines:]
    return " | ".join(tail)[-1500:] or "no log output"


def make_consumer(settings: Settings) -> KafkaConsumer:
    """The orchestrator group's consumer of the requests topic (offsets committed by :meth:`Orchestrator.consume`)."""
    return KafkaConsumer(
        settings.kafka.requests_topic,
        bootstrap_servers=settings.kafka.bootstrap,
        group_id=settings.kafka.orchestrator_group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=settings.kafka.session_timeout_ms,
        heartbeat_interval_ms=settings.kafka.heartbeat_interval_ms,
        # A tick submits or looks at a job; a slow registry or Ray call is the longest gap between polls.
        max_poll_interval_ms=int(settings.orchestrator.max_step_s * 1000),
    )


def serve(settings: Settings, stop: threading.Event | None = None) -> None:
    """Run until ``stop`` is set (or forever): consume requests, advance the current retrain."""
    from ray.job_submission import JobSubmissionClient

    from deploy.clients import ensure_topics, use_ray
    from services.stream.publisher import make_producer

    stop = stop or threading.Event()
    use_ray(settings)
    engine = make_engine(settings)
    create_schema(engine)
    ensure_topics(settings)
    consumer = make_consumer(settings)
    orchestrator = Orchestrator(
        settings,
        engine,
        JobSubmissionClient(settings.ray.address),
        make_producer(settings, client_id="medretrain-orchestrator"),
    )
    log.info("orchestrator consuming %s, Ray at %s", settings.kafka.requests_topic, settings.ray.address)
    try:
        busy = False
        while not stop.is_set():
            # While a job runs, look at it often: its end starts the gate, and each look is one HTTP request.
            wait_s = settings.orchestrator.follow_interval_s if busy else settings.orchestrator.poll_interval_s
            orchestrator.consume(consumer, timeout_ms=int(wait_s * 1000))
            busy = orchestrator.tick()
    finally:
        consumer.close()
        orchestrator.producer.close()
