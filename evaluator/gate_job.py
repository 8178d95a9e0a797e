"""The gate as a Ray job: judge a finished training run, record the decision, register and promote per the verdict.

    ray job submit --runtime-env deploy/ray_runtime.json -- python -m evaluator.gate_job --run <mlflow run id>

The orchestrator submits it once the training job succeeded, so the gate runs where training ran
(on a GPU when the cluster has one) and the orchestrator never loads the model stack. Judging is
idempotent: a run whose model version is already tagged keeps its recorded decision, so a gate job
resubmitted after a crash never registers a second version.
"""

from __future__ import annotations

import logging

import evaluator
from deploy.ray_env import exit_driver, job_arguments
from schemas.artifacts import Verdict
from schemas.settings import Settings

log = logging.getLogger(__name__)


def judge(settings: Settings, run_id: str) -> Verdict:
    """The verdict on training run ``run_id``: recorded before, or evaluated, recorded and applied now."""
    from evaluator import promotion
    from evaluator.decision import read_decision
    from evaluator.evaluate import candidate_from_run

    if promotion.registered_version(settings, run_id) is not None:
        log.info("run %s was judged before; keeping its decision", run_id)
        return read_decision(settings, run_id)[0]
    return evaluator.run(settings, candidate_from_run(settings, run_id))


def main(argv: list[str] | None = None) -> None:
    settings, run_id = job_arguments("python -m evaluator.gate_job", __doc__.splitlines()[0], "--run",
                                     "MLflow run id of a finished training run", argv)
    verdict = judge(settings, run_id)
    log.info("verdict: %s", verdict.model_dump_json())

if __name__ == "__main__":
    main()
    exit_driver()
