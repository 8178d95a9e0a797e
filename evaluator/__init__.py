"""Evaluator stage: ``evaluator.run(settings, candidate) -> Verdict`` (see ``evaluator.evaluate``).

Imports stay lazy so ``medretrain --help`` does not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from schemas.artifacts import TrainedAdapter, Verdict
    from schemas.settings import Settings


def run(settings: Settings, candidate: TrainedAdapter) -> Verdict:
    """Evaluate ``candidate`` against the champion, record the decision and report, register and promote per mode."""
    from evaluator.evaluate import run as run_stage

    return run_stage(settings, candidate)
