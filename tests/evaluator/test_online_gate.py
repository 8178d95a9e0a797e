"""The gate's online rule: live +1 rates of a served candidate against the champion's, or "not enough ratings"."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime

import pytest
from eval_fixtures import PASS_RULES
from pydantic import ValidationError
from typer.testing import CliRunner

from deploy.registry import CHAMPION, alias_version, open_registry
from evaluator import gate
from evaluator.decision import read_decision
from evaluator.evaluate import run as evaluate_run
from evaluator.online import NOT_SERVED, online_part, regate
from schemas.artifacts import OnlineEvidence, OnlineStats, RuleResult, Verdict
from schemas.serving import AnswerEvent, FeedbackRequest
from schemas.settings import load_settings, with_overrides
from services.answers.records import record_answer, record_feedback
from services.cli import build_app
from services.store import create_schema, make_engine

SETTINGS = load_settings(["evaluate.min_online_ratings=10"])
SHIPPED = gate.load_rules(SETTINGS.evaluate.gate_rules)
ONLINE_RULE = next(r for r in SHIPPED.rules if r.metric == "online.up_rate")
SINCE = datetime(2026, 12, 6, 21, 0, tzinfo=UTC)


def evidence(cand_rated: int, cand_up: int, base_rated: int, base_up: int) -> OnlineEvidence:
    return OnlineEvidence(candidate_version="4", baseline_version="3", since=SINCE,
                          candidate=OnlineStats(answers=cand_rated + 5, rated=cand_rated, up=cand_up, corrections=1),
                          baseline=OnlineStats(answers=base_rated + 9, rated=base_rated, up=base_up, corrections=0))


def judged_offline() -> Verdict:
    """A verdict as the gate records it for a fresh candidate: an offline pass, the online rule passed as missing."""
    offline = RuleResult(name="medquad_rougeL_forgetting_guard", metric="delta(medquad.rougeL)", op=">=",
                         threshold=-0.02, value=0.01, passed=True)
    _, [online] = gate.decide(gate.GateRules(rules=[ONLINE_RULE]), {}, {}, {"online": NOT_SERVED})
    return Verdict(candidate_run_id="run-1", baseline_version="3", passed=True, rules=[offline, online],
                   metrics={"candidate": {"medquad.rougeL": 0.31}, "baseline": {"medquad.rougeL": 0.30}})


def test_the_shipped_online_rule_compares_up_rates_and_passes_without_ratings():
    assert (ONLINE_RULE.kind, ONLINE_RULE.op, ONLINE_RULE.on_missing) == ("delta", ">=", "pass")
    assert ONLINE_RULE.threshold < 0


def test_online_metrics_other_than_the_rates_are_refused_with_the_choices():
    with pytest.raises(ValidationError, match=r"online\.<up_rate\|correction_rate>"):
        gate.GateRule(name="x", metric="online.answers", kind="value", op=">=", threshold=1)


def test_a_fresh_candidate_has_no_online_metrics_and_says_why():
    assert online_part(None, SETTINGS) == ({}, {}, NOT_SERVED)
    verdict = judged_offline()
    assert verdict.passed and "not enough ratings: the candidate has not served" in verdict.rules[1].detail


def test_too_few_ratings_keep_the_counts_but_not_the_rates():
    cand, base, why = online_part(evidence(cand_rated=4, cand_up=0, base_rated=50, base_up=45), SETTINGS)
    assert cand == {"online.answers": 9.0, "online.rated": 4.0}
    assert base == {"online.answers": 59.0, "online.rated": 50.0}
    assert why == ("not enough ratings: candidate v4 has 4 rated answers since 2026-12-06 21:00 UTC "
                   "(evaluate.min_online_ratings=10)")
    again = regate(SETTINGS, judged_offline(), evidence(4, 0, 50, 45))
    assert again.passed and "candidate v4 has 4 rated answers" in again.rules[1].detail


def test_a_served_candidate_users_like_less_fails_the_online_rule_and_the_verdict():
    verdict = regate(SETTINGS, judged_offline(), evidence(cand_rated=20, cand_up=10, base_rated=40, base_up=32))
    offline, online = verdict.rules
    assert offline == judged_offline().rules[0]
    assert (online.passed, online.value) == (False, pytest.approx(0.5 - 0.8))
    assert not verdict.passed
    assert verdict.metrics["candidate"]["online.up_rate"] == 0.5 and verdict.metrics["baseline"]["online.rated"] == 40
    assert verdict.metrics["candidate"]["medquad.rougeL"] == 0.31


def test_a_served_candidate_as_good_as_the_champion_passes_and_a_refresh_replaces_old_online_numbers():
    worse = regate(SETTINGS, judged_offline(), evidence(20, 10, 40, 32))
    better = regate(SETTINGS, worse, evidence(cand_rated=30, cand_up=25, base_rated=40, base_up=32))
    assert better.passed and len(better.rules) == 2
    assert better.metrics["candidate"]["online.rated"] == 30


def medretrain(overrides: dict, *args: str):
    """``medretrain`` through the real CLI root, which hands the registry commands the store's online source."""
    sets = [x for key, value in overrides.items() for x in ("--set", f"{key}={value}")]
    return CliRunner().invoke(build_app(), [*sets, *args], env={"COLUMNS": "250"})


def serve_ratings(engine, version: str, ups: int, downs: int) -> None:
    for i in range(ups + downs):
        answer = AnswerEvent(answer_id=uuid.uuid4(), question=f"Q{i}?", answer="A.", model_version=version,
                             alias="champion")
        record_answer(engine, answer)
        record_feedback(engine, SETTINGS, FeedbackRequest(answer_id=answer.answer_id, rating=1 if i < ups else -1))


@pytest.mark.integration
def test_review_shows_live_feedback_and_promote_refuses_a_challenger_users_rate_lower(make_settings, make_candidate,
                                                                                        tmp_path):
    rules = [*PASS_RULES, ONLINE_RULE.model_dump()]
    settings = with_overrides(make_settings(rules), {"database": {"url": f"sqlite:///{tmp_path / 'answers.db'}"},
                                                     "evaluate": {"min_online_ratings": 5}})
    verdict = evaluate_run(settings, make_candidate(settings, seed=1))
    assert verdict.passed and NOT_SERVED in verdict.rules[-1].detail
    engine = make_engine(settings)
    create_schema(engine)
    serve_ratings(engine, "2", ups=3, downs=3)  # the challenger's canary: 0.5 against 0.9
    serve_ratings(engine, "1", ups=9, downs=1)  # the champion, over the same period
    overrides = {"mlflow.registered_model": settings.mlflow.registered_model, "database.url": settings.database.url,
                 "evaluate.gate_rules": settings.evaluate.gate_rules, "evaluate.min_online_ratings": 5}

    review = medretrain(overrides, "registry", "review")
    assert review.exit_code == 0, review.output
    assert "live feedback since" in review.output and "online.up_rate" in review.output
    assert re.search(r"online_up_rate_not_worse\s*│\s*FAIL", review.output)

    refused = medretrain(overrides, "registry", "promote", "2")
    assert refused.exit_code == 1 and "online_up_rate_not_worse" in refused.output
    client, name = open_registry(settings)
    assert alias_version(client, name, CHAMPION) == "1"
    recorded, _ = read_decision(settings, verdict.candidate_run_id)
    assert recorded.metrics["candidate"]["online.up_rate"] == 0.5 and recorded.metrics["baseline"]["online.rated"] == 10
    assert not recorded.passed

    serve_ratings(engine, "2", ups=20, downs=0)  # users come round: 23 of 26
    promoted = medretrain(overrides, "registry", "promote", "2")
    assert promoted.exit_code == 0, promoted.output
    assert alias_version(client, name, CHAMPION) == "2"
    engine.dispose()
