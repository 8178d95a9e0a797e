"""Nothing of the embedded stack serves the network without a credential: its listening sockets, and Ray's token.

    .venv/bin/pytest tests/deploy/test_network.py -q

Every process tree the stack started (deploy.process pid files: services, added Ray nodes, app services)
is listed; each socket must listen on loopback, or else refuse an HTTP request without Ray's token.
"""

from __future__ import annotations

import ipaddress
import urllib.error
import urllib.request

import psutil
import pytest

from deploy import process, ray_nodes
from deploy import stack as embedded
from deploy.clients import ray_token_file
from schemas.settings import Settings

pytestmark = pytest.mark.integration


def _trees(settings: Settings) -> dict[int, str]:
    """pid -> the stack entry (pid file name) whose process tree it belongs to."""
    owners = {}
    for pid_file in sorted((settings.stack.home / "run").glob("*.pid")):
        root_pid = process.running_pid(settings.stack.home, pid_file.stem)
        if root_pid is None:
            continue
        root = psutil.Process(root_pid)
        owners |= {p.pid: pid_file.stem for p in [root, *root.children(recursive=True)]}
    return owners


def listeners(settings: Settings) -> list[tuple[str, str, int]]:
    """(stack entry, address, port) of every listening inet socket of the stack's process trees."""
    owners = _trees(settings)
    return sorted({(owners[c.pid], c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
                   if c.status == psutil.CONN_LISTEN and c.pid in owners})  # fmt: skip


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return address.is_loopback or (
        address.version == 6 and bool(address.ipv4_mapped) and address.ipv4_mapped.is_loopback
    )


def _refuses_without_token(ip: str, port: int) -> bool:
    """An HTTP GET without credentials answered 401 or 403; anything else (served, or not HTTP) is not a refusal."""
    host = f"[{ip}]" if ":" in ip else ip
    try:
        urllib.request.urlopen(f"http://{host}:{port}/api/jobs/", timeout=5)
    except urllib.error.HTTPError as e:
        return e.code in (401, 403)
    except (urllib.error.URLError, OSError):
        return False
    return False


@pytest.fixture
def added_node(stack: Settings):
    """A Ray node started by ``stack add-node`` for the length of a test."""
    name, _ = ray_nodes.add_node(stack)
    yield name
    process.stop(stack.stack.home, name)


def test_every_stack_listener_is_loopback_or_refuses_without_the_token(stack: Settings, added_node: str) -> None:
    found = listeners(stack)
    names = {name for name, _, _ in found}
    expected = {s.name for s in embedded.status(stack)} | {added_node}
    assert expected <= names, f"every service and the added node listen somewhere: {found}"
    exposed = [(name, ip, port) for name, ip, port in found if not _loopback(ip)]
    open_ones = [entry for entry in exposed if not _refuses_without_token(entry[1], entry[2])]
    assert not open_ones, f"non-loopback listeners that serve without Ray's token: {open_ones}"


def _status(settings: Settings, headers: dict[str, str]) -> int:
    request = urllib.request.Request(settings.ray.address.rstrip("/") + "/api/jobs/", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_ray_jobs_api_needs_the_stacks_token(stack: Settings) -> None:
    import stat

    token_file = ray_token_file(stack)
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    assert _status(stack, {}) == 401
    assert _status(stack, {"Authorization": "Bearer " + "0" * len(token)}) == 403
    assert _status(stack, {"Authorization": f"Bearer {token}"}) == 200
