"""Light commands stay light: ``--help``, ``status``, ``publish`` and ``retrain`` never import torch or Lightning.

Each command runs for real in a fresh interpreter (against the test stack where it needs one); the probe reports
which heavy modules the process had loaded when the command finished.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from stream_stack import close_env, open_env

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "lightning")
PROBE = f"""
import sys
sys.argv = ["medretrain", *sys.argv[1:]]
from services.cli import main
code = 0
try:
    main()
except SystemExit as e:
    code = e.code
print("PROBE", code, ",".join(sorted(m for m in {HEAVY!r} if m in sys.modules)))
"""


def _heavy_modules_of(*argv: str) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    probe = [line for line in done.stdout.splitlines() if line.startswith("PROBE ")]
    assert probe, f"medretrain {' '.join(argv)} did not finish:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    _, code, heavy = probe[-1].split(" ", 2)  # "PROBE <exit code> <heavy,modules>" (the last part may be empty)
    assert code in ("0", "None"), (
        f"medretrain {' '.join(argv)} exited {code}:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
    )
    return [m for m in heavy.split(",") if m]


def test_help_imports_neither_torch_nor_lightning():
    assert _heavy_modules_of("--help") == []


@pytest.mark.integration
def test_status_publish_and_retrain_import_neither_torch_nor_lightning(stack):
    env = open_env(stack, {"trigger.cooldown_s": 0})
    sets = [arg for pair in env.overrides for arg in ("--set", pair)]
    try:
        assert _heavy_modules_of(*sets, "status") == []
        assert _heavy_modules_of(*sets, "publish", "--medquad-sample", "5") == []
        assert _heavy_modules_of(*sets, "retrain", "--reason", "light command check") == []
    finally:
        close_env(env)
