"""The console's pure parts: sign-in keys and names, signed sessions, form tokens, metrics per eval set."""

from __future__ import annotations

import time

import pytest

from schemas.artifacts import Verdict
from services.answers.console.auth import (
    ROLE_REVIEWER,
    ROLE_USER,
    Sessions,
    check_name,
    csrf_matches,
)
from services.answers.console.review import metric_rows
from services.answers.keys import ApiKeys

KEYS = ApiKeys(api_key="a" * 43, reviewer_key="r" * 43)


def test_each_key_grants_its_role_and_any_other_text_none():
    sessions = Sessions(KEYS, 60)
    assert sessions.role_for("a" * 43) == ROLE_USER and sessions.role_for(f" {'r' * 43}\n") == ROLE_REVIEWER
    assert [sessions.role_for(k) for k in ("", "a" * 42, "r" * 44, "Bearer " + "a" * 43)] == [None] * 4


def test_a_session_reads_back_only_unaltered_unexpired_and_under_the_same_keys():
    sessions = Sessions(KEYS, 60)
    cookie = sessions.issue("Dr Ada", ROLE_REVIEWER)
    session = sessions.read(cookie)
    assert (session.name, session.reviewer) == ("Dr Ada", True) and csrf_matches(session, session.csrf)
    assert not csrf_matches(session, "") and not csrf_matches(session, session.csrf[:-1] + "x")
    assert sessions.read(cookie[:-2] + ("AA" if not cookie.endswith("AA") else "BB")) is None
    assert Sessions(ApiKeys("a" * 43, "z" * 43), 60).read(cookie) is None  # a rotated key signs everyone out
    assert sessions.read(sessions.issue("x", ROLE_USER)).csrf != session.csrf  # one token per sign-in
    short = Sessions(KEYS, 1)
    old = short.issue("x", ROLE_USER)
    time.sleep(2.1)
    assert short.read(old) is None and short.read(None) is None


@pytest.mark.parametrize(("raw", "problem"), [("", "enter your name"), ("   ", "enter your name"),
                                              ("x" * 81, "at most 80"), ("Ada\x00", "control")])
def test_a_bad_name_is_refused_with_the_reason(raw, problem):
    with pytest.raises(ValueError, match=problem):
        check_name(raw)


def test_names_are_recorded_with_their_spaces_collapsed():
    assert check_name("  Dr   Ada \t Lovelace ") == "Dr Ada Lovelace"


def test_metrics_are_grouped_per_eval_set_with_deltas_and_missing_sides():
    verdict = Verdict(candidate_run_id="r", baseline_version="1", passed=True, rules=[],
                      metrics={"baseline": {"medquad.loss": 2.0, "production.loss": 3.0},
                               "candidate": {"medquad.loss": 1.5, "medquad.bleu": 0.2, "production.loss": 3.5}})
    rows = metric_rows(verdict)
    assert list(rows) == ["medquad", "production"]
    assert [(r.metric, r.delta) for r in rows["medquad"]] == [("bleu", None), ("loss", -0.5)]
    assert rows["production"][0].delta == 0.5
