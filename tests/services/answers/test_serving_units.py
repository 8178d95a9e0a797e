"""Pure parts of the answer service: keys, bearer check, canary split, which aliases are served."""

from __future__ import annotations

import stat

from schemas.settings import load_settings
from services.answers.app import canary_share
from services.answers.keys import bearer_matches, ensure_keys, keys_file
from services.answers.metrics import ServiceMetrics
from services.answers.models import ServedModels
from services.answers.watch import SwapWatcher


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
