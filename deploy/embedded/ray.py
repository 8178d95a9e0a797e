"""Ray head node, reached through its Jobs API (the dashboard port).

``ray start --block`` keeps one parent process per head, so stopping the stack stops
our head only, never another Ray on the machine (``ray stop`` would stop them all).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from deploy.embedded import Service, http_ok, venv_bin
from deploy.process import Launch
from schemas.settings import Settings


def temp_dir(settings: Settings) -> Path:
    """Short, per-stack: Ray's unix sockets live below it and socket paths are limited to ~107 bytes."""
    digest = hashlib.sha1(str(settings.stack.home).encode()).hexdigest()[:8]
    return Path("/tmp") / f"medretrain-ray-{digest}"


def num_cpus(settings: Settings) -> int:
    # Two train workers plus the job's driver must fit even on a two-core machine.
    return settings.ray.num_cpus or max(4, os.cpu_count() or 1)


def launch(settings: Settings) -> Launch:
    host, r = settings.stack.host, settings.ray
    argv = [
        venv_bin("ray"), "start", "--head", "--block", "--disable-usage-stats",
        f"--node-ip-address={host}", f"--port={r.gcs_port}",
        "--include-dashboard=true", f"--dashboard-host={host}", f"--dashboard-port={r.dashboard_port}",
        f"--ray-client-server-port={r.client_server_port}", f"--dashboard-agent-listen-port={r.dashboard_agent_port}",
        f"--min-worker-port={r.min_worker_port}", f"--max-worker-port={r.max_worker_port}",
        f"--num-cpus={num_cpus(settings)}", f"--object-store-memory={r.object_store_mb * 1024 * 1024}",
        f"--temp-dir={temp_dir(settings)}",
    ]  # fmt: skip
    # Job entrypoints say `python ...`: put this venv first on the PATH the raylet hands to jobs.
    venv = Path(sys.executable).parent
    env = {
        "RAY_USAGE_STATS_ENABLED": "0",
        # No Serve replicas to quiesce here: skip the 30 s SIGTERM drain so `stack down` is quick.
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        # Pinned: with the mode unset, a token that any local ray.init() left in ~/.ray would switch this head
        # to token auth and every client without that token (and our health check) would get 401s.
        "RAY_AUTH_MODE": "disabled",
        "PATH": f"{venv}{os.pathsep}{os.environ.get('PATH', '')}",
        "VIRTUAL_ENV": str(venv.parent),
    }
    return Launch(argv=argv, cwd=settings.stack.home / "ray", env=env)


def url(settings: Settings) -> str:
    return settings.ray.address


def healthy(settings: Settings) -> bool:
    """The Jobs API answers and the head's raylet is alive.

    The dashboard answers before the raylet has settled; when the dashboard agent starts slowly (a loaded
    machine) the raylet exits after a fixed 15 s wait for the agent's port files (ray#65983), leaving a
    Jobs API that can run nothing. The agent's raylet check (KubeRay's readiness probe) rules that out.
    """
    raylet = f"http://{settings.stack.host}:{settings.ray.dashboard_agent_port}/api/local_raylet_healthz"
    return http_ok(settings.ray.address.rstrip("/") + "/api/jobs/", timeout_s=5.0) and http_ok(raylet, timeout_s=5.0)


# A raylet lost to that race takes `ray start --block` down with it: launch again (warm caches start faster).
SERVICE = Service(name="ray", url=url, launch=launch, healthy=healthy, timeout_factor=1.5, start_attempts=3)
