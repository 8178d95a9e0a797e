"""The import direction (schemas <- deploy <- trainer <- evaluator <- services) and lint hold over the repository.

Both run the tools the way a developer does; a broken contract or a lint finding fails with the tool's report.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(tool: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([str(BIN / tool), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_import_linter_contracts_are_kept():
    result = _run("lint-imports", "--no-cache")
    assert result.returncode == 0, (
        f"an import breaks the layering contracts:\n{result.stdout[-4000:]}{result.stderr[-2000:]}"
    )
    assert "0 broken" in result.stdout


def test_ruff_is_clean():
    result = _run("ruff", "check", ".")
    assert result.returncode == 0, f"ruff findings:\n{result.stdout[-4000:]}{result.stderr[-2000:]}"
