"""The review page: one version's decision record, evidence and lineage; promote, reject and roll back.

Everything shown is read where the CLI reads it (``read_decision``, the version's tags, the answer store's
online ratings, the run's ``report/`` plots), and every action goes through ``evaluator.promotion`` with
the signed-in name as the actor, so the console and ``medretrain registry`` write one audit trail.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine

from deploy.registry import CHALLENGER, CHAMPION, alias_version, open_registry
from schemas.artifacts import OnlineStats, RegistryAction, Verdict
from schemas.settings import Settings
from services.answers.console.auth import Session
from services.answers.console.links import mlflow_run_url, mlflow_version_url

ACTIONS = ("promote", "reject", "rollback")
LINEAGE = (("parent version", "parent_version"), ("base version", "base_version"), ("snapshot", "snapshot"),
           ("Kafka offsets", "lineage.kafka_offsets"), ("retrain request", "request"),
           ("base model", "lineage.base_model"), ("judged against", "gate.baseline_version"))
"""(label, version tag) rows of the lineage table, as ``evaluator.promotion.version_tags`` writes them."""

_ACTING = threading.Lock()
"""One registry action at a time in this process: a double-click's second POST sees the first one's result."""


class NothingToReview(LookupError):
    """No such version (or no challenger); ``versions`` lists those there are, for the picker."""

    def __init__(self, message: str, versions: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.versions = versions


class Refused(Exception):
    """A review action that was not carried out; the message says why, and nothing was recorded."""


@dataclass
class MetricRow:
    metric: str
    champion: float | None
    challenger: float | None

    @property
    def delta(self) -> float | None:
        return None if self.champion is None or self.challenger is None else self.challenger - self.champion


@dataclass
class Review:
    name: str
    version: str
    champion: str | None
    challenger: str | None
    tags: dict[str, str]
    run_id: str | None
    links: dict[str, str]
    versions: list[dict[str, Any]]
    actions: list[RegistryAction]
    verdict: Verdict | None = None
    problem: str | None = None
    """Why no decision record is shown (a base version has none; an unreadable record says so)."""
    metrics: dict[str, list[MetricRow]] = field(default_factory=dict)
    samples: dict[str, list[dict]] = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)
    online: dict[str, OnlineStats] = field(default_factory=dict)
    online_note: str = ""

    @property
    def cleared(self) -> bool:
        """Whether a promotion needs no override: the gate passed and nobody rejected the version."""
        return self.tags.get("gate") == "passed" and self.tags.get("rejected") != "true"

    @property
    def lineage(self) -> list[tuple[str, str]]:
        return [(label, self.tags.get(tag, "")) for label, tag in LINEAGE]


def metric_rows(verdict: Verdict) -> dict[str, list[MetricRow]]:
    """Champion vs challenger per eval set (the part of a metric key before its first dot)."""
    base, cand = verdict.metrics.get("baseline", {}), verdict.metrics.get("candidate", {})
    rows: dict[str, list[MetricRow]] = {}
    for key in sorted(set(base) | set(cand)):
        set_name, _, metric = key.partition(".")
        rows.setdefault(set_name, []).append(MetricRow(metric, base.get(key), cand.get(key)))
    return rows


def _summary(mv, aliases: dict[str, str]) -> dict[str, Any]:
    held = [alias for alias, version in aliases.items() if version == str(mv.version)]
    return {"version": str(mv.version), "kind": mv.tags.get("kind", ""), "gate": mv.tags.get("gate", ""),
            "rejected": mv.tags.get("rejected") == "true", "aliases": held}


def load_review(settings: Settings, engine: Engine, version: str | None) -> Review:
    """The review of ``version`` (default: the challenger); NothingToReview when there is none to show."""
    from evaluator.promotion import actions_of

    client, name = open_registry(settings)
    aliases = dict(client.get_registered_model(name).aliases)
    found = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda mv: int(mv.version), reverse=True)
    versions = [_summary(mv, aliases) for mv in found]
    version = (version or "").strip() or aliases.get(CHALLENGER)
    if version is None:
        raise NothingToReview(f"{name} has no challenger awaiting review: pick a version", versions)
    mv = next((mv for mv in found if str(mv.version) == version), None)
    if mv is None:
        raise NothingToReview(f"{name} has no version {version!r}", versions)
    links = {"version": mlflow_version_url(settings, name, version)}
    if mv.run_id:
        links["run"] = mlflow_run_url(settings, client, mv.run_id)
    review = Review(name=name, version=version, champion=aliases.get(CHAMPION), challenger=aliases.get(CHALLENGER),
                    tags=dict(mv.tags), run_id=mv.run_id, links=links, versions=versions, actions=actions_of(mv))
    _add_evidence(settings, engine, client, review)
    return review


def _add_evidence(settings: Settings, engine: Engine, client, review: Review) -> None:
    """The decision record (online rules decided on the live feedback, as ``registry review`` does) and plots."""
    from evaluator.decision import read_decision
    from evaluator.online import regate
    from evaluator.report import REPORT_DIR, SAMPLES_SHOWN, report_link
    from services.answers.records import online_evidence, online_metrics

    review.online = online_metrics(engine)
    if "decision" not in review.tags or not review.run_id:
        review.problem = f"version {review.version} ({review.tags.get('kind') or 'untagged'}) has no gate decision"
        return
    try:
        verdict, samples = read_decision(settings, review.run_id)
    except Exception as e:  # noqa: BLE001 - a run whose artifacts are gone still shows its tags and lineage
        review.problem = f"the decision record of run {review.run_id} is not readable: {e}"
        return
    evidence = online_evidence(settings, review.version, review.champion)
    review.verdict = regate(settings, verdict, evidence)
    review.online_note = (f"live feedback since {evidence.since:%Y-%m-%d %H:%M} UTC" if evidence.since
                          else "not served to anyone yet")
    review.metrics = metric_rows(review.verdict)
    review.samples = {name: rows[:SAMPLES_SHOWN] for name, rows in sorted(samples.items())}
    review.links["report"] = report_link(settings, review.run_id)
    review.plots = [f.path for f in client.list_artifacts(review.run_id, REPORT_DIR) if f.path.endswith(".png")]


def act(settings: Settings, session: Session, form: dict[str, str]) -> RegistryAction:
    """Carry out a review form's action; Refused (nothing recorded) for bad input or a page gone stale."""
    action, version, reason = form.get("action", ""), form.get("version", "").strip(), form.get("reason", "").strip()
    if action not in ACTIONS:
        raise Refused(f"unknown action {action!r}")
    if not reason:
        raise Refused(f"{action}: give a reason; it is recorded with your name")
    if action != "rollback" and not version.isdigit():
        raise Refused(f"{action}: {version!r} is not a model version number")
    with _ACTING:
        client, name = open_registry(settings)
        shown, current = form.get("champion", ""), alias_version(client, name, CHAMPION) or ""
        if shown != current:
            raise Refused(f"{action} not done: the page showed champion {shown or 'none'}, but the champion is now "
                          f"{current or 'none'} (someone acted meanwhile). Review the page again.")
        return _carry_out(settings, client, name, session, action, version, reason, form.get("force") == "on")


def _carry_out(settings: Settings, client, name: str, session: Session, action: str, version: str, reason: str,
               force: bool) -> RegistryAction:
    from mlflow.exceptions import MlflowException

    from evaluator import promotion
    from services.answers.records import online_evidence

    try:
        if action == "promote":
            champion = alias_version(client, name, CHAMPION)
            online = online_evidence(settings, version, champion)
            return promotion.promote(settings, version, session.name, reason, force, online)
        if action == "reject":
            if client.get_model_version(name, version).tags.get("rejected") == "true":
                raise Refused(f"version {version} is already rejected")
            return promotion.reject(settings, version, session.name, reason)
        return promotion.rollback(settings, session.name, reason)
    except promotion.RegistryError as e:
        hint = "" if force or action != "promote" else " (here: tick 'override the gate' and say why)"
        raise Refused(f"{e}{hint}") from e
    except ValueError as e:
        raise Refused(str(e)) from e
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise  # an outage is not a refusal: the page reports it as an error
        raise Refused(f"{name} has no version {version!r}") from e
