"""The embedded stack's services, exercised for real (shared test stack; unique names everywhere)."""

from __future__ import annotations

import json
import stat
import urllib.error
import urllib.request
import uuid

import pytest

from deploy import process
from deploy import stack as embedded
from deploy.clients import boto3_s3, credentials_file, ensure_topics, topic_names
from deploy.embedded import host_port
from schemas.settings import Settings, with_overrides

pytestmark = pytest.mark.integration


def test_status_all_healthy_with_pids(stack: Settings) -> None:
    statuses = embedded.status(stack)
    assert [s.name for s in statuses] == ["s3", "kafka", "mlflow", "ray"]
    assert all(s.healthy and s.pid for s in statuses), statuses
    for s in statuses:
        assert process.log_path(stack.stack.home, s.name).exists()


def test_up_twice_is_harmless(stack: Settings) -> None:
    before = {s.name: s.pid for s in embedded.status(stack)}
    assert embedded.up(stack) == []
    assert {s.name: s.pid for s in embedded.status(stack)} == before


def test_credentials_file_is_private(stack: Settings) -> None:
    path = credentials_file(stack)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert {"s3_access_key", "s3_secret_key", "jwt_filer_signing_key"} <= set(json.loads(path.read_text()))


def test_s3_refuses_wrong_credentials_and_accepts_right_ones(stack: Settings) -> None:
    from botocore.exceptions import ClientError

    key = f"tests/{uuid.uuid4().hex}.txt"
    good = boto3_s3(stack)
    good.put_object(Bucket=stack.s3.artifacts_bucket, Key=key, Body=b"hello")
    assert good.get_object(Bucket=stack.s3.artifacts_bucket, Key=key)["Body"].read() == b"hello"

    creds = json.loads(credentials_file(stack).read_text())
    wrong_s3 = stack.s3.model_copy(update={"access_key": creds["s3_access_key"], "secret_key": "wrong", "retries": 0})
    wrong = stack.model_copy(update={"s3": wrong_s3})
    with pytest.raises(ClientError) as info:
        boto3_s3(wrong).get_object(Bucket=stack.s3.artifacts_bucket, Key=key)
    assert info.value.response["Error"]["Code"] in {"SignatureDoesNotMatch", "AccessDenied", "InvalidAccessKeyId"}

    url = f"{stack.s3.endpoint}/{stack.s3.artifacts_bucket}/{key}"
    anonymous = urllib.request.Request(url, data=b"x", method="PUT")
    with pytest.raises(urllib.error.HTTPError) as http:
        urllib.request.urlopen(anonymous, timeout=5)
    assert http.value.code == 403


def test_buckets_exist(stack: Settings) -> None:
    names = {b["Name"] for b in boto3_s3(stack).list_buckets()["Buckets"]}
    s3 = stack.s3
    assert {s3.artifacts_bucket, s3.checkpoints_bucket, s3.datasets_bucket, stack.stack.broker_bucket} <= names


@pytest.mark.parametrize(
    ("port_field", "path"),
    [("s3_filer_port", f"/tests/{uuid.uuid4().hex}.txt"), ("s3_volume_port", "/1,01637037d6")],  # file path, file id
)
def test_storage_ports_reject_unsigned_writes(stack: Settings, port_field: str, path: str) -> None:
    port = getattr(stack.stack, port_field)
    body = b"--b\r\nContent-Disposition: form-data; name=file; filename=x.txt\r\n\r\nhello\r\n--b--\r\n"
    request = urllib.request.Request(
        f"http://{stack.stack.host}:{port}{path}",
        data=body,
        method="POST",
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=5)
    assert info.value.code == 401


def _round_trip(settings: Settings, topic: str, payloads: list[bytes]) -> list[bytes]:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap, acks="all")
    for payload in payloads:
        producer.send(topic, payload)
    producer.flush(timeout=30)
    producer.close()
    return _read_all(settings, topic, len(payloads))


def _read_all(settings: Settings, topic: str, expected: int) -> list[bytes]:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=settings.kafka.bootstrap,
        group_id=f"test-{uuid.uuid4().hex}",
        auto_offset_reset="earliest",
        session_timeout_ms=settings.kafka.session_timeout_ms,
        heartbeat_interval_ms=settings.kafka.heartbeat_interval_ms,
        consumer_timeout_ms=60_000,  # the group join alone takes seconds on this broker
    )
    try:
        received = []
        for record in consumer:
            received.append(record.value)
            if len(received) == expected:
                break
        return received
    finally:
        consumer.close()


def test_kafka_round_trip(stack: Settings) -> None:
    topic = f"test.roundtrip.{uuid.uuid4().hex}"
    assert ensure_topics(stack, [topic]) == [topic]
    assert ensure_topics(stack, [topic]) == []
    payloads = [f"event-{i}".encode() for i in range(20)]
    assert sorted(_round_trip(stack, topic, payloads)) == sorted(payloads)


def test_project_topics_have_configured_partitions(stack: Settings) -> None:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(bootstrap_servers=stack.kafka.bootstrap)
    try:
        for topic in topic_names(stack):
            assert len(consumer.partitions_for_topic(topic) or ()) == stack.kafka.partitions, topic
    finally:
        consumer.close()


def test_topics_and_records_survive_broker_restart(stack: Settings) -> None:
    topic = f"test.restart.{uuid.uuid4().hex}"
    ensure_topics(stack, [topic])
    payloads = [b"before-restart-1", b"before-restart-2"]
    _round_trip(stack, topic, payloads)
    old_pid = process.running_pid(stack.stack.home, "kafka")
    assert embedded.down(stack, only=["kafka"]) == ["kafka"]
    assert embedded.up(stack) == ["kafka"]
    assert process.running_pid(stack.stack.home, "kafka") != old_pid
    assert ensure_topics(stack, [topic]) == []  # still known to the restarted broker
    assert sorted(_read_all(stack, topic, len(payloads))) == payloads


def test_mlflow_health_and_experiment(stack: Settings) -> None:
    from mlflow.tracking import MlflowClient

    with urllib.request.urlopen(f"{stack.mlflow.tracking_uri}/health", timeout=5) as response:
        assert response.status == 200
    client = MlflowClient(tracking_uri=stack.mlflow.tracking_uri)
    name = f"test-{uuid.uuid4().hex}"
    experiment_id = client.create_experiment(name)
    experiment = client.get_experiment(experiment_id)
    assert experiment.name == name
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # proxied to S3 by the server


def test_ray_job_succeeds_with_settings_in_its_env(stack: Settings) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    from deploy.ray_env import runtime_env

    script = (
        "import ray; from schemas.settings import load_settings; s = load_settings(); ray.init(); "
        "print('answer', ray.get(ray.remote(lambda: 6 * 7).remote()), s.kafka.bootstrap, s.stack.home)"
    )
    client = JobSubmissionClient(stack.ray.address)
    job = client.submit_job(entrypoint=f'python -c "{script}"', runtime_env=runtime_env(stack))
    final = _wait_job(client, job)
    logs = client.get_job_logs(job)
    assert final == JobStatus.SUCCEEDED, logs
    assert f"answer 42 {stack.kafka.bootstrap} {stack.stack.home}" in logs


def _wait_job(client, job: str, timeout_s: float = 300):
    import time

    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = client.get_job_status(job)
        if state in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            return state
        time.sleep(1)
    client.stop_job(job)
    raise AssertionError(f"job {job} still {state} after {timeout_s} s:\n{client.get_job_logs(job)}")


def test_services_bind_to_configured_host(stack: Settings) -> None:
    import psutil

    ours = {s.pid for s in embedded.status(stack)}
    for s in embedded.status(stack):
        if s.name == "ray":
            continue  # Ray's internal gRPC servers bind every interface; only its HTTP ports honour the host
        root = psutil.Process(s.pid)
        tree = [root, *root.children(recursive=True)]  # MLflow listens in its uvicorn child
        listening = [c.laddr for p in tree for c in p.net_connections(kind="tcp") if c.status == "LISTEN"]
        assert listening and all(addr.ip == stack.stack.host for addr in listening), (s.name, listening)
    assert host_port(stack.ray.address)[0] == stack.stack.host and ours


def test_cli_status_prints_table(stack: Settings) -> None:
    from typer.testing import CliRunner

    from services.cli import build_app

    result = CliRunner().invoke(build_app(), ["stack", "status"])
    assert result.exit_code == 0, result.output
    for s in embedded.status(stack):
        assert s.name in result.output and str(s.pid) in result.output
    assert stack.mlflow.tracking_uri in result.output


def test_foreign_service_on_our_port_is_a_clear_error(stack: Settings, tmp_path) -> None:
    from deploy.process import ServiceError

    # Another stack home with the same ports (and databases of its own): the S3 port is served, but not by a
    # process of that stack.
    fresh = {"url": f"postgresql+psycopg://postgres@127.0.0.1:5432/medretrain_t_{uuid.uuid4().hex[:12]}"}
    other = with_overrides(stack, {"stack": {"home": str(tmp_path / "other")}, "database": fresh,
                                   "mlflow": {"backend_store_uri": None}})
    with pytest.raises(ServiceError, match=r"service 's3': .* already served by a process this stack did not start"):
        embedded.up(other)


def test_setup_failure_names_the_service(stack: Settings) -> None:
    from deploy.process import ServiceError

    broken = with_overrides(stack, {"database": {"url": "postgresql+psycopg://postgres@127.0.0.1:1/nowhere"}})
    with pytest.raises(ServiceError, match=r"service 'mlflow' is up but its set-up failed: PostgreSQL unreachable"):
        embedded.up(broken)
    assert all(s.healthy for s in embedded.status(stack))
