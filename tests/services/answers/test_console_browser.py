"""The web console in a real browser (Debian's chromium through Playwright) on a real deployed answer service.

One ``medretrain serve answers`` process (its application under ROUTE, beside any other on the Ray head) and
one browser for the module; the tests run in file order on v1 (the tiny base, champion), v2 (scored by the
evaluator, gate passed: the challenger) and v3 (the gate's decision on v2's measurement under rules it fails).
The run writes the README's screenshots: docs/console-ask.png, console-review.png, console-pipeline.png.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
from eval_fixtures import (
    CHEAP_EVAL,
    FAIL_RULES,
    PASS_RULES,
    log_candidate,
    save_adapter,
    write_rules,
)
from playwright.sync_api import Browser, Page, expect, sync_playwright
from serving_stack import Service, start_service, stop_service, wait_for
from sqlalchemy import select
from stream_stack import close_env, open_env

from deploy.registry import CHALLENGER, CHAMPION, alias_version, open_registry
from evaluator import promotion
from schemas.artifacts import Verdict
from schemas.settings import Settings
from services.answers.keys import ensure_keys
from services.answers.records import FeedbackRow, OutboxRow
from services.store import make_engine
from trainer.model import build_tiny_llama
from trainer.registry import bootstrap

# The module's fixture deploys the service and scores a candidate: minutes on a busy 2-core host.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[3]
DOCS = REPO / "docs"
ROUTE = f"/console-test-{uuid.uuid4().hex[:6]}"
QUESTION = "What are the symptoms of glaucoma?"
CHROMIUM = "/usr/bin/chromium"
expect.set_options(timeout=90_000)  # a promotion downloads and checks the adapter: seconds on a busy 2-core host


def serve_config(path: Path) -> Path:
    """The shipped Serve config with the application renamed and routed under ROUTE: another may hold "/"."""
    config = yaml.safe_load((REPO / "deploy" / "serve" / "answers.yaml").read_text())
    config["applications"][0] |= {"name": f"answers-console-{uuid.uuid4().hex[:6]}", "route_prefix": ROUTE}
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def service(stack, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("console")
    suffix = uuid.uuid4().hex[:8]
    config = serve_config(tmp / "serve.yaml")
    env = open_env(stack, {"mlflow.registered_model": f"test-console-{suffix}",
                           "mlflow.experiment": f"test-console-{suffix}", "serve.challenger_fraction": 0,
                           "serve.config": config,
                           "serve.app_name": yaml.safe_load(config.read_text())["applications"][0]["name"],
                           "serve.swap_poll_interval_s": 0.5, "evaluate.promotion": "review",
                           "evaluate.gate_rules": write_rules(tmp / "pass.json", PASS_RULES),
                           **{f"evaluate.{k}": v for k, v in CHEAP_EVAL.items()}})
    running = start_service(env.settings, env.overrides, tmp / "serve.log", route_prefix=ROUTE)
    try:  # a set-up that fails still deletes the application
        tiny = build_tiny_llama(tmp / "tiny-llama")
        running.versions = {"v1": bootstrap(env.settings, from_path=tiny)}
        running.versions["v2"] = evaluated(env.settings, tiny, running.versions["v1"], tmp, seed=2)
        running.versions["v3"] = judged_failing(env.settings, tiny, running.versions["v1"], tmp,
                                                running.versions["v2"])
        running.wait_ready(300)
        yield running
    finally:
        stop_service(running)
        close_env(env)


def evaluated(settings: Settings, tiny: Path, base: str, tmp: Path, seed: int) -> str:
    """A candidate judged by the real evaluator (decision record, samples, report plots); returns its version."""
    from evaluator.evaluate import run

    adapter = save_adapter(tiny, tmp / f"adapter-{seed}", seed)
    verdict = run(settings, log_candidate(settings, adapter, base_version=base, snapshot_id=None))
    return promotion.registered_version(settings, verdict.candidate_run_id)


def judged_failing(settings: Settings, tiny: Path, base: str, tmp: Path, scored: str) -> str:
    """A candidate that fails FAIL_RULES on ``scored``'s measurement, decided and recorded by the gate's functions.

    Scoring a second candidate would cost minutes on a busy host and show nothing the review of v2 does not.
    """
    from evaluator import gate
    from evaluator.decision import read_decision, record_decision

    client, name = open_registry(settings)
    measured, samples = read_decision(settings, client.get_model_version(name, scored).run_id)
    candidate = log_candidate(settings, save_adapter(tiny, tmp / "adapter-3", 3), base, snapshot_id=None)
    rules = gate.load_rules(write_rules(tmp / "fail.json", FAIL_RULES))
    passed, results = gate.decide(rules, measured.metrics["candidate"], measured.metrics["baseline"])
    verdict = Verdict(candidate_run_id=candidate.run_id, baseline_version=measured.baseline_version, passed=passed,
                      rules=results, metrics=measured.metrics)
    record_decision(settings, verdict, samples, {})
    return promotion.apply_verdict(settings, verdict)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


def url(service: Service, path: str) -> str:
    return f"{str(service.http.base_url).rstrip('/')}/console{path}"


def signed_in(browser: Browser, service: Service, name: str, reviewer: bool = True) -> Page:
    keys = ensure_keys(service.settings)
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.goto(url(service, "/signin"))
    page.fill("input[name=name]", name)
    page.fill("input[name=key]", keys.reviewer_key if reviewer else keys.api_key)
    page.click("button[type=submit]")
    expect(page.locator(".flash.ok[role=status]")).to_contain_text(f"signed in as {name}")
    return page


def reviewing(browser: Browser, service: Service, version: str) -> Page:
    """A reviewer's page on the review of ``version``."""
    page = signed_in(browser, service, "Rev Iewer")
    page.goto(url(service, f"/review?version={version}"))
    return page


def flash(page: Page) -> str:
    return page.locator(".flash").first.inner_text()


def form_post(page: Page, service: Service, path: str, fields: dict[str, str]):
    """A POST with this page's cookies, bypassing the browser's own checks (required fields, the button's lock)."""
    return page.request.post(url(service, path), form=fields, max_redirects=0)


def token(page: Page) -> str:
    return page.locator("input[name=csrf]").first.get_attribute("value")


def actions(settings: Settings, version: str) -> list:
    client, name = open_registry(settings)
    return promotion.actions_of(client.get_model_version(name, version))


def champion(settings: Settings) -> str | None:
    client, name = open_registry(settings)
    return alias_version(client, name, CHAMPION)


def events_for(service: Service, answer_id: str) -> tuple[FeedbackRow, OutboxRow]:
    engine = make_engine(service.settings)
    with engine.connect() as conn:
        feedback = conn.execute(select(FeedbackRow).where(FeedbackRow.answer_id == answer_id)).one()
        event = conn.execute(select(OutboxRow).where(OutboxRow.key == feedback.event_id)).one()
    engine.dispose()
    return feedback, event


def act(page: Page, action: str, reason: str, double_click: bool = False) -> None:
    """Fill in the review page's form of ``action`` and send it, as a person does."""
    form = page.locator("form.act", has=page.locator(f"input[value={action}]"))
    form.locator("input[name=reason]").fill(reason)
    button = form.locator("button")
    button.dblclick() if double_click else button.click()


def ask(page: Page, service: Service, question: str) -> str:
    page.goto(url(service, "/ask"))
    page.fill("textarea[name=question]", question)
    page.click("form[action$='/ask'] button")
    answer = page.locator("#answer")
    expect(answer).to_be_visible(timeout=60_000)
    return answer.get_attribute("data-answer-id")


def test_a_signed_out_visitor_sees_only_the_sign_in(service, browser):
    page = browser.new_page()
    for path in ("/ask", "/review", "/pipeline", "/"):
        page.goto(url(service, path))
        assert page.url.endswith("/console/signin") and page.locator("nav").count() == 0
    assert page.request.get(url(service, f"/artifacts/{'a' * 32}/report/metrics.png")).status == 401
    refused = page.request.post(url(service, "/review"), form={"action": "promote", "version": "2", "reason": "x"})
    assert refused.status == 401 and champion(service.settings) == service.versions["v1"]
    page.fill("input[name=name]", "Mallory")
    page.fill("input[name=key]", "not-the-key")
    page.click("button[type=submit]")
    assert "wrong key" in flash(page) and page.locator("nav").count() == 0
    page.close()


def test_ask_then_plus_one_stores_the_verified_event(service, browser):
    page = signed_in(browser, service, "Dr Ada Clinician", reviewer=False)
    answer_id = ask(page, service, QUESTION)
    expect(page.locator("#answer .tag").first).to_have_text(f"version {service.versions['v1']}")
    page.screenshot(path=str(DOCS / "console-ask.png"), full_page=True)
    page.click("button:has-text('+1')")
    expect(page.locator(".flash.ok[role=status]")).to_contain_text("it becomes training data")
    feedback, event = events_for(service, answer_id)
    stored = json.loads(event.value)
    assert feedback.rating == 1 and stored["question"] == QUESTION and stored["user_rating"] == 5
    assert stored["model_version"] == service.versions["v1"] and stored["source"] == "answer-service"
    assert page.locator("button:has-text('+1')").count() == 0  # the first feedback stands
    page.context.close()


def test_a_correction_is_stored_with_the_corrected_text(service, browser):
    page = signed_in(browser, service, "Dr Ada Clinician", reviewer=False)
    answer_id = ask(page, service, "How is type 2 diabetes treated?")
    page.click("text=Correct this answer")
    unchanged = page.locator("textarea[name=corrected_answer]").input_value()
    page.click("text=Send correction")
    assert "unchanged" in flash(page)  # the model's text as its own correction is refused
    corrected = "Diet, exercise and metformin first; insulin when those do not control the glucose."
    page.click("text=Correct this answer")
    page.fill("textarea[name=corrected_answer]", corrected)
    page.click("text=Send correction")
    expect(page.locator(".flash.ok[role=status]")).to_contain_text("feedback recorded")
    feedback, event = events_for(service, answer_id)
    stored = json.loads(event.value)
    assert feedback.corrected_answer == corrected and stored["answer"] == corrected != unchanged
    assert stored["source"] == "answer-service:correction"
    page.context.close()


def test_review_shows_the_challengers_rules_metrics_plots_and_side_by_side_answers(service, browser):
    v2 = service.versions["v2"]
    page = signed_in(browser, service, "Rev Iewer")
    page.goto(url(service, "/review"))  # no version asked: the challenger
    expect(page.locator("h1")).to_contain_text(f"Version {v2}")
    rules = page.locator("#rules tr")
    assert rules.count() == 1 + len(PASS_RULES)
    assert {rules.nth(i).locator("td").first.inner_text() for i in range(1, rules.count())} == \
        {r["name"] for r in PASS_RULES}
    assert "<= 1e+06" in page.locator("#rules").inner_text()
    expect(page.locator("table.metrics caption").first).to_have_text("medquad")
    samples = page.locator("#samples-medquad tr")
    assert samples.count() == 1 + CHEAP_EVAL["sample_size"]
    assert [samples.first.locator("th").nth(i).inner_text() for i in range(4)] == \
        ["question", "reference", "champion", f"v{v2}"]
    assert page.locator(".plots img").count() == 3
    page.wait_for_function(  # each plot really loaded through the console
        "() => [...document.querySelectorAll('.plots img')].every(img => img.complete && img.naturalWidth > 100)")
    assert page.locator("#lineage").inner_text().count("v1") >= 1
    page.screenshot(path=str(DOCS / "console-review.png"), full_page=True)
    page.context.close()


def test_bad_review_input_is_refused_with_a_message_and_records_nothing(service, browser):
    v2, v1 = service.versions["v2"], service.versions["v1"]
    page = reviewing(browser, service, v2)
    before = len(actions(service.settings, v2))
    base = {"csrf": token(page), "action": "promote", "version": v2, "champion": v1}
    cases = {"give a reason": base | {"reason": "   "},
             "has no version '999'": base | {"version": "999", "reason": "typo"},
             "not a model version": base | {"version": "../2", "reason": "odd"}}
    for expected, fields in cases.items():
        reply = form_post(page, service, "/review", fields)
        assert reply.status == 303
        page.goto(url(service, f"/review?version={v2}"))  # the redirect's page shows the message once
        assert expected in flash(page), expected
    no_token = form_post(page, service, "/review", {k: v for k, v in base.items() if k != "csrf"} | {"reason": "x"})
    assert no_token.status == 403 and "token" in no_token.text()
    wrong_token = form_post(page, service, "/review", base | {"csrf": "forged", "reason": "x"})
    assert wrong_token.status == 403
    user = signed_in(browser, service, "Dr Ada Clinician", reviewer=False)
    user.goto(url(service, f"/review?version={v2}"))
    assert user.locator("form.act").count() == 0
    assert form_post(user, service, "/review", base | {"csrf": token(user), "reason": "x"}).status == 403
    assert len(actions(service.settings, v2)) == before and champion(service.settings) == v1
    user.context.close()
    page.context.close()


def test_promote_with_a_reason_moves_the_alias_once_and_the_ask_page_answers_with_it(service, browser):
    v1, v2 = service.versions["v1"], service.versions["v2"]
    page = reviewing(browser, service, v2)
    stale = {"csrf": token(page), "action": "promote", "version": v2, "champion": v1, "reason": "again"}
    act(page, "promote", "better on medquad, report read", double_click=True)
    expect(page.locator(".flash.ok[role=status]")).to_contain_text(f"version {v2}: promoted by Rev Iewer")
    assert champion(service.settings) == v2
    client, name = open_registry(service.settings)
    assert alias_version(client, name, CHALLENGER) is None
    replay = form_post(page, service, "/review", stale)  # the same form sent again: a double submit
    assert replay.status == 303
    page.goto(url(service, f"/review?version={v2}"))
    assert "the champion is now" in flash(page)
    promoted = [a for a in actions(service.settings, v2) if a.action == "promoted"]
    assert [(a.actor, a.reason) for a in promoted] == [("Rev Iewer", "better on medquad, report read")]
    wait_for(lambda: service.status()["serving"].get(CHAMPION) == v2, what="v2 served")
    asker = signed_in(browser, service, "Dr Ada Clinician", reviewer=False)
    ask(asker, service, QUESTION)
    expect(asker.locator("#answer .tag").first).to_have_text(f"version {v2}")
    asker.context.close()
    page.context.close()


def test_a_failed_version_needs_the_override_and_reject_records_the_reason(service, browser):
    v2, v3 = service.versions["v2"], service.versions["v3"]
    page = reviewing(browser, service, v3)
    expect(page.locator("h1 .tag.bad")).to_have_text("gate failed")
    assert page.locator("tr.fail td").first.inner_text() == "impossible_loss"
    assert page.locator("label.override").count() == 1
    no_override = form_post(page, service, "/review", {"csrf": token(page), "action": "promote", "version": v3,
                                                       "champion": v2, "reason": "looks fine"})
    assert no_override.status == 303 and champion(service.settings) == v2
    page.goto(url(service, f"/review?version={v3}"))
    assert "override the gate" in flash(page)
    stale = {"csrf": token(page), "action": "reject", "version": v3, "champion": v2, "reason": "again"}
    act(page, "reject", "fails the loss bound")
    expect(page.locator(".flash.ok[role=status]")).to_contain_text(f"version {v3}: rejected by Rev Iewer")
    form_post(page, service, "/review", stale)
    page.goto(url(service, f"/review?version={v3}"))
    assert "already rejected" in flash(page)
    rejected = [a for a in actions(service.settings, v3) if a.action == "rejected"]
    assert [(a.actor, a.reason) for a in rejected] == [("Rev Iewer", "fails the loss bound")]
    page.context.close()


def test_rollback_gives_the_champion_back_and_the_ask_page_answers_with_it(service, browser):
    v1, v2 = service.versions["v1"], service.versions["v2"]
    page = reviewing(browser, service, v2)
    act(page, "rollback", "clinicians report worse answers")
    expect(page.locator(".flash.ok[role=status]")).to_contain_text(f"version {v1}: rollback by Rev Iewer")
    assert champion(service.settings) == v1
    restored = actions(service.settings, v1)[-1]
    assert (restored.actor, restored.action) == ("Rev Iewer", "rollback")
    assert "clinicians report worse answers" in restored.reason
    wait_for(lambda: service.status()["serving"].get(CHAMPION) == v1, what="v1 served again")
    ask(page, service, QUESTION)
    expect(page.locator("#answer .tag").first).to_have_text(f"version {v1}")
    page.context.close()


def test_a_page_gone_stale_after_someone_else_promoted_is_refused(service, browser):
    v1, v2 = service.versions["v1"], service.versions["v2"]
    page = reviewing(browser, service, v2)  # shows champion v1
    promotion.promote(service.settings, v2, actor="someone-else", reason="from the CLI")
    before = len(actions(service.settings, v2))
    act(page, "promote", "ready")
    refused = f"the page showed champion {v1}, but the champion is now {v2}"
    expect(page.locator(".flash.bad[role=status]")).to_contain_text(refused)
    assert len(actions(service.settings, v2)) == before
    page.context.close()


def test_pipeline_shows_status_the_last_retrains_and_the_last_drift_check(service, browser):
    from services.trigger.drift import QuestionSample, detect
    from services.trigger.drift_monitor import LiveWindow, log_report
    from services.trigger.trigger import emit_manual

    settings = service.settings
    request = emit_manual(settings, "console pipeline check", {}, "tester")
    rng = np.random.default_rng(0)

    def sample(n: int, shift: float) -> QuestionSample:
        rows = rng.normal(shift, 1.0, (n, 8)).astype(np.float32)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        return QuestionSample([f"question {i}" for i in range(n)], rows, ["live"] * n, ["symptoms"] * n)

    reference, window = sample(60, 0.0), sample(60, 0.8)
    run_id, _ = log_report(settings, service.versions["v2"], reference, LiveWindow(window, 60),
                           detect(reference, window, settings.drift), signal=lambda run: None)
    page = signed_in(browser, service, "Op Erator", reviewer=False)
    page.goto(url(service, "/pipeline"))
    assert re.fullmatch(r"\d+", page.locator("#rows-to-trigger .v").inner_text())
    retrains = page.locator("#retrains").inner_text()
    assert request.request_id in retrains
    expect(page.locator("#drift")).to_contain_text(run_id)
    page.wait_for_function("() => document.querySelector(\"img[alt='drift report']\").naturalWidth > 100")
    assert page.locator(f"a[href*='{run_id}']").count() >= 1
    page.screenshot(path=str(DOCS / "console-pipeline.png"), full_page=True)
    page.context.close()
