"""MLflow failing while registering or promoting: a clean error, and no alias ever points at a version
whose artifacts are not there.

    .venv/bin/pytest tests/faults/test_registry_faults.py -q

MLflow is reached through a real TCP proxy that cuts chosen requests (tests/faults/faulty_proxy.py);
MLFLOW_HTTP_REQUEST_MAX_RETRIES=0 (tests/conftest.py) makes each cut an immediate failure.
"""

from __future__ import annotations

import uuid

import pytest
from eval_fixtures import log_candidate, save_adapter
from faulty_proxy import FaultyProxy
from stream_stack import free_port

from deploy.registry import mlflow_client
from evaluator import promotion
from schemas.artifacts import Verdict
from schemas.settings import with_overrides
from trainer.model import build_tiny_llama
from trainer.registry import bootstrap

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def registry(stack, tmp_path_factory):
    """(settings with a registered model of this module, base version, a PEFT adapter folder)."""
    tmp = tmp_path_factory.mktemp("registry-faults")
    tiny = build_tiny_llama(tmp / "tiny")
    settings = with_overrides(stack, {"mlflow": {"registered_model": f"t-faults-{uuid.uuid4().hex[:8]}"},
                                      "evaluate": {"promotion": "review"}})
    return settings, bootstrap(settings, from_path=tiny), save_adapter(tiny, tmp / "adapter", seed=1)


def _verdict(registry) -> Verdict:
    settings, base_version, adapter_dir = registry
    candidate = log_candidate(settings, adapter_dir, base_version, snapshot_id=None)
    return Verdict(candidate_run_id=candidate.run_id, baseline_version=base_version, passed=True, rules=[],
                   metrics={"candidate": {"medquad.loss": 2.0}, "baseline": {"medquad.loss": 2.1}})


def _aliases(settings) -> dict[str, str]:
    return dict(mlflow_client(settings).get_registered_model(settings.mlflow.registered_model).aliases)


def _assert_aliases_sound(settings) -> dict[str, str]:
    """Through the healthy server: every alias points at a version whose artifacts download and check."""
    client, aliases = mlflow_client(settings), _aliases(settings)
    for version in aliases.values():
        promotion.verify_artifacts(client, settings.mlflow.registered_model, version)
    return aliases


def _proxied(settings, proxy: FaultyProxy):
    return with_overrides(settings, {"mlflow": {"tracking_uri": proxy.url}})


def _mlflow_proxy(settings, drop) -> FaultyProxy:
    host, port = settings.mlflow.tracking_uri.removeprefix("http://").split(":")
    return FaultyProxy(host, int(port), drop=drop)


def test_mlflow_down_while_registering_or_promoting_fails_cleanly(registry):
    settings, base_version, _ = registry
    verdict = _verdict(registry)
    closed = with_overrides(settings, {"mlflow": {"tracking_uri": f"http://127.0.0.1:{free_port()}"}})
    with pytest.raises(Exception, match="Connection refused|Max retries|API request"):
        promotion.apply_verdict(closed, verdict)
    assert mlflow_client(settings).search_model_versions(f"run_id = '{verdict.candidate_run_id}'") == []

    version = promotion.apply_verdict(settings, verdict)  # retried once MLflow is back
    before = _assert_aliases_sound(settings)
    assert before["challenger"] == version
    with pytest.raises(Exception, match="Connection refused|Max retries|API request"):
        promotion.promote(closed, version, actor="tester")
    assert _assert_aliases_sound(settings) == before


def test_an_outage_at_any_point_of_a_promotion_never_leaves_an_unsound_alias(registry):
    """Cut every request from the k-th on, for each k: after each failed try the aliases are sound."""
    settings, base_version, _ = registry
    version = promotion.apply_verdict(settings, _verdict(registry))
    name, client = settings.mlflow.registered_model, mlflow_client(settings)
    champion = _aliases(settings)["champion"]
    outages = 0
    for k in range(100):
        with _mlflow_proxy(settings, drop=lambda method, path, k=k: len(proxy.forwarded) >= k) as proxy:
            try:
                promotion.promote(_proxied(settings, proxy), version, actor="tester")
            except Exception:  # noqa: BLE001 - any failure is acceptable, an unsound alias is not
                outages += 1
            else:
                break
        assert proxy.dropped, f"an uncut promotion must succeed (cut at request {k})"
        aliases = _assert_aliases_sound(settings)
        if aliases["champion"] == version:  # the alias moved before the cut: put the old champion back
            client.set_registered_model_alias(name, "champion", champion)
    assert outages >= 5, f"a promotion makes several requests; only {outages} cut points were tried"
    assert _assert_aliases_sound(settings)["champion"] == version


def test_artifacts_unavailable_while_promoting_moves_no_alias(registry):
    settings, _, _ = registry
    version = promotion.apply_verdict(settings, _verdict(registry))
    before = _assert_aliases_sound(settings)
    with _mlflow_proxy(settings, drop=lambda method, path: "/mlflow-artifacts/artifacts" in path) as proxy:
        with pytest.raises(promotion.RegistryError, match="not downloadable"):
            promotion.promote(_proxied(settings, proxy), version, actor="tester")
    assert proxy.dropped and _assert_aliases_sound(settings) == before
