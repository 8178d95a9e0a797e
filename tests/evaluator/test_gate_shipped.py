"""The SHIPPED gate rules (evaluator/gate_rules.json) on a real candidate, and `medretrain ask` on the champion.

    .venv/bin/pytest tests/evaluator/test_gate_shipped.py -q
"""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from deploy.registry import CHALLENGER, CHAMPION, alias_version, open_registry
from evaluator.decision import read_decision
from evaluator.evaluate import run as evaluate_run
from evaluator.gate import REPO_ROOT
from schemas.settings import Settings, with_overrides
from services.cli import build_app

pytestmark = pytest.mark.integration

SHIPPED_RULES = REPO_ROOT / "evaluator" / "gate_rules.json"


def ask(settings: Settings, *args: str):
    overrides = ["--set", f"mlflow.registered_model={settings.mlflow.registered_model}"]
    return CliRunner().invoke(build_app(), [*overrides, "ask", *args], env={"COLUMNS": "200"})


def test_shipped_rules_reject_a_candidate_that_loops_on_medquad_and_the_champion_keeps_answering(
        make_settings, make_candidate):
    settings = with_overrides(make_settings(), {"evaluate": {"gate_rules": str(SHIPPED_RULES)}})
    # Seed 1's random LoRA makes the tiny model loop ("rt rt rt rt rt rt posing posing") where the base does not.
    candidate = make_candidate(settings, seed=1)

    verdict = evaluate_run(settings, candidate)

    rules = {r.name: r for r in verdict.rules}
    assert set(rules) == {r["name"] for r in json.loads(SHIPPED_RULES.read_text())["rules"]}
    assert not verdict.passed
    looping = rules["medquad_degenerate_rate"]
    assert not looping.passed and looping.value > 0.25
    assert verdict.metrics["baseline"]["medquad.degenerate_rate"] <= 0.25  # the champion did not loop: a regression
    assert rules["online_up_rate_not_worse"].passed and "not enough ratings" in rules["online_up_rate_not_worse"].detail
    recorded, _ = read_decision(settings, candidate.run_id)
    assert recorded.rules == verdict.rules

    client, name = open_registry(settings)
    assert alias_version(client, name, CHAMPION) == "1" and alias_version(client, name, CHALLENGER) is None
    answered = ask(settings, "What are the symptoms of glaucoma?", "--max-new-tokens", "8")
    assert answered.exit_code == 0, answered.output
    assert re.search(rf"{re.escape(name)} v1\b", answered.output)


def test_ask_refuses_an_empty_question_and_names_the_problem(make_settings):
    answered = ask(make_settings(), "   ")
    assert answered.exit_code == 2 and "the question is empty" in answered.output
