"""Evaluator stage: score a candidate adapter against the champion, decide, record, report, promote.

    medretrain evaluate --run <mlflow run id>                 # CLI
    verdict = evaluator.run(settings, trained_adapter)        # from the retrain pipeline

Both models are scored on the same rows: a seeded sample of the MedQuAD test split (documents
never trained on) and, when the candidate's lineage names a snapshot, that snapshot's production
evaluation slice. The decision (every rule, threshold, value and verdict) is written to the
candidate's run as ``decision.json`` plus tags; promotion then acts on that Verdict only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from evaluator import gate, inference, scoring
from schemas.artifacts import TRAINED_ADAPTER_FILE, Lineage, TrainedAdapter, Verdict
from schemas.data import QAPair
from schemas.settings import Settings

log = logging.getLogger(__name__)

RUN_TAG_PREFIX = "medretrain.gate"
BASELINE_CACHE_DIR = "eval_cache"
"""Artifact folder on a champion's run holding its measurements, keyed by everything they depend on."""
MEASUREMENT_VERSION = 1
"""Bump when a metric's definition changes: cached champion measurements then no longer match."""


@dataclass(frozen=True)
class EvalSet:
    """One evaluation set: rows for the teacher-forced loss and the (smaller) generation sample."""

    name: str
    loss_rows: list[QAPair]
    sample: list[QAPair]


@dataclass(frozen=True)
class Measurement:
    """One model's metrics (``<set>.<metric>``) and its generated answers per set."""

    metrics: dict[str, float]
    answers: dict[str, list[str]]


def build_eval_set(name: str, rows: Sequence[QAPair], settings: Settings) -> EvalSet:
    """A seeded order of ``rows``; loss rows and the generation sample are prefixes of it."""
    if not rows:
        raise ValueError(f"evaluation set {name!r} is empty")
    order = random.Random(settings.evaluate.seed).sample(list(rows), len(rows))
    loss_rows = order[: settings.evaluate.loss_rows] if settings.evaluate.loss_rows else order
    return EvalSet(name, loss_rows, order[: settings.evaluate.sample_size])


def medquad_set(settings: Settings) -> EvalSet:
    """The MedQuAD test split's evaluation set: the same rows for every retrain under the same settings."""
    from trainer.medquad import load_medquad

    return build_eval_set("medquad", load_medquad("test"), settings)


def build_eval_sets(settings: Settings, lineage: Lineage) -> list[EvalSet]:
    """MedQuAD test split always; the snapshot's production slice when there is one with rows."""
    sets = [medquad_set(settings)]
    if not lineage.snapshot_id:
        log.warning("candidate has no snapshot: no production slice, production rules follow their on_missing")
        return sets
    from trainer.snapshot_reader import read_snapshot

    _, _, production = read_snapshot(settings, lineage.snapshot_id)
    if production:
        sets.append(build_eval_set("production", production, settings))
    else:
        log.warning(
            "snapshot %s has an empty evaluation slice: production rules follow their on_missing", lineage.snapshot_id
        )
    return sets


def measure(model, tokenizer, sets: Sequence[EvalSet], settings: Settings, label: str) -> Measurement:
    """Loss, perplexity and generation metrics of one model on every set.

    Each set's loss pass and generation are separate tasks (:func:`inference.run_tasks`), loss
    passes first: they take longest.
    """
    ev = settings.evaluate

    def loss_task(s: EvalSet) -> inference.Task:
        return partial(inference.answer_loss, model, tokenizer, s.loss_rows, settings.train.max_length,
                       ev.batch_size, f"{label}/{s.name}")

    def generation_task(s: EvalSet) -> inference.Task:
        return partial(inference.generate_answers, model, tokenizer, [row.question for row in s.sample],
                       ev.max_new_tokens, ev.batch_size, f"{label}/{s.name}", ev.no_repeat_ngram_size)

    results = inference.run_tasks(model, [loss_task(s) for s in sets] + [generation_task(s) for s in sets])
    losses, generated = results[: len(sets)], results[len(sets) :]
    metrics: dict[str, float] = {}
    for s, scores, answers in zip(sets, losses, generated, strict=True):
        scores |= scoring.score_answers(answers, [row.answer for row in s.sample])
        metrics |= {f"{s.name}.{key}": value for key, value in scores.items()}
    return Measurement(metrics, {s.name: answers for s, answers in zip(sets, generated, strict=True)})


def _measure_resolved(resolved, sets: Sequence[EvalSet], settings: Settings, label: str) -> Measurement:
    from trainer.registry import load_resolved

    model, tokenizer = load_resolved(resolved, torch.float32)
    model.to("cuda" if torch.cuda.is_available() else "cpu")  # after training on a GPU node, score there too
    return measure(model, tokenizer, sets, settings, label)  # the model is freed on return: one in memory at a time


def measure_version(settings: Settings, version: str, sets: Sequence[EvalSet]) -> Measurement:
    """A registered version (number or alias) on ``sets``, outside a gate decision (e.g. reports)."""
    from trainer.registry import resolve

    return _measure_resolved(resolve(settings, version), sets, settings, f"v{version}")


def baseline_key(eval_set: EvalSet, settings: Settings) -> str:
    """Hash of what a model's measurement on one set depends on: rows, generation and loss settings.

    The cache lives on the run that holds the weights (a base run, or the training run of an
    adapter version), so the run is the model's identity and the key need not name a version.
    """
    ev = settings.evaluate
    payload = {
        "measurement_version": MEASUREMENT_VERSION,
        "max_length": settings.train.max_length,
        "generation": [ev.max_new_tokens, ev.batch_size, ev.no_repeat_ngram_size],
        "set": eval_set.name,
        "loss_rows": [r.model_dump_json() for r in eval_set.loss_rows],
        "sample": [r.question for r in eval_set.sample],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def _of_set(measurement: Measurement, name: str) -> Measurement:
    metrics = {k: v for k, v in measurement.metrics.items() if k.startswith(f"{name}.")}
    return Measurement(metrics, {name: measurement.answers[name]})


def _merged(parts: Sequence[Measurement]) -> Measurement:
    metrics = {k: v for p in parts for k, v in p.metrics.items()}
    return Measurement(metrics, {k: v for p in parts for k, v in p.answers.items()})


def cache_measurement(settings: Settings, run_id: str, sets: Sequence[EvalSet], measurement: Measurement) -> None:
    """One cache entry per set on ``run_id``: :func:`measure_champion` finds it once that run's version is champion."""
    from trainer.tracking import log_json

    for s in sets:
        name = f"{baseline_key(s, settings)}.json"
        log_json(settings, run_id, name, asdict(_of_set(measurement, s.name)), artifact_path=BASELINE_CACHE_DIR)


def measure_champion(settings: Settings, champion, sets: Sequence[EvalSet]) -> Measurement:
    """The champion's measurement, each set scored once per (weights, rows, settings) and cached on its run.

    Every evaluation compares against the same champion until it changes, so rescoring it would
    double the stage's cost for identical numbers. The MedQuAD set stays the same between
    retrains, so usually only the new snapshot's production slice is scored here.
    """
    import mlflow

    from deploy.registry import mlflow_client

    client = mlflow_client(settings)
    run_id = client.get_model_version(champion.name, champion.version).run_id
    stored = {Path(f.path).name for f in client.list_artifacts(run_id, BASELINE_CACHE_DIR)}
    parts, missing = [], []
    for s in sets:
        name = f"{baseline_key(s, settings)}.json"
        if name in stored:
            text = mlflow.artifacts.load_text(f"runs:/{run_id}/{BASELINE_CACHE_DIR}/{name}")
            parts.append(Measurement(**json.loads(text)))
        else:
            missing.append(s)
    log.info("champion v%s: %d of %d sets from cache; scoring %s", champion.version, len(parts), len(sets),
             [s.name for s in missing] or "nothing")
    if missing:
        measured = _measure_resolved(champion, missing, settings, f"champion v{champion.version}")
        cache_measurement(settings, run_id, missing, measured)
        parts.append(measured)
    return _merged(parts)


def measure_candidate(settings: Settings, candidate: TrainedAdapter, sets: Sequence[EvalSet]) -> Measurement:
    """Download the run's adapter, put it on its base version, and measure it."""
    import mlflow

    from deploy.registry import BASE_VERSION_TAG, mlflow_client
    from trainer.registry import ResolvedModel, resolve

    tags = mlflow_client(settings).get_run(candidate.run_id).data.tags
    base_version = tags.get(BASE_VERSION_TAG)
    if not base_version:
        raise ValueError(f"run {candidate.run_id} has no {BASE_VERSION_TAG} tag: is it a medretrain training run?")
    base = resolve(settings, base_version)
    with tempfile.TemporaryDirectory(prefix="medretrain-candidate-") as tmp:
        adapter_dir = mlflow.artifacts.download_artifacts(
            run_id=candidate.run_id, artifact_path=candidate.artifact_path, dst_path=tmp
        )
        resolved = ResolvedModel(
            name=base.name,
            version=f"run:{candidate.run_id}",
            base_version=base.version,
            base_dir=base.base_dir,
            adapter_dir=Path(adapter_dir),
            origin=base.origin,
        )
        return _measure_resolved(resolved, sets, settings, "candidate")


@contextmanager
def _stopwatch(seconds: dict[str, float], step: str) -> Iterator[None]:
    started = time.monotonic()
    yield
    seconds[step] = time.monotonic() - started


def evaluate_candidate(settings: Settings, candidate: TrainedAdapter) -> tuple[Verdict, dict, dict[str, float]]:
    """Measure champion and candidate on the same sets and apply the gate.

    Returns (verdict, samples, seconds per step: ``prepare``, ``champion``, ``candidate``). The
    candidate's measurement is cached on its run: should it become champion, no gate rescores it.
    """
    from deploy.registry import CHAMPION
    from trainer.registry import resolve

    rules = gate.load_rules(settings.evaluate.gate_rules)  # a bad rules file fails before minutes of scoring
    seconds: dict[str, float] = {}
    with _stopwatch(seconds, "prepare"):
        sets = build_eval_sets(settings, candidate.lineage)
        champion = resolve(settings, CHAMPION)
    log.info("scoring champion (version %s) and candidate run %s", champion.version, candidate.run_id)
    with _stopwatch(seconds, "champion"):
        baseline = measure_champion(settings, champion, sets)
    with _stopwatch(seconds, "candidate"):
        challenger = measure_candidate(settings, candidate, sets)
        cache_measurement(settings, candidate.run_id, sets, challenger)
    passed, results = gate.decide(rules, challenger.metrics, baseline.metrics)
    verdict = Verdict(
        candidate_run_id=candidate.run_id,
        baseline_version=champion.version,
        passed=passed,
        rules=results,
        metrics={"candidate": challenger.metrics, "baseline": baseline.metrics},
    )
    return verdict, sample_records(sets, baseline, challenger), seconds


def sample_records(sets: Sequence[EvalSet], baseline: Measurement, candidate: Measurement) -> dict:
    """Per set: question, reference, champion answer and candidate answer side by side."""
    return {
        s.name: [
            {"question": row.question, "reference": row.answer, "champion": champ, "candidate": cand}
            for row, champ, cand in zip(s.sample, baseline.answers[s.name], candidate.answers[s.name], strict=True)
        ]
        for s in sets
    }


def decision_tags(verdict: Verdict) -> dict[str, str]:
    """Run tags of the decision: the verdict, the baseline, and one tag per rule with value and threshold."""
    tags = {
        f"{RUN_TAG_PREFIX}.passed": str(verdict.passed).lower(),
        f"{RUN_TAG_PREFIX}.baseline_version": verdict.baseline_version or "",
        f"{RUN_TAG_PREFIX}.decided_at": verdict.decided_at.isoformat(),
        f"{RUN_TAG_PREFIX}.reasons": "; ".join(f"{r.name}: {r.detail}" for r in verdict.rules if not r.passed)[:4900],
    }
    for r in verdict.rules:
        value = "missing" if r.value is None else f"{r.value:.6g}"
        tags[f"{RUN_TAG_PREFIX}.rule.{r.name}"] = (
            f"{'pass' if r.passed else 'FAIL'} {r.metric}={value} {r.op} {r.threshold:g}"
        )
    return tags


def record_decision(settings: Settings, verdict: Verdict, samples: dict, seconds: dict[str, float]) -> None:
    """``decision.json`` and ``eval/samples.json`` artifacts, decision tags, eval metrics and step times on the run."""
    from mlflow.entities import Metric, RunTag

    from deploy.registry import mlflow_client
    from trainer.tracking import log_json

    run_id = verdict.candidate_run_id
    log_json(settings, run_id, "decision.json", verdict.model_dump(mode="json"))
    log_json(settings, run_id, "samples.json", samples, artifact_path="eval")
    stamp = int(verdict.decided_at.timestamp() * 1000)
    metrics = [
        Metric(f"eval.{side}.{key}", value, stamp, 0)
        for side, values in verdict.metrics.items()
        for key, value in values.items()
    ] + [Metric(f"eval.seconds.{step}", value, stamp, 0) for step, value in seconds.items()]
    tags = [RunTag(k, v) for k, v in decision_tags(verdict).items()]
    mlflow_client(settings).log_batch(run_id, metrics=metrics, tags=tags)


def candidate_from_run(settings: Settings, run_id: str) -> TrainedAdapter:
    """The trainer's TrainedAdapter, read from the finished training run's ``trained_adapter.json``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from deploy.clients import use_mlflow

    use_mlflow(settings)
    try:
        text = mlflow.artifacts.load_text(f"runs:/{run_id}/{TRAINED_ADAPTER_FILE}")
    except MlflowException as e:
        raise LookupError(
            f"run {run_id!r} on {settings.mlflow.tracking_uri} has no {TRAINED_ADAPTER_FILE}: "
            "it is not a finished medretrain training run"
        ) from e
    return TrainedAdapter.model_validate_json(text)


def run(settings: Settings, candidate: TrainedAdapter) -> Verdict:
    """The whole stage: evaluate, record the decision, log the report, then register/promote per the verdict."""
    from evaluator import promotion, report

    verdict, samples, seconds = evaluate_candidate(settings, candidate)
    record_decision(settings, verdict, samples, seconds)
    report.log_report(settings, verdict, samples)
    version = promotion.apply_verdict(settings, verdict)
    log.info(
        "run %s %s the gate; version %s",
        candidate.run_id,
        "passed" if verdict.passed else "failed",
        version,
    )
    return verdict
