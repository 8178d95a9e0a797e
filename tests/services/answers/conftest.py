"""The answer service's tests share the evaluator tests' helpers (eval_fixtures: candidates made like the trainer's).

The repository root goes first: pytest puts ``tests/`` on sys.path too, and ``tests/deploy`` (a package of
tests) would otherwise shadow the ``deploy`` package.
"""

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(TESTS.parent), str(TESTS / "evaluator")]
