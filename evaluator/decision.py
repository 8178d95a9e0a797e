"""A judged run's recorded decision, written and read back without the scoring stack (mlflow only, no torch).

    record_decision(settings, verdict, samples, seconds)
    verdict, samples = read_decision(settings, run_id)

``record_decision`` writes ``decision.json``, ``eval/samples.json``, the decision tags and the eval metrics on the
candidate's run (the gate, and a promotion that decides the online rules again); the orchestrator and
``medretrain registry review`` read them here.
"""

from __future__ import annotations

import json

from schemas.artifacts import Verdict
from schemas.settings import Settings

RUN_TAG_PREFIX = "medretrain.gate"


def read_decision(settings: Settings, run_id: str) -> tuple[Verdict, dict]:
    """(verdict, sample answers) recorded on a candidate run by ``record_decision``."""
    import mlflow

    from deploy.clients import use_mlflow

    use_mlflow(settings)
    verdict = Verdict.model_validate_json(mlflow.artifacts.load_text(f"runs:/{run_id}/decision.json"))
    return verdict, json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/eval/samples.json"))


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
