"""Gate rules: loading, validation, and each kind of comparison."""

import json
import math

import pytest

from evaluator.gate import GateRule, GateRules, apply_rule, decide, load_rules

BASELINE = {"medquad.perplexity": 10.0, "medquad.loss": 2.3, "production.loss": 2.0}


def _rule(**kw) -> GateRule:
    return GateRule(**{"name": "r", "metric": "production.loss", "kind": "delta", "op": "<=", "threshold": -0.01, **kw})


def test_shipped_rules_load_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rules = load_rules("evaluator/gate_rules.json")
    metrics = {r.metric for r in rules.rules}
    assert {"production.loss", "medquad.perplexity", "medquad.degenerate_rate"} <= metrics


def test_delta_rule_requires_improvement_by_epsilon():
    assert apply_rule(_rule(), {"production.loss": 1.95}, BASELINE).passed
    small = apply_rule(_rule(), {"production.loss": 1.995}, BASELINE)
    assert not small.passed and small.value == pytest.approx(-0.005)


def test_relative_delta_is_the_forgetting_guard():
    rule = _rule(metric="medquad.perplexity", kind="relative_delta", threshold=0.05)
    ok = apply_rule(rule, {"medquad.perplexity": 10.4}, BASELINE)
    bad = apply_rule(rule, {"medquad.perplexity": 10.6}, BASELINE)
    assert ok.passed and ok.value == pytest.approx(0.04)
    assert not bad.passed and bad.value == pytest.approx(0.06)


def test_value_rule_ignores_baseline():
    rule = _rule(metric="medquad.degenerate_rate", kind="value", threshold=0.25)
    assert apply_rule(rule, {"medquad.degenerate_rate": 0.25}, {}).passed
    assert not apply_rule(rule, {"medquad.degenerate_rate": 0.5}, {}).passed


@pytest.mark.parametrize(("on_missing", "passed"), [("fail", False), ("pass", True)])
def test_missing_production_slice_is_explicit(on_missing, passed):
    result = apply_rule(_rule(on_missing=on_missing), {"medquad.loss": 2.0}, {"medquad.loss": 2.1})
    assert result.passed is passed
    assert result.value is None
    assert "missing" in result.detail and f"on_missing={on_missing}" in result.detail


def test_nan_fails():
    result = apply_rule(_rule(kind="value", op="<=", threshold=5), {"production.loss": math.nan}, {})
    assert not result.passed and "NaN" in result.detail


def test_decide_needs_every_rule():
    rules = GateRules(rules=[_rule(name="a"), _rule(name="b", metric="medquad.loss", kind="value", threshold=1.0)])
    passed, results = decide(rules, {"production.loss": 1.0, "medquad.loss": 2.0}, BASELINE)
    assert not passed
    assert [r.passed for r in results] == [True, False]


def test_bad_rules_file_lists_problems(tmp_path):
    path = tmp_path / "rules.json"
    path.write_text(
        json.dumps({"rules": [{"name": "x", "metric": "prod.loss", "kind": "delta", "op": "<", "threshold": 0}]})
    )
    with pytest.raises(ValueError) as err:
        load_rules(path)
    assert "unknown metric 'prod.loss'" in str(err.value) and "op" in str(err.value)
    with pytest.raises(ValueError, match="not found"):
        load_rules(tmp_path / "absent.json")


def test_duplicate_rule_names_rejected():
    with pytest.raises(ValueError, match="unique"):
        GateRules(rules=[_rule(), _rule()])
