"""Drift detector: the statistics on synthetic data, the decision on real embeddings, the loop on the stack."""

from __future__ import annotations

import logging
import random
import uuid

import numpy as np
import pytest
from drift_shifts import consumer_questions
from stream_events import build_event

from schemas.settings import DriftSettings
from services.trigger.drift import (
    OTHER,
    QuestionSample,
    categorical_test,
    detect,
    holm,
    length_test,
    mmd_test,
    permutation_labels,
    topic_groups,
)
from services.trigger.drift_reference import Row, medquad_rows, sample_reference

SMALL = DriftSettings(window_size=100, reference_size=300, permutations=200, seed=3)


def _unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def test_holm_steps_down_and_stops_at_the_first_keep():
    p_values = {"a": 0.01, "b": 0.013, "c": 0.5, "d": 0.02}
    assert holm(p_values, 0.05) == {"a": True, "b": True, "c": False, "d": True}
    # 0.013 > 0.05/4: nothing is rejected, although 0.013 alone would pass at 0.05.
    assert holm({"a": 0.013, "b": 0.014, "c": 0.9, "d": 0.9}, 0.05) == dict.fromkeys("abcd", False)


def _labels(n: int, m: int, permutations: int = 200, seed: int = 0) -> np.ndarray:
    """Question-level permutations of n reference rows followed by m window rows."""
    return permutation_labels(np.arange(n + m), m, permutations, np.random.default_rng(seed))


def test_categorical_test_pools_rare_categories_and_names_the_new_one():
    reference = ["GHR"] * 500 + ["GARD"] * 500 + ["CDC"] * 3
    shifted = categorical_test(reference + ["GHR"] * 100 + ["GARD"] * 90 + ["consumer"] * 10, _labels(1003, 200),
                               min_expected=5)
    assert shifted.p_value == pytest.approx(1 / 201)
    assert shifted.detail["top_shifted"][0] == {"category": "consumer", "reference_share": 0.0, "window_share": 0.05}
    same = categorical_test(reference + ["GHR"] * 50 + ["GARD"] * 50, _labels(1003, 100), min_expected=5)
    assert same.p_value > 0.5
    assert OTHER in {s["category"] for s in same.detail["top_shifted"]}  # CDC, expected 0.3 times, was pooled


def test_mmd_permutation_p_value_separates_null_from_a_shift():
    rng = np.random.default_rng(0)
    reference = _unit(rng.normal(size=(400, 16)))
    same, _ = mmd_test(np.concatenate([reference, _unit(rng.normal(size=(80, 16)))]), _labels(400, 80), rng)
    shifted, witness = mmd_test(np.concatenate([reference, _unit(rng.normal(size=(80, 16)) + 0.5)]), _labels(400, 80),
                                rng)
    assert same.p_value > 0.05
    assert shifted.p_value == pytest.approx(1 / 201)
    assert shifted.statistic > 10 * abs(same.statistic)
    assert witness.shape == (80,)


def test_length_test_sees_longer_questions_and_not_equal_ones():
    rng = np.random.default_rng(1)
    reference = rng.integers(20, 80, size=300)
    assert length_test(np.concatenate([reference, rng.integers(20, 80, size=100)]), _labels(300, 100)).p_value > 0.05
    assert length_test(np.concatenate([reference, rng.integers(60, 140, size=100)]), _labels(300, 100)).p_value < 0.01


def test_topic_permutations_move_whole_topics():
    sample = QuestionSample(list("abcdef"), np.zeros((6, 2), np.float32), ["s"] * 6, ["t"] * 6,
                            ["Glaucoma", "glaucoma ", None, "Asthma", None, "asthma"])
    groups = topic_groups(sample, sample)
    assert groups.max() + 1 == 8  # per side: glaucoma, asthma and two untopical questions
    labels = permutation_labels(groups, len(sample), 50, np.random.default_rng(0))
    assert labels[:6, 0].sum() == 0 and labels[6:, 0].sum() == 6
    for column in labels.T:
        for group in np.unique(groups):
            assert len(set(column[groups == group])) == 1  # a topic is never split between the sides
        assert column[np.unique(groups, return_index=True)[1]].sum() == 4  # as many topics as the window has


def test_a_sample_refuses_misaligned_columns():
    with pytest.raises(ValueError, match="one embedding, source and qtype per question"):
        QuestionSample(["a", "b"], np.zeros((1, 4), np.float32), ["s", "s"], ["t", "t"])


def _sample(rows: list[Row]) -> QuestionSample:
    from services.trigger.drift_reference import build_sample

    return build_sample(rows, batch_size=64)


@pytest.fixture(scope="module")
def reference() -> QuestionSample:
    rows, _ = sample_reference([], SMALL.reference_size, SMALL.seed)
    return _sample(rows)


def _consumer_rows(n: int, seed: int) -> list[Row]:
    """Consumer-style questions about production topics, labelled like MedQuAD rows so only style differs."""
    from trainer.medquad import load_medquad

    production = load_medquad("production")
    rng = random.Random(seed)
    labels = [(p.source, p.qtype or "(none)") for p in production]
    return [(q, *rng.choice(labels), None) for q in consumer_questions([p.focus or "" for p in production], n, seed)]


def test_no_drift_on_held_out_medquad_with_a_fixed_seed(reference):
    window = _sample(random.Random(1).sample(medquad_rows("validation"), SMALL.window_size))
    result = detect(reference, window, SMALL)
    assert not result.drift, result.evidence()
    assert all(t.p_value > SMALL.alpha / 4 for t in result.tests.values())


def test_drift_on_consumer_style_questions(reference):
    result = detect(reference, _sample(_consumer_rows(SMALL.window_size, seed=2)), SMALL)
    assert result.drift
    assert result.tests["embedding"].rejected
    evidence = result.evidence()
    assert evidence["tests"]["embedding"]["p_value"] == pytest.approx(1 / (SMALL.permutations + 1))
    assert len(evidence["examples"]) == 5
    assert all(q.islower() for q in evidence["examples"])  # every consumer template is lower case, MedQuAD is not


def test_drift_on_a_single_source_window_names_the_source(reference):
    cdc = [row for row in medquad_rows("production") if row[1] == "CDC"][: SMALL.window_size]
    result = detect(reference, _sample(cdc), SMALL)
    assert result.drift and result.tests["source"].rejected
    assert result.tests["source"].detail["top_shifted"][0]["category"] == "CDC"


# --- integration: the monitor on the real stack ------------------------------------------------------------------

def _register_champion(settings) -> str:
    """A registered base version whose run will hold the drift reference (no weights needed for drift)."""
    from deploy.registry import CHAMPION, open_registry
    from trainer.tracking import log_json, open_run

    client, name = open_registry(settings)
    run_id = open_run(settings, {"kind": "base"}, run_name="drift-test-base")
    log_json(settings, run_id, "origin.json", {"origin": "drift test"}, artifact_path="model")
    client.create_registered_model(name)
    version = client.create_model_version(name, source=f"runs:/{run_id}/model", run_id=run_id,
                                          tags={"kind": "base", "origin": "drift-test"}).version
    client.set_registered_model_alias(name, CHAMPION, version)
    return str(version)


def _store_rows(env, rows: list[Row], start: int) -> None:
    from services.store import insert_events
    from services.stream.ingest import SourceRecord, event_row

    engine = env.engine()
    with engine.begin() as conn:
        insert_events(conn, [
            event_row(build_event(start + i, question=q, source=s, qtype=t, focus=f),
                      SourceRecord(env.settings.kafka.events_topic, 0, start + i, b""))
            for i, (q, s, t, f) in enumerate(rows)
        ])
    engine.dispose()


def _set_state(env, request_id: str, state: str) -> None:
    from sqlalchemy import update

    from services.store import RetrainRequestRow

    engine = env.engine()
    with engine.begin() as conn:
        conn.execute(update(RetrainRequestRow).where(RetrainRequestRow.request_id == request_id).values(state=state))
    engine.dispose()


@pytest.mark.integration
def test_drift_emits_one_request_per_cooldown_with_evidence_in_mlflow(stack, caplog):
    from stream_stack import close_env, open_env, read_topic

    from deploy.registry import mlflow_client as client
    from schemas.events import RetrainRequest
    from services.trigger.drift_monitor import DriftMonitor

    suffix = uuid.uuid4().hex[:10]
    env = open_env(stack, {"mlflow.registered_model": f"drift-test-{suffix}", "drift.window_size": SMALL.window_size,
                           "drift.reference_size": SMALL.reference_size, "drift.permutations": SMALL.permutations,
                           "trigger.cooldown_s": 3600})
    settings = env.settings
    try:
        version = _register_champion(settings)
        _store_rows(env, _consumer_rows(SMALL.window_size, seed=4), start=0)
        outcome = DriftMonitor(settings).check()
        assert outcome.champion == version and outcome.result.drift
        assert outcome.request is not None and outcome.request.reason == "drift"
        evidence = outcome.request.evidence["drift"]
        assert evidence["tests"]["embedding"]["rejected"] and len(evidence["examples"]) == 5
        assert evidence["report_run_id"] == outcome.report_run_id

        published = [RetrainRequest.model_validate_json(r.value)
                     for r in read_topic(settings, settings.kafka.requests_topic, idle_ms=1500)]
        assert [r.request_id for r in published] == [outcome.request.request_id]

        mlflow = client(settings)
        report_files = {f.path for f in mlflow.list_artifacts(outcome.report_run_id)}
        assert {"drift_report.json", "drift_report.png"} <= report_files
        run = mlflow.get_run(outcome.report_run_id)
        assert run.data.tags["medretrain.champion_version"] == version
        assert run.data.tags["medretrain.request_id"] == outcome.request.request_id
        champion_run = mlflow.get_model_version(settings.mlflow.registered_model, version).run_id
        assert {f.path for f in mlflow.list_artifacts(champion_run, "drift")} == {"drift/reference.npz",
                                                                                  "drift/reference.json"}

        # The retrain finished; new drifted rows arrive inside the cooldown: drift again, but no request.
        _set_state(env, outcome.request.request_id, "succeeded")
        _store_rows(env, _consumer_rows(SMALL.window_size + 20, seed=5)[-20:], start=SMALL.window_size)
        with caplog.at_level(logging.INFO):
            again = DriftMonitor(settings).check()  # a fresh monitor: the reference now comes from MLflow
        assert again.result.drift and again.request is None
        assert "loaded from run" in caplog.text and "building the drift reference" not in caplog.text
        assert "cooldown" in caplog.text
        assert len(read_topic(settings, settings.kafka.requests_topic, idle_ms=1500)) == 1
    finally:
        close_env(env)
