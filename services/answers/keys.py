"""The answer service's bearer keys, generated at first start into ``<stack home>/answers/keys.json`` (mode 0600).

    keys = ensure_keys(settings)
    curl -H "Authorization: Bearer $(jq -r .api_key .medretrain/answers/keys.json)" ...

``api_key`` authorises every non-read endpoint (answers, feedback); ``reviewer_key`` the web console's
review actions. Keys never appear in logs.
"""

from __future__ import annotations

import hmac
import json
import secrets
from dataclasses import dataclass, fields
from pathlib import Path

from deploy.embedded.s3 import write_private
from schemas.settings import Settings


@dataclass(frozen=True)
class ApiKeys:
    api_key: str
    reviewer_key: str

    def __repr__(self) -> str:  # a logged or printed ApiKeys shows no secret
        return "ApiKeys(api_key=***, reviewer_key=***)"


def keys_file(settings: Settings) -> Path:
    return settings.stack.home / "answers" / "keys.json"


def ensure_keys(settings: Settings) -> ApiKeys:
    """The stored keys; generated on the first call, when the file does not exist yet."""
    path = keys_file(settings)
    if not path.exists():
        # `medretrain serve answers` calls this before it deploys, so replicas only ever read the file.
        write_private(path, json.dumps({f.name: secrets.token_urlsafe(32) for f in fields(ApiKeys)}) + "\n")
    return ApiKeys(**json.loads(path.read_text()))


def bearer_matches(header: str | None, key: str) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <key>`` (compared in constant time)."""
    scheme, _, token = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())
