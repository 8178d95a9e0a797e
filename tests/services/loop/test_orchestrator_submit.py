"""The orchestrator survives a job submission the Ray Jobs API refuses for a while (its agent not ready)."""

from schemas.events import RetrainRequest, RetrainStatus
from schemas.settings import Settings, with_overrides
from services.loop.orchestrator import Orchestrator, next_request, record_request, submission_id
from services.store import create_schema, make_engine


class FlakyJobs:
    """Refuses the first submission the way Ray's dashboard does while its agent (re)starts."""

    def __init__(self) -> None:
        self.submitted: list[str] = []
        self.accepted: set[str] = set()

    def submit_job(self, entrypoint: str, submission_id: str, runtime_env: dict) -> str:
        self.submitted.append(submission_id)
        if len(self.submitted) == 1:
            raise RuntimeError(
                "Request failed with status code 500: No available agent to submit job, please try again later."
            )
        self.accepted.add(submission_id)
        return submission_id

    def get_job_status(self, job_id: str) -> str:
        if job_id not in self.accepted:
            raise RuntimeError(f"Request failed with status code 404: Job {job_id} does not exist.")
        return "RUNNING"


class Sent:
    def get(self, timeout: float) -> None:
        return None


class Producer:
    def __init__(self) -> None:
        self.phases: list[str] = []

    def send(self, topic: str, key: bytes, value: bytes) -> Sent:
        self.phases.append(RetrainStatus.model_validate_json(value).phase)
        return Sent()


def test_refused_submission_is_retried_with_the_same_id(tmp_path):
    settings = with_overrides(Settings(), {"database": {"url": f"sqlite:///{tmp_path / 'store.db'}"}})
    engine = make_engine(settings)
    create_schema(engine)
    request = RetrainRequest(request_id="rr-manual-1-abc", reason="manual", watermark=1)
    record_request(engine, request)
    jobs, producer = FlakyJobs(), Producer()
    orchestrator = Orchestrator(settings, engine, jobs, producer)

    orchestrator.tick()  # refused: no exception, the attempt stays recorded
    assert next_request(engine).state == "started" and producer.phases == ["requested"]
    orchestrator.tick()  # Ray does not know the recorded id: the same attempt is submitted again
    orchestrator.tick()  # now it runs: followed, not resubmitted

    job_id = submission_id(settings.mlflow.registered_model, request.request_id, 1)
    assert jobs.submitted == [job_id, job_id] and jobs.accepted == {job_id}
    assert producer.phases == ["requested", "started"]
