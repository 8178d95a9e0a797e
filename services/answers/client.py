"""Reading the running answer service from elsewhere (``medretrain status``), without Ray or torch.

    state = service_status(settings)    # GET /v1/status; httpx.HTTPError when the service is not up
"""

from __future__ import annotations

from typing import Any

import httpx

from schemas.settings import Settings


def service_url(settings: Settings) -> str:
    return f"http://{settings.serve.host}:{settings.serve.port}"


def service_status(settings: Settings, timeout_s: float = 3.0) -> dict[str, Any]:
    """The service's own account: versions served per alias, versions that failed to load and why, memory."""
    from services.answers.keys import ensure_keys

    headers = {"Authorization": f"Bearer {ensure_keys(settings).api_key}"} if settings.serve.auth_reads else {}
    response = httpx.get(f"{service_url(settings)}/v1/status", headers=headers, timeout=timeout_s)
    response.raise_for_status()
    return response.json()


def describe(state: dict[str, Any]) -> str:
    """One line: ``champion v2, challenger v3; v4 failed to load: <why>``."""
    served = ", ".join(f"{alias} v{version}" for alias, version in sorted(state.get("serving", {}).items()))
    failed = "; ".join(f"v{v} failed to load: {why}" for v, why in sorted(state.get("failed_versions", {}).items()))
    return "; ".join(part for part in (served or "no version loaded", failed) if part)
