"""The gate's online part: live feedback on a served candidate against the champion's over the same period.

    cand, base, why = online_part(evidence, settings)          # online.* metrics, or why they are absent
    verdict = regate(settings, verdict, evidence)              # the online rules decided again on fresh evidence
    verdict = refresh_decision(settings, version, evidence)    # ... and recorded on the version (before a promotion)

The evidence (``OnlineEvidence``) is read from the answer service's store by the services layer and handed in:
``ONLINE_SOURCE_KEY`` in the CLI context's ``meta`` holds the function that reads it (the evaluator never opens
the service database itself). A candidate that has not served answers yet, or whose period holds fewer than
``evaluate.min_online_ratings`` rated answers of it or of the champion, has no ``online.*`` rates, and the online
rules follow their ``on_missing`` with a "not enough ratings" detail.
"""

from __future__ import annotations

from collections.abc import Callable

from evaluator import gate
from schemas.artifacts import OnlineEvidence, Verdict
from schemas.settings import Settings

ONLINE_SOURCE_KEY = "medretrain.online_source"
"""``typer.Context.meta`` key of the OnlineSource that the top-level CLI provides."""

OnlineSource = Callable[[Settings, "str | None", "str | None"], OnlineEvidence]
"""(settings, candidate version, champion version) -> their live feedback over the same period."""

Metrics = dict[str, float]

NOT_SERVED = "not enough ratings: the candidate has not served any answer yet"


def _rates_dropped(metrics: Metrics) -> Metrics:
    return {k: v for k, v in metrics.items() if k in ("online.answers", "online.rated")}


def online_part(evidence: OnlineEvidence | None, settings: Settings) -> tuple[Metrics, Metrics, str | None]:
    """(candidate metrics, champion metrics, why the rates are absent or None) for a Verdict."""
    if evidence is None or evidence.candidate.answers == 0:
        return {}, {}, NOT_SERVED
    cand, base = evidence.candidate.as_metrics(), evidence.baseline.as_metrics()
    need, since = settings.evaluate.min_online_ratings, f"since {evidence.since:%Y-%m-%d %H:%M} UTC"
    short = [f"{who} v{version} has {stats.rated}" for who, version, stats in (
        ("candidate", evidence.candidate_version, evidence.candidate),
        ("champion", evidence.baseline_version, evidence.baseline)) if stats.rated < need]
    if short:
        why = f"not enough ratings: {' and '.join(short)} rated answers {since} (evaluate.min_online_ratings={need})"
        return _rates_dropped(cand), _rates_dropped(base), why
    return cand, base, None


def _without_online(metrics: Metrics) -> Metrics:
    return {k: v for k, v in metrics.items() if not k.startswith(f"{gate.ONLINE_SET}.")}


def regate(settings: Settings, verdict: Verdict, evidence: OnlineEvidence | None) -> Verdict:
    """The verdict with its online metrics and online rules decided again; the offline results stay as judged."""
    online_rules = [r for r in gate.load_rules(settings.evaluate.gate_rules).rules
                    if r.metric.startswith(f"{gate.ONLINE_SET}.")]
    cand_online, base_online, why = online_part(evidence, settings)
    candidate = _without_online(verdict.metrics.get("candidate", {})) | cand_online
    baseline = _without_online(verdict.metrics.get("baseline", {})) | base_online
    fresh = {}
    if online_rules:
        missing_why = {gate.ONLINE_SET: why} if why else None
        _, decided = gate.decide(gate.GateRules(rules=online_rules), candidate, baseline, missing_why)
        fresh = {r.name: r for r in decided}
    results = [fresh.pop(r.name, r) for r in verdict.rules] + list(fresh.values())
    return Verdict(candidate_run_id=verdict.candidate_run_id, baseline_version=verdict.baseline_version,
                   passed=all(r.passed for r in results), rules=results,
                   metrics=verdict.metrics | {"candidate": candidate, "baseline": baseline})


def refresh_decision(settings: Settings, version: str, evidence: OnlineEvidence) -> Verdict:
    """Decide a registered version's online rules again and record the result on its run and its version tags."""
    from deploy.registry import mlflow_client
    from evaluator.decision import read_decision, record_decision
    from evaluator.promotion import version_tags

    client = mlflow_client(settings)
    run_id = client.get_model_version(settings.mlflow.registered_model, version).run_id
    verdict, samples = read_decision(settings, run_id)
    fresh = regate(settings, verdict, evidence)
    record_decision(settings, fresh, samples, {})
    for key, value in version_tags(fresh, client.get_run(run_id).data.tags).items():
        client.set_model_version_tag(settings.mlflow.registered_model, version, key, value)
    return fresh
