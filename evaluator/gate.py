"""The promotion gate: rules from a JSON file applied to candidate and baseline metrics.

Rules live in ``settings.evaluate.gate_rules`` (default ``evaluator/gate_rules.json``), so
thresholds change without code. Each rule compares one metric ``<set>.<name>``:

- ``kind: "value"``: the candidate's value;
- ``kind: "delta"``: candidate minus baseline (loss must *drop*: ``op "<="``, negative threshold);
- ``kind: "relative_delta"``: (candidate - baseline) / |baseline| (the forgetting guard on perplexity).

A metric that cannot be computed (no production slice in the snapshot) is decided by the
rule's ``on_missing`` and says so in the record, never silently.

``online.<up_rate|correction_rate>`` come from live feedback (``evaluator/online.py``): present only once the
candidate has served ``evaluate.min_online_ratings`` rated answers, otherwise missing with the reason.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from evaluator.scoring import METRIC_NAMES, SET_NAMES
from schemas.artifacts import RuleResult

_OPS = {"<=": operator.le, ">=": operator.ge}
ONLINE_SET = "online"
ONLINE_METRICS = ("up_rate", "correction_rate")
"""Rates of the answers users rated: +1 without a correction, and corrected (``OnlineStats``)."""


class GateRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    metric: str
    """``<set>.<metric>``, e.g. ``production.loss``."""
    kind: Literal["value", "delta", "relative_delta"]
    op: Literal["<=", ">="]
    threshold: float
    on_missing: Literal["fail", "pass"] = "fail"
    """Verdict when the metric is absent for candidate or baseline (e.g. no production slice)."""
    why: str = ""

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        set_name, _, metric = value.partition(".")
        if set_name == ONLINE_SET and metric in ONLINE_METRICS:
            return value
        if set_name not in SET_NAMES or metric not in METRIC_NAMES:
            raise ValueError(f"unknown metric {value!r}: use <{'|'.join(SET_NAMES)}>.<{'|'.join(METRIC_NAMES)}> "
                             f"or {ONLINE_SET}.<{'|'.join(ONLINE_METRICS)}>")
        return value


class GateRules(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    rules: list[GateRule] = Field(min_length=1)

    @field_validator("rules")
    @classmethod
    def _unique_names(cls, rules: list[GateRule]) -> list[GateRule]:
        names = [r.name for r in rules]
        if len(set(names)) != len(names):
            raise ValueError(f"rule names must be unique: {names}")
        return rules


REPO_ROOT = Path(__file__).resolve().parent.parent


def load_rules(path: Path) -> GateRules:
    """Read and validate the rules file; every problem is reported in one error.

    A relative path is read from the working directory, else from the repository root, so the
    default ``evaluator/gate_rules.json`` works wherever ``medretrain`` is started.
    """
    path = Path(path)
    if not path.is_absolute() and not path.exists() and (REPO_ROOT / path).exists():
        path = REPO_ROOT / path
    try:
        return GateRules.model_validate(json.loads(Path(path).read_text()))
    except FileNotFoundError as e:
        raise ValueError(f"gate rules file not found: {path} (settings.evaluate.gate_rules)") from e
    except (json.JSONDecodeError, ValidationError) as e:
        raise ValueError(f"invalid gate rules in {path}: {e}") from e


def _rule_value(rule: GateRule, candidate: dict[str, float], baseline: dict[str, float]) -> float | None:
    cand = candidate.get(rule.metric)
    if rule.kind == "value":
        return cand
    base = baseline.get(rule.metric)
    if cand is None or base is None:
        return None
    if rule.kind == "delta":
        return cand - base
    if base == 0:
        return 0.0 if cand == 0 else math.copysign(math.inf, cand)
    return (cand - base) / abs(base)


def apply_rule(rule: GateRule, candidate: dict[str, float], baseline: dict[str, float],
               missing_why: Mapping[str, str] | None = None) -> RuleResult:
    """One rule's verdict with the value it was decided on; ``missing_why`` explains absent sets by set name."""
    value = _rule_value(rule, candidate, baseline)
    result = {"name": rule.name, "metric": f"{rule.kind}({rule.metric})", "op": rule.op, "threshold": rule.threshold}
    if value is None:
        passed = rule.on_missing == "pass"
        why = (missing_why or {}).get(rule.metric.partition(".")[0], "missing for candidate or baseline")
        detail = f"{rule.metric} {why}; on_missing={rule.on_missing}"
        return RuleResult(**result, value=None, passed=passed, detail=detail)
    if math.isnan(value):
        return RuleResult(**result, value=None, passed=False, detail=f"{rule.metric} is NaN")
    passed = _OPS[rule.op](value, rule.threshold)
    detail = f"{value:.6g} {rule.op} {rule.threshold:g}: {'pass' if passed else 'FAIL'}" + (
        f" ({rule.why})" if rule.why else ""
    )
    return RuleResult(**result, value=value, passed=passed, detail=detail)


def decide(rules: GateRules, candidate: dict[str, float], baseline: dict[str, float],
           missing_why: Mapping[str, str] | None = None) -> tuple[bool, list[RuleResult]]:
    """All rules' results; the candidate passes only if every rule passes."""
    results = [apply_rule(rule, candidate, baseline, missing_why) for rule in rules.rules]
    return all(r.passed for r in results), results
