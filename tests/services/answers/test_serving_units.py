"""Pure parts of the answer service: keys, bearer check, canary split, which aliases are served."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import pytest
from eval_fixtures import save_adapter

from evaluator.inference import generate_answers
from schemas.settings import load_settings
from services.answers.app import canary_share
from services.answers.keys import bearer_matches, ensure_keys, keys_file
from services.answers.metrics import ServiceMetrics
from services.answers.models import Job, ServedModels
from services.answers.watch import SwapWatcher
from trainer.model import build_tiny_llama, load_base
from trainer.registry import ResolvedModel

QUESTION = "What are the symptoms of glaucoma?"


def test_keys_are_generated_once_private_and_never_printed(tmp_path):
    settings = load_settings([f"stack.home={tmp_path}"])
    keys = ensure_keys(settings)
    assert stat.S_IMODE(keys_file(settings).stat().st_mode) == 0o600
    assert ensure_keys(settings) == keys and keys.api_key != keys.reviewer_key and len(keys.api_key) >= 40
    assert keys.api_key not in repr(keys) and keys.reviewer_key not in f"{keys}"


def test_bearer_matches_only_the_exact_key():
    assert bearer_matches("Bearer s3cret", "s3cret") and bearer_matches("bearer s3cret", "s3cret")
    assert not any(bearer_matches(h, "s3cret") for h in (None, "", "s3cret", "Basic s3cret", "Bearer s3cre",
                                                          "Bearer s3cret2", "Bearer "))


def test_canary_split_is_sticky_and_close_to_the_fraction():
    shares = [canary_share(f"session-{i}") for i in range(20_000)]
    assert shares == [canary_share(f"session-{i}") for i in range(20_000)]
    assert all(0 <= s < 1 for s in shares)
    assert abs(sum(s < 0.1 for s in shares) / len(shares) - 0.1) < 0.01


def test_the_challenger_is_served_only_while_a_canary_runs_and_differs_from_the_champion():
    def targets(fraction: float, aliases: dict[str, str]) -> dict[str, str]:
        settings = load_settings([f"serve.challenger_fraction={fraction}"])
        return SwapWatcher(settings, ServedModels(settings), ServiceMetrics()).targets(aliases)

    assert targets(0.0, {"champion": "2", "challenger": "3"}) == {"champion": "2"}
    assert targets(0.2, {"champion": "2", "challenger": "3"}) == {"champion": "2", "challenger": "3"}
    assert targets(0.2, {"champion": "3", "challenger": "3"}) == {"champion": "3"}
    assert targets(0.2, {}) == {}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")


def version(base_dir: Path, number: str, adapter_dir: Path | None = None) -> ResolvedModel:
    return ResolvedModel(name="m", version=number, base_version="1", base_dir=base_dir, adapter_dir=adapter_dir,
                         origin="test")


def generate_while_adding(models: ServedModels, jobs: list[Job], added_version: ResolvedModel) -> tuple[list, int]:
    """Generate ``jobs`` while ``added_version`` is added from this thread; the answers and the decode steps
    the batch ran after the change was in (0 when the change waited for the batch to end)."""
    started, added, steps_after = threading.Event(), threading.Event(), []
    let_in = models._let_changes_in

    def slow_step(base, active) -> None:  # 20 ms a step until the change is in, so it lands mid-batch
        started.set()
        let_in(base, active)
        if added.is_set():
            steps_after.append(active)
        else:
            added.wait(0.02)

    models._let_changes_in = slow_step
    out: list = []
    running = threading.Thread(target=lambda: out.extend(models.generate(jobs)))
    running.start()
    assert started.wait(30)
    models.add(added_version)
    added.set()
    running.join()
    models._let_changes_in = let_in
    return out, len(steps_after)


def test_adapters_join_mid_batch_and_the_running_batch_is_unchanged(base_dir, tmp_path):
    """A change no longer waits for the batch to end (that made swaps wait 20-30 s on a CPU), and it cannot
    change what the batch generates: the answers are those of the same batch run without the change. Both
    kinds of change: the first adapter, which wraps the bare model in PEFT's layers under a base-version
    batch, and a later one beside it, under a batch of each kind."""
    settings = load_settings(["evaluate.max_new_tokens=48", "evaluate.no_repeat_ngram_size=0"])
    models = ServedModels(settings)
    models.add(version(base_dir, "1"))
    base_only = models.generate([Job(QUESTION, "1")])
    bare, tokenizer = load_base(base_dir)
    assert base_only[0].answer == generate_answers(bare, tokenizer, [QUESTION], 48, batch_size=1, label="bare")[0]

    for number, order in (("2", ("1",)), ("3", ("1", "2")), ("4", ("2", "1"))):
        jobs = [Job(QUESTION, v) for v in order]
        alone = models.generate(jobs)
        added = version(base_dir, number, save_adapter(base_dir, tmp_path / f"v{number}", seed=int(number)))
        out, steps_after = generate_while_adding(models, jobs, added)
        assert steps_after, f"the change to v{number} waited for the batch to end"
        assert out == alone
        assert models.generate([Job(QUESTION, number)])[0].answer not in {g.answer for g in alone}  # it is on
    assert models.generate([Job(QUESTION, "1")]) == base_only  # PEFT's layers, off for the base version
