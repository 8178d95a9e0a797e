"""The evaluator stage end to end on the real embedded MLflow with a tiny model and real LoRA candidates."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import pytest
from eval_fixtures import FAIL_RULES, PASS_RULES, log_candidate
from typer.testing import CliRunner

from deploy.registry import RUN_VERSION_TAG, mlflow_client, open_registry
from evaluator import promotion
from evaluator.decision import read_decision
from evaluator.evaluate import run as evaluate_run
from schemas.artifacts import SnapshotManifest, Verdict
from schemas.data import QAPair
from schemas.settings import Settings
from services.cli import build_app
from trainer.medquad import load_medquad

pytestmark = pytest.mark.integration


def put_snapshot(settings: Settings, n_eval: int = 6) -> str:
    """A complete snapshot in S3 (files, then manifest) whose eval slice is a few MedQuAD production rows."""
    from deploy.clients import boto3_s3

    snapshot_id = f"snap-test-{uuid.uuid4().hex[:8]}"
    rows = load_medquad("production")
    files = {
        "train.jsonl": rows[:4],
        "eval.jsonl": rows[100 : 100 + n_eval],
    }
    s3, prefix = boto3_s3(settings), f"datasets/{snapshot_id}/"
    digests = {}
    for name, part in files.items():
        body = "".join(QAPair(**r.model_dump(exclude={"split"})).model_dump_json() + "\n" for r in part).encode()
        digests[name] = hashlib.sha256(body).hexdigest()
        s3.put_object(Bucket=settings.s3.datasets_bucket, Key=prefix + name, Body=body)
    manifest = SnapshotManifest(
        snapshot_id=snapshot_id,
        request_id="rr-test",
        uri=f"s3://{settings.s3.datasets_bucket}/{prefix}",
        files=digests,
        row_count=4 + n_eval,
        train_rows=4,
        eval_rows=n_eval,
        min_row_id=1,
        max_row_id=4 + n_eval,
        first_event_id=None,
        last_event_id=None,
        kafka_offsets={},
        produced_from=None,
        produced_to=None,
    )
    s3.put_object(
        Bucket=settings.s3.datasets_bucket, Key=prefix + "manifest.json", Body=manifest.model_dump_json().encode()
    )
    return snapshot_id


def aliases(settings: Settings) -> dict[str, str]:
    return dict(mlflow_client(settings).get_registered_model(settings.mlflow.registered_model).aliases)


def actions(settings: Settings, version: str) -> list[str]:
    client, name = open_registry(settings)
    return [a.action for a in promotion.actions_of(client.get_model_version(name, version))]


def cli(settings: Settings, *args: str):
    """Run ``medretrain`` with this test's registered model and cheap evaluation settings."""
    sets = [
        f"mlflow.registered_model={settings.mlflow.registered_model}",
        f"evaluate.gate_rules={settings.evaluate.gate_rules}",
        f"evaluate.promotion={settings.evaluate.promotion}",
        *(
            f"evaluate.{k}={getattr(settings.evaluate, k)}"
            for k in ("sample_size", "loss_rows", "max_new_tokens", "batch_size")
        ),
    ]
    overrides = [x for s in sets for x in ("--set", s)]
    return CliRunner().invoke(build_app(), [*overrides, *args], env={"COLUMNS": "250"})


def test_passing_candidate_in_auto_mode_becomes_champion_with_full_record(make_settings, make_candidate, tmp_path):
    import mlflow

    settings = make_settings(PASS_RULES, promotion="auto")
    candidate = make_candidate(settings, seed=1, snapshot_id=put_snapshot(settings))

    verdict = evaluate_run(settings, candidate)

    assert verdict.passed and verdict.baseline_version == "1"
    for side in ("candidate", "baseline"):
        for key in (
            "medquad.loss",
            "medquad.perplexity",
            "medquad.rougeL",
            "medquad.bleu",
            "production.loss",
            "production.degenerate_rate",
            "production.len_mean",
        ):
            assert key in verdict.metrics[side], (side, key)
    # the random adapter really changes the model: same data, different loss
    assert verdict.metrics["candidate"]["medquad.loss"] != verdict.metrics["baseline"]["medquad.loss"]
    production_rule = next(r for r in verdict.rules if r.name == "production_loss_improves")
    assert production_rule.value == pytest.approx(
        verdict.metrics["candidate"]["production.loss"] - verdict.metrics["baseline"]["production.loss"]
    )

    recorded, samples = read_decision(settings, candidate.run_id)
    assert recorded == verdict
    assert len(samples["medquad"]) == 4 and len(samples["production"]) == 4
    run = mlflow_client(settings).get_run(candidate.run_id)
    assert run.data.tags["medretrain.gate.passed"] == "true"
    for rule in PASS_RULES:
        assert run.data.tags[f"medretrain.gate.rule.{rule['name']}"].startswith("pass ")
    assert run.data.metrics["eval.candidate.production.loss"] == pytest.approx(
        verdict.metrics["candidate"]["production.loss"]
    )

    report = Path(
        mlflow.artifacts.download_artifacts(run_id=candidate.run_id, artifact_path="report", dst_path=str(tmp_path))
    )
    for name in ("report.html", "metrics.png", "loss_curves.png", "answer_lengths.png"):
        assert (report / name).stat().st_size > 500, name
    assert "production_loss_improves" in (report / "report.html").read_text()

    version = promotion.registered_version(settings, candidate.run_id)
    assert aliases(settings) == {"champion": version}
    mv = mlflow_client(settings).get_model_version(settings.mlflow.registered_model, version)
    assert mv.source == f"runs:/{candidate.run_id}/adapter"
    assert {k: mv.tags[k] for k in ("kind", "base_version", "parent_version", "gate", "request", "snapshot")} == {
        "kind": "adapter",
        "base_version": "1",
        "parent_version": "1",
        "gate": "passed",
        "request": candidate.lineage.request_id,
        "snapshot": candidate.lineage.snapshot_id,
    }
    assert float(mv.tags["metric.production.loss"]) == pytest.approx(
        verdict.metrics["candidate"]["production.loss"], rel=1e-5
    )
    assert actions(settings, version) == ["registered", "challenger", "promoted"]
    client, name = open_registry(settings)
    assert promotion.champion_history(client, name) == ["1", version]


def test_review_mode_waits_for_promote_through_the_cli(make_settings, make_candidate):
    settings = make_settings(PASS_RULES, promotion="review")
    candidate = make_candidate(settings, seed=2)

    result = cli(settings, "evaluate", "--run", candidate.run_id)
    assert result.exit_code == 0, result.output
    assert "gate passed" in result.output
    assert aliases(settings) == {"champion": "1", "challenger": "2"}

    # no snapshot: the production rule is decided by on_missing, and says so
    verdict, _ = read_decision(settings, candidate.run_id)
    production_rule = next(r for r in verdict.rules if r.name == "production_loss_improves")
    assert production_rule.value is None and "on_missing=pass" in production_rule.detail
    assert not any(k.startswith("production.") for k in verdict.metrics["candidate"])

    review = cli(settings, "registry", "review")
    assert review.exit_code == 0, review.output
    for text in ("medquad.loss", "medquad.rougeL", "forgetting_guard", "sample answers: medquad", "report.html"):
        assert text in review.output

    promoted = cli(settings, "registry", "promote", "2", "--actor", "alice")
    assert promoted.exit_code == 0, promoted.output
    assert aliases(settings) == {"champion": "2"}
    client, name = open_registry(settings)
    last = promotion.actions_of(client.get_model_version(name, "2"))[-1]
    assert (last.action, last.actor) == ("promoted", "alice")


def test_failing_candidate_leaves_the_champion_and_needs_force_with_reason(make_settings, make_candidate):
    settings = make_settings(FAIL_RULES, promotion="auto")
    candidate = make_candidate(settings, seed=3)

    verdict = evaluate_run(settings, candidate)

    assert not verdict.passed
    assert [r.name for r in verdict.rules if not r.passed] == ["impossible_loss"]
    assert aliases(settings) == {"champion": "1"}
    run = mlflow_client(settings).get_run(candidate.run_id)
    assert run.data.tags["medretrain.gate.passed"] == "false"
    assert "impossible_loss" in run.data.tags["medretrain.gate.reasons"]
    version = run.data.tags[RUN_VERSION_TAG]
    mv = mlflow_client(settings).get_model_version(settings.mlflow.registered_model, version)
    assert (mv.tags["gate"], mv.tags["gate.failed_rules"]) == ("failed", "impossible_loss")
    assert actions(settings, version) == ["registered"]

    no_challenger = cli(settings, "registry", "review")
    assert no_challenger.exit_code == 1 and "no challenger" in no_challenger.output
    unknown = cli(settings, "evaluate", "--run", "0123456789abcdef0123456789abcdef")
    assert unknown.exit_code == 1 and "no MLflow run" in unknown.output

    with pytest.raises(promotion.RegistryError, match="did not pass the gate"):
        promotion.promote(settings, version, actor="bob")
    refused = cli(settings, "registry", "promote", version, "--force")
    assert refused.exit_code == 1 and "--force needs --reason" in refused.output
    assert aliases(settings) == {"champion": "1"}

    forced = cli(settings, "registry", "promote", version, "--force", "--reason", "hotfix approved by clinical lead")
    assert forced.exit_code == 0, forced.output
    assert aliases(settings) == {"champion": version}
    last = promotion.actions_of(mlflow_client(settings).get_model_version(settings.mlflow.registered_model, version))[
        -1
    ]
    assert (last.action, last.reason) == ("forced", "hotfix approved by clinical lead")


def _judged(settings: Settings, candidate, passed: bool = True) -> str:
    """Register a candidate through promotion alone (it reads only the Verdict)."""
    verdict = Verdict(
        candidate_run_id=candidate.run_id,
        baseline_version="1",
        passed=passed,
        rules=[],
        metrics={"candidate": {"medquad.loss": 2.0}, "baseline": {"medquad.loss": 2.1}},
    )
    return promotion.apply_verdict(settings, verdict)


def test_reject_and_rollback_round_trips(make_settings, make_candidate):
    settings = make_settings(promotion="review")
    v2, v3, v4 = (_judged(settings, make_candidate(settings, seed=s)) for s in (4, 5, 6))
    assert aliases(settings)["challenger"] == v4

    promotion.promote(settings, v2, actor="alice")
    promotion.promote(settings, v3, actor="alice")
    assert aliases(settings)["champion"] == v3

    rejected = cli(settings, "registry", "reject", v4, "--reason", "answers too short", "--actor", "carol")
    assert rejected.exit_code == 0, rejected.output
    assert "challenger" not in aliases(settings)
    with pytest.raises(promotion.RegistryError, match="was rejected"):
        promotion.promote(settings, v4, actor="alice")
    with pytest.raises(promotion.RegistryError, match="is the champion"):
        promotion.reject(settings, v3, actor="carol", reason="x")

    assert cli(settings, "registry", "rollback", "--reason", "bad feedback").exit_code == 0
    assert aliases(settings)["champion"] == v2
    promotion.rollback(settings, actor="carol")
    assert aliases(settings)["champion"] == "1"
    with pytest.raises(promotion.RegistryError, match="no earlier champion"):
        promotion.rollback(settings, actor="carol")
    assert aliases(settings)["champion"] == "1"

    promotion.promote(settings, v3, actor="alice")  # history continues after a rollback
    promotion.rollback(settings, actor="alice")
    assert aliases(settings)["champion"] == "1"

    assert actions(settings, v3) == ["registered", "challenger", "promoted", "rollback", "promoted", "rollback"]
    assert actions(settings, v4) == ["registered", "challenger", "rejected"]
    table = cli(settings, "registry", "history")
    assert table.exit_code == 0 and "answers too short" in table.output and "carol" in table.output
    recorded = promotion.history(settings)
    assert [a.at for a in recorded] == sorted(a.at for a in recorded)


def test_no_alias_points_at_a_version_without_artifacts(make_settings, make_candidate, tiny_model_dir):
    settings = make_settings(promotion="auto")
    make_candidate(settings, seed=7)  # a sound version 2 exists, champion still 1
    empty = log_candidate(settings, adapter_dir=None, base_version="1", snapshot_id=None)

    with pytest.raises(promotion.RegistryError, match="lacks|not downloadable"):
        _judged(settings, empty)
    assert aliases(settings) == {"champion": "1"}


def test_decision_json_is_a_verdict_with_every_rule(make_settings, make_candidate):
    settings = make_settings(FAIL_RULES)
    candidate = make_candidate(settings, seed=8)
    evaluate_run(settings, candidate)
    import mlflow

    raw = json.loads(mlflow.artifacts.load_text(f"runs:/{candidate.run_id}/decision.json"))
    assert raw["candidate_run_id"] == candidate.run_id and raw["baseline_version"] == "1"
    assert [r["name"] for r in raw["rules"]] == [r["name"] for r in FAIL_RULES]
    for rule, spec in zip(raw["rules"], FAIL_RULES, strict=True):
        assert rule["threshold"] == spec["threshold"] and rule["op"] == spec["op"]
        assert isinstance(rule["value"], float) and isinstance(rule["passed"], bool)


def test_champion_measurement_is_cached_on_its_run_and_reused(make_settings, make_candidate, tmp_path):
    import mlflow

    from evaluator.evaluate import BASELINE_CACHE_DIR

    settings = make_settings(PASS_RULES)
    first = evaluate_run(settings, make_candidate(settings, seed=9))
    client, name = open_registry(settings)
    champion_run = client.get_model_version(name, "1").run_id
    (cached,) = client.list_artifacts(champion_run, BASELINE_CACHE_DIR)
    payload = json.loads(mlflow.artifacts.load_text(f"runs:/{champion_run}/{cached.path}"))
    assert payload["metrics"] == first.metrics["baseline"]

    payload["metrics"]["medquad.loss"] = 123.0  # a marker only a cache hit can return
    marked = tmp_path / Path(cached.path).name
    marked.write_text(json.dumps(payload))
    client.log_artifact(champion_run, str(marked), artifact_path=BASELINE_CACHE_DIR)

    second = evaluate_run(settings, make_candidate(settings, seed=10))
    assert second.metrics["baseline"]["medquad.loss"] == 123.0
    assert second.metrics["candidate"]["medquad.loss"] != first.metrics["candidate"]["medquad.loss"]


def test_promoted_candidate_is_not_rescored_as_champion_but_a_new_production_slice_is(
    make_settings, make_candidate, tmp_path
):
    import mlflow

    from evaluator.evaluate import BASELINE_CACHE_DIR

    settings = make_settings(PASS_RULES, promotion="auto")
    first = make_candidate(settings, seed=11, snapshot_id=put_snapshot(settings, n_eval=6))
    judged = evaluate_run(settings, first)
    assert aliases(settings)["champion"] == "2"
    client, _ = open_registry(settings)
    entries = client.list_artifacts(first.run_id, BASELINE_CACHE_DIR)
    assert len(entries) == 2  # one per set, on the run that holds version 2's adapter
    for entry in entries:
        payload = json.loads(mlflow.artifacts.load_text(f"runs:/{first.run_id}/{entry.path}"))
        (set_name,) = payload["answers"]
        assert payload["metrics"] == {
            k: v for k, v in judged.metrics["candidate"].items() if k.startswith(f"{set_name}.")
        }
        payload["metrics"][f"{set_name}.loss"] = 123.0  # a marker only a cache hit can return
        marked = tmp_path / Path(entry.path).name
        marked.write_text(json.dumps(payload))
        client.log_artifact(first.run_id, str(marked), artifact_path=BASELINE_CACHE_DIR)

    second = make_candidate(settings, seed=12, snapshot_id=put_snapshot(settings, n_eval=5))
    verdict = evaluate_run(settings, second)
    assert verdict.baseline_version == "2"
    assert verdict.metrics["baseline"]["medquad.loss"] == 123.0  # the same MedQuAD rows: looked up
    assert verdict.metrics["baseline"]["production.loss"] != 123.0  # another slice: scored
    recorded = client.get_run(second.run_id).data.metrics
    assert {"eval.seconds.prepare", "eval.seconds.champion", "eval.seconds.candidate"} <= set(recorded)
