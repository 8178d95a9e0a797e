"""Start-up of the light commands: wall time of ``medretrain --help``, ``status``, ``publish`` and ``retrain``.

    .venv/bin/python bench/cli_startup.py                          # this checkout, 5 runs each
    .venv/bin/python bench/cli_startup.py --code /work/main --out /tmp/cli_main.json   # another checkout's code

Each run is a fresh ``python -m services ...`` process (imports included) against the stack the settings name
(``MEDRETRAIN_*`` env, e.g. the test stack's), on fresh topics and database dropped afterwards; ``publish``
sends 5 MedQuAD events and ``retrain`` emits one manual request. Reports per command the median, min and max
seconds and whether torch was imported. Goal: no light command imports torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "services")]  # the test helper that isolates topics and database

from stream_stack import close_env, open_env  # noqa: E402

from schemas.settings import load_settings  # noqa: E402

log = logging.getLogger("bench.cli_startup")

COMMANDS = {
    "--help": ["--help"],
    "status": ["status"],
    "publish": ["publish", "--medquad-sample", "5"],
    "retrain": ["retrain", "--reason", "start-up benchmark"],
}
TORCH_PROBE = "import runpy, sys; sys.argv = ['medretrain', *sys.argv[1:]]; import atexit; " \
    "atexit.register(lambda: print('TORCH', 'torch' in sys.modules)); runpy.run_module('services', run_name='__main__')"


def _run(code: Path, argv: list[str]) -> tuple[float, bool]:
    env = {**os.environ, "PYTHONPATH": str(code)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", TORCH_PROBE, *argv], cwd=code, env=env, capture_output=True,
                          text=True, timeout=600)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"medretrain {' '.join(argv)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds, "TORCH True" in done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", type=Path, default=REPO, help="checkout whose code runs (default: this one)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "cli_startup.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    env = open_env(load_settings(), {"trigger.cooldown_s": 0})
    sets = [arg for pair in env.overrides for arg in ("--set", pair)]
    results = {}
    try:
        for name, argv in COMMANDS.items():
            runs = [_run(args.code.resolve(), [*sets, *argv]) for _ in range(args.runs)]
            seconds = [s for s, _ in runs]
            results[name] = {"median_s": round(statistics.median(seconds), 3), "min_s": round(min(seconds), 3),
                             "max_s": round(max(seconds), 3), "runs_s": [round(s, 3) for s in seconds],
                             "imports_torch": any(t for _, t in runs)}
            log.info("%-8s median %.2fs (min %.2f, max %.2f) torch=%s", name, results[name]["median_s"],
                     results[name]["min_s"], results[name]["max_s"], results[name]["imports_torch"])
    finally:
        close_env(env)
    report = {"code": str(args.code.resolve()), "runs": args.runs, "host": platform.node(),
              "cpus": os.cpu_count(), "commands": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
