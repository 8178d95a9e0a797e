"""Fixtures of the evaluator tests: a tiny base model, a registry of each test's own, candidate runs."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from eval_fixtures import CHEAP_EVAL, PASS_RULES, log_candidate, save_adapter, write_rules

from schemas.artifacts import TrainedAdapter
from schemas.settings import Settings, with_overrides
from trainer.model import build_tiny_llama


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture
def make_settings(stack: Settings, tmp_path: Path) -> Callable[..., Settings]:
    """Settings with a registered model of this test alone, cheap evaluation and the given gate rules."""
    name = f"test-eval-{uuid.uuid4().hex[:10]}"

    def build(rules: list[dict] = PASS_RULES, promotion: str = "review") -> Settings:
        path = write_rules(tmp_path / f"rules-{uuid.uuid4().hex[:6]}.json", rules)
        evaluate = {**CHEAP_EVAL, "gate_rules": str(path), "promotion": promotion}
        return with_overrides(stack, {"mlflow": {"registered_model": name}, "evaluate": evaluate})

    return build


@pytest.fixture
def make_candidate(tiny_model_dir: Path, tmp_path: Path) -> Callable[..., TrainedAdapter]:
    """``make_candidate(settings, seed=0, snapshot_id=None)``: bootstraps the tiny base if needed, logs a run."""
    from trainer.registry import bootstrap

    def build(settings: Settings, seed: int = 0, snapshot_id: str | None = None) -> TrainedAdapter:
        base_version = bootstrap(settings, from_path=tiny_model_dir)
        adapter_dir = save_adapter(tiny_model_dir, tmp_path / f"adapter-{uuid.uuid4().hex[:6]}", seed)
        return log_candidate(settings, adapter_dir, base_version, snapshot_id)

    return build
