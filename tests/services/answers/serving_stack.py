"""Helpers of the serving tests and bench: the real ``medretrain serve answers`` process and its HTTP client.

The process deploys deploy/serve/answers.yaml on the test stack's Ray head; model versions are
registered the way the gate registers them (tests/evaluator/eval_fixtures.py).
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

from schemas.settings import LoraSettings, Settings
from services.answers.client import service_url
from services.answers.keys import ensure_keys

REPO = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(REPO / "tests" / "evaluator"), str(REPO / "tests" / "services")]

from eval_fixtures import TINY_LORA, judged, log_candidate, save_adapter  # noqa: E402


@dataclass
class Service:
    settings: Settings
    proc: subprocess.Popen
    http: httpx.Client
    log: Path
    lock: IO
    """Held while this service runs: a second deployment of the same application name would replace it."""

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ensure_keys(self.settings).api_key}"}

    def ask(self, question: str, session_id: str | None = None) -> httpx.Response:
        body = {"question": question} | ({"session_id": session_id} if session_id else {})
        return self.http.post("/v1/answers", json=body, headers=self.auth)

    def wait_ready(self, timeout_s: float = 600) -> None:
        """Until ``/v1/readyz`` says a champion is loaded (a real base downloads for a while)."""
        wait_for(lambda: self.http.get("/v1/readyz").status_code == 200, timeout_s, "readyz 200")

    def status(self) -> dict:
        return self.http.get("/v1/status").json()

    def metric(self, name: str, **labels: str) -> float:
        """A sample of ``/metrics`` (0 when absent)."""
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in self.http.get("/metrics").text.splitlines():
            metric, _, value = line.rpartition(" ")
            if metric.split("{")[0] == name and ",".join(sorted(_labels(metric))) == want:
                return float(value)
        return 0.0


def _labels(metric: str) -> list[str]:
    inner = metric.partition("{")[2].rstrip("}")
    return [part for part in inner.split(",") if part]


def serve_lock(settings: Settings, timeout_s: float = 1800) -> IO:
    """An exclusive lock of the application name on the stack's Ray head (worktrees' test sessions share it)."""
    path = settings.stack.home / "run" / f"serve-{settings.serve.app_name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("w")
    wait_for(lambda: _try_lock(handle), timeout_s, f"the lock {path}")
    return handle


def _try_lock(handle: IO) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def start_service(settings: Settings, overrides: tuple[str, ...], log: Path, timeout_s: float = 240,
                  route_prefix: str = "") -> Service:
    """``python -m services serve answers`` with these ``--set`` overrides, once its HTTP API answers.

    ``route_prefix``: where the Serve config in ``serve.config`` routes the application (another one may hold "/").
    """
    ensure_keys(settings)
    lock = serve_lock(settings)
    args = [arg for pair in overrides for arg in ("--set", pair)]
    out = log.open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "services", *args, "serve", "answers"], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=out, stderr=subprocess.STDOUT)
    http = httpx.Client(base_url=service_url(settings) + route_prefix, timeout=120)
    service = Service(settings, proc, http, log, lock)
    try:
        wait_for(lambda: _answers(service), timeout_s, "the answer service's HTTP API")
    except BaseException:
        stop_service(service)
        raise
    return service


def _answers(service: Service) -> bool:
    if service.proc.poll() is not None:
        raise RuntimeError(f"serve answers exited with {service.proc.returncode}:\n{service.log.read_text()[-3000:]}")
    try:
        return service.http.get("/v1/healthz").status_code == 200
    except httpx.TransportError:
        return False


def stop_service(service: Service, timeout_s: float = 120) -> int:
    """SIGTERM, as a process manager stops it; returns the exit code."""
    if service.proc.poll() is None:
        service.proc.send_signal(signal.SIGTERM)
    try:
        return service.proc.wait(timeout_s)
    finally:
        if service.proc.poll() is None:
            service.proc.kill()
        service.http.close()
        service.lock.close()  # releases the lock


def wait_for(check, timeout_s: float = 90, what: str = "condition"):
    """``check()``'s first truthy value, polled until ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.25)
    raise TimeoutError(f"{what} not reached within {timeout_s}s")


def register_adapter(settings: Settings, base_dir: Path, base_version: str, out_dir: Path, seed: int,
                     broken: bool = False, lora: LoraSettings = TINY_LORA) -> str:
    """A gate-passed adapter version on ``base_version`` (challenger in review mode); ``broken``: unreadable weights.

    A broken version has every file promotion checks, so its alias moves; only loading its weights fails.
    """
    adapter_dir = save_adapter(base_dir, out_dir, seed, lora)
    if broken:
        (adapter_dir / "adapter_model.safetensors").write_bytes(b"these are not safetensors")
    return judged(settings, log_candidate(settings, adapter_dir, base_version, snapshot_id=None))
