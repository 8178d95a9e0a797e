"""Trainer stage: ``trainer.run(settings, request) -> TrainedAdapter`` (see ``trainer.retrain``).

Imports stay lazy so ``medretrain --help`` does not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from schemas.artifacts import TrainedAdapter
    from schemas.events import RetrainRequest
    from schemas.settings import Settings


def run(settings: Settings, request: RetrainRequest) -> TrainedAdapter:
    """Train (or resume) one retrain request with Ray Train from the champion; the finished MLflow run's adapter."""
    from trainer.retrain import run as run_stage

    return run_stage(settings, request)
