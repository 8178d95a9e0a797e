"""A judged run's recorded decision, read back without the scoring stack (mlflow only, no torch).

    verdict, samples = read_decision(settings, run_id)

``evaluator.evaluate.record_decision`` writes ``decision.json`` and ``eval/samples.json`` on the
candidate's run; the orchestrator and ``medretrain registry review`` read them here.
"""

from __future__ import annotations

import json

from schemas.artifacts import Verdict
from schemas.settings import Settings


def read_decision(settings: Settings, run_id: str) -> tuple[Verdict, dict]:
    """(verdict, sample answers) recorded on a candidate run by ``record_decision``."""
    import mlflow

    from deploy.clients import use_mlflow

    use_mlflow(settings)
    verdict = Verdict.model_validate_json(mlflow.artifacts.load_text(f"runs:/{run_id}/decision.json"))
    return verdict, json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/eval/samples.json"))
