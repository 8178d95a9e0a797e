"""The end-to-end demo: from nothing to a promoted model on the embedded stack.

    medretrain demo                 # about 6 minutes on 2 lightly loaded CPU cores
    medretrain demo --events 600

Stack up -> base model v1 as champion -> accumulator + orchestrator started -> production
QA events published -> the threshold fires -> Ray trains (CPU, 2 workers) -> the gate runs
-> the new version is promoted. Every number in the summary is read back from the system
(status events, the store, the Ray job, MLflow and the registry), not from the demo's own clock.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from schemas.events import RetrainStatus
from schemas.settings import Settings, with_overrides
from services.loop.timeline import Timeline, retrain_timeline

DEMO_OVERRIDES = {
    "trigger": {"threshold": 300, "cooldown_s": 0},
    # Sized for 2 CPU cores: ~5 s per step with 2 Ray workers on SmolLM2-135M.
    "train": {
        "max_steps": 24,
        "micro_batch_size": 2,
        "max_length": 160,
        "warmup_steps": 3,
        "checkpoint_every_steps": 8,
    },
    # Three set scorings per gate (candidate on both sets, champion on the new production slice) at
    # ~6 s of loss + ~6 s of generation each; the MedQuAD baseline is scored once, before the loop.
    "evaluate": {"promotion": "auto", "sample_size": 8, "max_new_tokens": 32, "loss_rows": 16},
}
FINAL_PHASES = ("promoted", "rejected", "failed")


@dataclass
class DemoResult:
    champion_before: str | None = None
    champion_after: str | None = None
    request_id: str | None = None
    final: RetrainStatus | None = None
    stages: dict[str, float] = field(default_factory=dict)
    """Stage name -> seconds."""
    timeline: Timeline | None = None
    """Where the retrain's time went, read back from the store, Ray and MLflow."""


def demo_settings(settings: Settings) -> Settings:
    return with_overrides(settings, DEMO_OVERRIDES)


def start_services(settings: Settings) -> None:
    """The accumulator and orchestrator as background processes managed like the stack's services."""
    from deploy import process
    from deploy.ray_env import settings_env
    from deploy.stack import APP_SERVICES

    for name in APP_SERVICES:
        if process.running_pid(settings.stack.home, name) is None:
            argv = [sys.executable, "-m", "services", "serve", name]
            process.spawn(settings.stack.home, name, process.Launch(argv, Path.cwd(), settings_env(settings)))


def status_consumer(settings: Settings):
    """Reads every partition of ``retrain.status`` from the beginning, outside any group: the demo only looks.

    No group means no membership to lose during a long wait and no join delay.
    """
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=settings.kafka.bootstrap, enable_auto_commit=False)
    topic = settings.kafka.status_topic
    partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
    if not partitions:
        consumer.close()
        raise RuntimeError(f"topic {topic!r} not found on {settings.kafka.bootstrap}; is the stack up?")
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    return consumer


def wait_for_final(
    settings: Settings, since: datetime, timeout_s: float, show: Callable[[str], None]
) -> dict[str, RetrainStatus]:
    """Status events of the first retrain requested after ``since``, until it reaches a final phase."""
    consumer = status_consumer(settings)
    seen: dict[str, RetrainStatus] = {}
    request_id = None
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=1000).values():
                for record in records:
                    event = RetrainStatus.model_validate_json(record.value)
                    if request_id is None and event.phase == "requested" and event.at >= since:
                        request_id = event.request_id
                    if event.request_id == request_id:
                        seen[event.phase] = event
                        show(f"retrain {request_id}: {event.phase} {event.detail}")
            if any(phase in seen for phase in FINAL_PHASES):
                return seen
    finally:
        consumer.close()
    raise TimeoutError(
        f"no final retrain status within {timeout_s:.0f}s; seen {sorted(seen)}; see logs in "
        f"{settings.stack.home / 'logs'}"
    )


def unseen_events(settings: Settings, n: int, seed: int) -> list:
    """``n`` production events the store has not accepted yet, so a repeated demo still reaches the threshold."""
    from sqlalchemy import select

    from services.store import QAEventRow, create_schema, make_engine
    from services.stream.publisher import medquad_events

    everything = medquad_events(10**9, seed)  # the whole production split, shuffled
    engine = make_engine(settings)
    create_schema(engine)
    with engine.connect() as conn:
        stored = set(conn.execute(select(QAEventRow.event_id)).scalars())
    engine.dispose()
    fresh = [e for e in everything if str(e.event_id) not in stored][:n]
    if len(fresh) < settings.trigger.threshold:
        raise RuntimeError(f"only {len(fresh)} production events are new to this store; reset it with `make clean`")
    return fresh


def run_demo(settings: Settings, events: int, seed: int, timeout_s: float, console) -> DemoResult:
    """Run every stage, printing progress; the services keep running afterwards for `status` and the UI."""
    from contextlib import contextmanager

    from deploy import stack
    from deploy.registry import CHAMPION, alias_version, open_registry
    from evaluator.evaluate import measure_champion, medquad_set
    from schemas.events import utcnow
    from services.stream import publisher
    from trainer.registry import bootstrap, resolve

    result = DemoResult()

    @contextmanager
    def stage(name: str):
        started = time.monotonic()
        with console.status(f"{name}…") as spinner:
            yield spinner
        result.stages[name] = time.monotonic() - started
        console.print(f"[green]✓[/] {name} [dim]({result.stages[name]:.1f}s)[/]")

    with stage("stack up") as spinner:
        stack.up(settings, progress=lambda m: spinner.update(f"stack up: {m}"))
    with stage("base model in the registry"):
        bootstrap(settings)
        client, name = open_registry(settings)
        result.champion_before = alias_version(client, name, CHAMPION)
    with stage("accumulator + orchestrator started"):
        start_services(settings)
    # Meanwhile the orchestrator warms up (imports, text metric), off the path measured below.
    with stage("champion scored on the MedQuAD held-out set (once per champion)"):
        measure_champion(settings, resolve(settings, CHAMPION), [medquad_set(settings)])
    since = utcnow()
    with stage(f"{events} production QA events published") as spinner:
        summary = publisher.publish(settings, unseen_events(settings, events, seed))
        spinner.update(f"published {summary.sent}")
    with stage("threshold -> train -> gate -> promotion") as spinner:
        seen = wait_for_final(settings, since, timeout_s, show=lambda m: spinner.update(m))
    result.final = next(seen[p] for p in FINAL_PHASES if p in seen)
    result.request_id = result.final.request_id
    result.champion_after = alias_version(client, name, CHAMPION)
    if "started" in seen and result.final.run_id:
        result.timeline = retrain_timeline(settings, result.request_id, seen["started"], result.final)
    return result
