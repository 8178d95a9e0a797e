"""One module per embedded service; each exposes a ``SERVICE`` built from :class:`Service`."""

from __future__ import annotations

import shutil
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from deploy.process import Launch
from schemas.settings import Settings


def _nothing(settings: Settings) -> None:
    return None


@dataclass(frozen=True)
class Service:
    """What the stack needs to know to run one service."""

    name: str
    url: Callable[[Settings], str]
    launch: Callable[[Settings], Launch]
    """Writes the service's config files and says how to start it."""
    healthy: Callable[[Settings], bool]
    ensure: Callable[[Settings], None] = _nothing
    """Idempotent set-up once healthy (buckets, topics); runs on every ``stack up``."""
    timeout_factor: float = 1.0
    """Multiplies ``stack.start_timeout_s`` for slow starters."""
    start_attempts: int = 1
    """Launches tried when the process exits before it is healthy (a start-up race, not a configuration error)."""


def venv_bin(name: str) -> str:
    """A console script next to this interpreter (the venv's), else from PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} nor on PATH; is the venv installed?")
    return found


def host_port(address: str) -> tuple[str, int]:
    """``http://h:p/x`` or ``h:p`` (first of a comma list) -> (h, p)."""
    first = address.split(",")[0].strip()
    parts = urlsplit(first if "://" in first else f"tcp://{first}")
    if parts.hostname is None or parts.port is None:
        raise ValueError(f"expected host:port in {address!r}")
    return parts.hostname, parts.port


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    """True if GET ``url`` answers 2xx."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False
