"""The answer service on real Ray Serve and the real embedded stack: one ``medretrain serve answers`` per module.

The tests run in file order on the one deployed app (deploying costs seconds on 2 cores): before any
champion exists, then v1, a canary challenger v2, its promotion under load and a rollback, an
unloadable v3, and last the SIGTERM that deletes the application.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Self

import httpx
import pytest
from serving_stack import (
    Service,
    register_adapter,
    start_service,
    stop_service,
    wait_for,
)
from sqlalchemy import select
from stream_stack import close_env, open_env

from deploy.embedded.ray import auth_header
from evaluator import promotion
from schemas.events import RetrainStatus
from services.answers.app import canary_share
from services.answers.records import AnswerRow
from services.store import make_engine
from trainer.model import build_tiny_llama
from trainer.registry import bootstrap

pytestmark = pytest.mark.integration

FRACTION = 0.5
QUESTION = "What are the symptoms of glaucoma?"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture(scope="module")
def service(stack, tmp_path_factory: pytest.TempPathFactory):
    env = open_env(stack, {"mlflow.registered_model": f"test-serve-{uuid.uuid4().hex[:8]}",
                           "serve.challenger_fraction": FRACTION, "serve.swap_poll_interval_s": 0.5,
                           "evaluate.max_new_tokens": 16, "evaluate.promotion": "review"})
    running = start_service(env.settings, env.overrides, tmp_path_factory.mktemp("serve") / "serve.log")
    running.versions = {}  # name -> registered version, shared by the tests of this module
    yield running
    stop_service(running)
    close_env(env)


def sessions(champion_side: bool, n: int) -> list[str]:
    """Session ids the canary split sends to the champion (or to the challenger)."""
    ids = (f"session-{i}" for i in range(10_000))
    return [s for s in ids if (canary_share(s) >= FRACTION) == champion_side][:n]


def served(service: Service) -> dict[str, str]:
    return service.status()["serving"]


@pytest.fixture
def v1(service: Service, tiny_dir: Path) -> str:
    version = bootstrap(service.settings, from_path=tiny_dir)
    service.wait_ready(90)
    return version


@pytest.fixture
def v2(service: Service, v1: str, tiny_dir: Path, tmp_path: Path) -> str:
    if "v2" not in service.versions:
        service.versions["v2"] = register_adapter(service.settings, tiny_dir, v1, tmp_path / "v2", seed=2)
    return service.versions["v2"]


def test_readyz_and_answers_are_503_with_retry_after_until_a_champion_is_loaded(service, tiny_dir):
    ready = service.http.get("/v1/readyz")
    assert ready.status_code == 503 and ready.headers["retry-after"] == "5"
    assert ready.json()["detail"]["ready"] is False
    early = service.ask(QUESTION)
    assert early.status_code == 503 and early.headers["retry-after"] == "5"

    bootstrap(service.settings, from_path=tiny_dir)
    service.wait_ready(90)
    answer = service.ask(QUESTION)
    assert answer.status_code == 200, answer.text
    assert (answer.json()["model_version"], answer.json()["alias"]) == ("1", "champion")


def test_non_read_endpoints_need_the_key_and_bad_input_names_field_and_limit(service):
    s = service
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
        refused = s.http.post("/v1/answers", json={"question": QUESTION}, headers=headers)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert s.http.post("/v1/feedback", json={"answer_id": str(uuid.uuid4()), "rating": 1},
                           headers=headers).status_code == 401
    assert [s.http.get(p).status_code for p in ("/v1/healthz", "/metrics", "/openapi.json")] == [200, 200, 200]

    def detail(body: bytes | dict, path: str = "/v1/answers") -> tuple[int, list]:
        sent = s.http.post(path, content=body, headers=s.auth) if isinstance(body, bytes) else \
            s.http.post(path, json=body, headers=s.auth)
        return sent.status_code, sent.json()["detail"]

    code, errors = detail({"question": "   "})
    assert code == 422 and errors[0]["loc"] == ["body", "question"] and errors[0]["ctx"] == {"min_length": 1}
    code, errors = detail({"question": "x" * 4001})
    assert code == 422 and errors[0]["loc"] == ["body", "question"] and errors[0]["ctx"] == {"max_length": 4000}
    code, errors = detail(b'{"question": "caf\xe9 \xff"}')
    assert code == 422 and errors == [{"loc": ["body", "question"], "msg": "must be UTF-8 text", "type": "utf8"}]
    code, errors = detail(b"{not json")
    assert code == 422 and errors[0]["type"] == "json_invalid"
    code, errors = detail({"question": QUESTION, "temperature": 2})
    assert code == 422 and errors[0]["loc"] == ["body", "temperature"]
    code, errors = detail({"answer_id": str(uuid.uuid4()), "rating": 0}, "/v1/feedback")
    assert code == 422 and errors[0]["loc"] == ["body", "rating"]
    too_big = s.http.post("/v1/answers", json={"question": "x" * 200_000}, headers=s.auth)
    assert too_big.status_code == 413 and "131072" in too_big.json()["detail"]
    unknown = s.http.post("/v1/feedback", json={"answer_id": str(uuid.uuid4()), "rating": 1}, headers=s.auth)
    assert unknown.status_code == 404


def test_canary_sends_a_sticky_share_of_sessions_to_the_challenger_on_the_same_base(service, v1, v2):
    wait_for(lambda: served(service).get("challenger") == v2, what="challenger served")
    for champion_side in (True, False):
        for session in sessions(champion_side, 3):
            answers = [service.ask(QUESTION, session).json() for _ in range(2)]
            expected = ("champion", v1) if champion_side else ("challenger", v2)
            assert [(a["alias"], a["model_version"]) for a in answers] == [expected, expected]
    assert service.status()["loaded"] == [v1, v2]


def stored_versions(service: Service, answer_ids: list[str]) -> dict[str, str]:
    engine = make_engine(service.settings)
    try:
        with engine.connect() as conn:
            stmt = select(AnswerRow.answer_id, AnswerRow.model_version).where(AnswerRow.answer_id.in_(answer_ids))
            return dict(conn.execute(stmt).all())
    finally:
        engine.dispose()


def publish_promoted(settings, version: str) -> None:
    from kafka import KafkaProducer

    status = RetrainStatus(request_id=f"rr-test-{uuid.uuid4().hex[:8]}", phase="promoted", model_version=version)
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap, acks="all")
    try:
        producer.send(settings.kafka.status_topic, status.model_dump_json().encode()).get(timeout=30)
    finally:
        producer.close()


class Load:
    """Clients asking in a loop, each request recorded with its send and receive times."""

    def __init__(self, service: Service, clients: int) -> None:
        self.service, self.results, self.stop = service, [], threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(s,)) for s in sessions(True, clients)]

    def _client(self, session: str) -> None:
        with httpx.Client(base_url=self.service.http.base_url, timeout=120) as http:
            while not self.stop.is_set():
                sent = time.time()
                try:
                    r = http.post("/v1/answers", json={"question": QUESTION, "session_id": session},
                                  headers=self.service.auth)
                    body = r.json() if r.status_code == 200 else {}
                    self.results.append((sent, time.time(), r.status_code, body.get("model_version"), body))
                except httpx.HTTPError as e:
                    self.results.append((sent, time.time(), repr(e), None, {}))

    def versions_after(self, since: float) -> list[str]:
        return [r[3] for r in self.results if r[0] > since]

    def __enter__(self) -> Self:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(180)


def test_promotion_and_rollback_swap_under_load_without_a_failed_request(service, v1, v2):
    settings = service.settings
    swaps_before = service.metric("medretrain_answers_swaps_total", alias="champion")
    with Load(service, clients=4) as load:
        wait_for(lambda: load.versions_after(0).count(v1) >= 8, what="v1 answers")
        promoted_at = time.time()
        promotion.promote(settings, v2, actor="test")
        publish_promoted(settings, v2)  # as the orchestrator does after an automatic promotion
        wait_for(lambda: load.versions_after(promoted_at).count(v2) >= 8, what="v2 answers after the promotion")
        rolled_back_at = time.time()
        promotion.rollback(settings, actor="test")
        wait_for(lambda: load.versions_after(rolled_back_at).count(v1) >= 8, what="v1 answers after the rollback")
    results = load.results
    assert [r for r in results if r[2] != 200] == []
    first_v2 = min(r[1] for r in results if r[3] == v2)
    back_to_v1 = min(r[1] for r in results if r[3] == v1 and r[0] > rolled_back_at)
    # Once one answer came from the new version, every request sent later is served by it, until the rollback.
    assert {r[3] for r in results if first_v2 < r[0] and r[1] < rolled_back_at} == {v2}
    assert {r[3] for r in results if r[0] > back_to_v1} == {v1}
    assert first_v2 > promoted_at
    texts = {v: {r[4]["answer"] for r in results if r[3] == v} for v in (v1, v2)}
    assert not texts[v1] & texts[v2], "the two versions answered alike: the tag may not name the model used"
    assert stored_versions(service, [r[4]["answer_id"] for r in results]) == {r[4]["answer_id"]: r[3] for r in results}
    assert service.metric("medretrain_answers_swaps_total", alias="champion") >= swaps_before + 2
    assert service.metric("medretrain_answers_promotion_events_total") == 1
    assert service.metric("medretrain_answers_batch_size_count") > 0
    assert service.metric("medretrain_answers_generated_tokens_total", version=v2) > 0


def test_a_version_that_cannot_be_loaded_keeps_the_previous_one_and_is_reported(service, v1, tiny_dir, tmp_path):
    broken = register_adapter(service.settings, tiny_dir, v1, tmp_path / "broken", seed=3, broken=True)
    before = served(service)["champion"]
    promotion.promote(service.settings, broken, actor="test")
    status = wait_for(lambda: (st := service.status())["failed_versions"].get(broken) and st, what="failure seen")
    assert "cannot be read" in status["failed_versions"][broken]
    assert status["serving"] == {"champion": before} and broken not in status["loaded"]
    ready = service.http.get("/v1/readyz")
    assert ready.status_code == 200 and broken in ready.json()["failed_versions"]
    assert service.metric("medretrain_answers_swap_failures_total", version=broken) == 1
    for session in sessions(True, 2) + sessions(False, 2):
        answer = service.ask(QUESTION, session)
        assert answer.status_code == 200 and answer.json()["model_version"] == before
    promotion.rollback(service.settings, actor="test", reason="version does not load")


def test_feedback_is_recorded_once_and_counted_by_version(service, v1):
    answer = service.ask(QUESTION, sessions(True, 1)[0]).json()
    version = answer["model_version"]
    before = service.metric("medretrain_answers_feedback_total", version=version, rating="+1")
    up = {"answer_id": answer["answer_id"], "rating": 1}
    first = service.http.post("/v1/feedback", json=up, headers=service.auth)
    again = service.http.post("/v1/feedback", json=up, headers=service.auth)
    assert first.status_code == again.status_code == 200
    assert (first.json()["accepted"], again.json()["accepted"]) == (True, False)
    assert first.json()["event_id"] == again.json()["event_id"] is not None
    conflict = service.http.post("/v1/feedback", json={**up, "rating": -1}, headers=service.auth)
    assert conflict.status_code == 409
    assert service.metric("medretrain_answers_feedback_total", version=version, rating="+1") == before + 1


def test_sigterm_lets_requests_in_flight_finish_then_deletes_the_application(service, v1):
    with Load(service, clients=4) as load:
        wait_for(lambda: len(load.results) >= 8, what="answers under load")
        signalled_at = time.time()
        assert stop_service(service) == 0
    sent_before = [r for r in load.results if r[0] < signalled_at]
    assert sent_before and all(r[2] == 200 for r in sent_before), [r[2] for r in sent_before if r[2] != 200]
    assert any(r[1] > signalled_at for r in sent_before), "no request was in flight at the SIGTERM"
    # The dashboard asks for the Ray token like every Ray client of the stack.
    apps = httpx.get(f"{service.settings.ray.address}/api/serve/applications/", headers=auth_header(service.settings),
                     timeout=30).json()
    assert service.settings.serve.app_name not in apps.get("applications", {})
