"""More Ray nodes on this machine, joined to the stack's head: ``medretrain stack add-node``.

Node N (2, 3, ...) is managed like a service (``run/ray-node-N.pid``, ``logs/ray-node-N.log``), offers the
custom resource ``medretrain_node_N``, has its own temp dir and ports (``ray.node_port_base``), uses the
head's token and listens on 127.0.0.1 only; ``stack down`` stops it. Killing its process tree is how the
tests lose a node.
"""

from __future__ import annotations

import json
import sys

from deploy import process
from deploy.clients import use_ray
from deploy.embedded.ray import node_env, temp_dir
from schemas.settings import Settings

PREFIX = "ray-node-"
RAY_START_ON_LOOPBACK = (
    # `ray start` refuses a worker node while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (what keeps the head on
    # 127.0.0.1) and otherwise swaps 127.0.0.1 for the machine's external address: keep the address as given.
    "import ray._private.services as s; s.resolve_ip_for_localhost = lambda host: host; "
    "from ray.scripts.scripts import main; main()"
)


def node_name(index: int) -> str:
    return f"{PREFIX}{index}"


def resource_label(index: int) -> str:
    return f"medretrain_node_{index}"


def running(settings: Settings) -> list[str]:
    """Names of the added nodes whose processes run."""
    names = sorted(path.stem for path in (settings.stack.home / "run").glob(f"{PREFIX}*.pid"))
    return [name for name in names if process.running_pid(settings.stack.home, name) is not None]


def launch(settings: Settings, index: int) -> process.Launch:
    host, r = settings.stack.host, settings.ray
    base = r.node_port_base + (index - 2) * 1000
    argv = [
        sys.executable, "-c", RAY_START_ON_LOOPBACK, "start", "--block", "--disable-usage-stats",
        f"--address={host}:{r.gcs_port}", f"--node-ip-address={host}", f"--num-cpus={r.node_num_cpus}",
        f"--resources={json.dumps({resource_label(index): 1})}", f"--temp-dir={temp_dir(settings)}-n{index}",
        f"--dashboard-agent-listen-port={base}", f"--dashboard-agent-grpc-port={base + 1}",
        f"--metrics-export-port={base + 2}", f"--runtime-env-agent-port={base + 3}",
        f"--min-worker-port={base + 100}", f"--max-worker-port={base + 999}",
        f"--object-store-memory={r.object_store_mb * 1024 * 1024}",
    ]  # fmt: skip
    # A worker node at all (see RAY_START_ON_LOOPBACK).
    env = {**node_env(settings), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
    return process.Launch(argv=argv, cwd=settings.stack.home / "ray", env=env)


def node_id(settings: Settings, index: int) -> str | None:
    """The Ray node id of added node ``index`` while the head sees it alive."""
    from ray.util.state import list_nodes

    use_ray(settings)
    # Filtered here: with a state filter, the state API reports the dead nodes it left out as truncated data.
    for node in list_nodes(address=settings.ray.address, limit=1000):
        if node.state == "ALIVE" and resource_label(index) in (node.resources_total or {}):
            return node.node_id
    return None


def add_node(settings: Settings, timeout_s: float | None = None) -> tuple[str, str]:
    """Start the next node and wait until the head sees it; returns (name, Ray node id)."""
    taken = {int(name.removeprefix(PREFIX)) for name in running(settings)}
    index = next(i for i in range(2, 100) if i not in taken)
    name = node_name(index)
    pid = process.spawn(settings.stack.home, name, launch(settings, index))
    found: list[str] = []

    def joined() -> bool:
        found[:] = [n for n in [node_id(settings, index)] if n]
        return bool(found)

    try:
        process.wait_healthy(settings.stack.home, name, pid, joined, timeout_s or settings.stack.start_timeout_s)
    except BaseException:
        process.stop(settings.stack.home, name)  # never a half-joined node left behind
        raise
    return name, found[0]


def stop_all(settings: Settings) -> list[str]:
    """Stop every added node; returns the names that ran."""
    return [name for name in running(settings) if process.stop(settings.stack.home, name)]
