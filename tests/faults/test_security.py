"""Secrets stay secret: the per-install credentials appear in no tracked file and in no service or test log.

    .venv/bin/pytest tests/faults/test_security.py -q

Complements tests/deploy/test_stack.py (0600 credentials file, SigV4, filer 401, 127.0.0.1 binding).
"""

from __future__ import annotations

import json
import subprocess

import pytest
from stream_stack import REPO

from deploy.clients import credentials_file

pytestmark = pytest.mark.integration


def _secrets(stack) -> dict[str, str]:
    values = json.loads(credentials_file(stack).read_text())
    return {k: v for k, v in values.items() if isinstance(v, str) and len(v) >= 12}


def test_credentials_are_generated_per_install_and_never_committed(stack):
    secrets = _secrets(stack)
    assert {"s3_access_key", "s3_secret_key"} <= set(secrets)
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, tracked):
        path = REPO / name.decode()
        if path.is_file():
            content = path.read_bytes()
            assert not [k for k, v in secrets.items() if v.encode() in content], f"{name.decode()} holds a secret"


def test_no_secret_in_any_log(stack, tmp_path_factory):
    """Service logs of the stack home and every log the tests wrote (accumulator runs included)."""
    secrets = _secrets(stack)
    logs = [*stack.stack.home.rglob("*.log"), *tmp_path_factory.getbasetemp().parent.rglob("*.log")]
    assert logs
    for path in logs:
        content = path.read_bytes()
        assert not [k for k, v in secrets.items() if v.encode() in content], f"{path} holds a secret"
