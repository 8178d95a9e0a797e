"""Fixtures of the fault-injection suite: isolated stream corners of the shared test stack.

    .venv/bin/pytest tests/faults -q          # real services, about five minutes on 2 cores

The stream and registry helpers live with their tests (tests/services/stream_stack.py,
tests/evaluator/eval_fixtures.py); this folder reuses them instead of keeping copies.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

for _helpers in ("services", "evaluator"):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / _helpers))

from stream_stack import close_env, open_env  # noqa: E402

FAST_REJOIN = {"kafka.session_timeout_ms": 3000, "kafka.heartbeat_interval_ms": 500}
"""The broker makes a group join wait about half the session timeout: short sessions keep restarts short."""


@pytest.fixture
def stream_env(stack):
    """``stream_env(**overrides)`` -> StreamEnv with its own topics, group, database and bucket; dropped after."""
    opened = []

    def factory(**extra):
        env = open_env(stack, FAST_REJOIN | extra)
        opened.append(env)
        return env

    yield factory
    for env in opened:
        close_env(env)
