"""Start-up of the light commands: wall seconds of ``medretrain --help``, ``status``, ``publish`` and ``retrain``.

    .venv/bin/python bench/startup.py --test-stack          # 5 runs each, JSON to stdout and bench/results/startup.json
    .venv/bin/python bench/startup.py --runs 5 --out /tmp/startup.json

Each run is a fresh interpreter running this checkout's CLI, timed from process start to exit, so
it counts imports, settings and the command's own round trips to the stack. The commands run
against the stack the settings name (``MEDRETRAIN_*`` env; ``--test-stack``: the test stack's), on fresh topics
and database that are dropped afterwards (the stream tests' isolation): ``publish`` sends one valid
event, ``retrain`` records one manual request over an empty store. Each run also reports which
heavy modules (torch, lightning, transformers) the command imported.
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
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "services")]  # the test helpers that isolate topics and database

from stream_events import build_event  # noqa: E402
from stream_stack import close_env, open_env  # noqa: E402

from schemas.settings import load_settings  # noqa: E402

log = logging.getLogger("bench.startup")

HEAVY = ("torch", "lightning", "transformers")
# The console script's body, plus a report of the heavy modules at exit (typer ends with sys.exit).
CLI = (
    "import atexit, json, sys\n"
    f"heavy = lambda: [m for m in {HEAVY!r} if m in sys.modules]\n"
    "atexit.register(lambda: sys.stderr.write('HEAVY=' + json.dumps(heavy()) + '\\n'))\n"
    "from services.cli import main\n"
    "sys.argv[0] = 'medretrain'\n"
    "main()\n"
)


def time_command(args: list[str]) -> tuple[float, list[str]]:
    """(wall seconds, heavy modules imported) of one run; a failing command stops the benchmark."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    started = time.perf_counter()
    command = [sys.executable, "-c", CLI, *args]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"medretrain {' '.join(args)} exited {done.returncode}: {done.stderr[-2000:]}")
    heavy = next((json.loads(line[6:]) for line in done.stderr.splitlines() if line.startswith("HEAVY=")), [])
    return wall, heavy


def commands(overrides: tuple[str, ...], event_file: Path) -> dict[str, list[str]]:
    settings = [arg for pair in overrides for arg in ("--set", pair)]
    return {
        "medretrain --help": ["--help"],
        "medretrain status": [*settings, "status"],
        "medretrain publish": [*settings, "publish", str(event_file)],
        "medretrain retrain": [*settings, "retrain", "--reason", "start-up benchmark"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "startup.json")
    parser.add_argument("--test-stack", action="store_true", help="the test stack's settings (tests/conftest.py)")
    args = parser.parse_args()
    if args.test_stack:
        import tests.conftest  # noqa: F401 - sets the test stack's MEDRETRAIN_* defaults, which the commands inherit
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)

    load_before = os.getloadavg()
    # A threshold no run reaches: the recorded manual requests never start a retrain's snapshot logic twice.
    env = open_env(load_settings(), {"trigger.threshold": 10**9, "trigger.cooldown_s": 0})
    results = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            event_file = Path(tmp) / "event.jsonl"
            event_file.write_text(build_event(0).model_dump_json() + "\n")
            for name, argv in commands(env.overrides, event_file).items():
                runs = [time_command(argv) for _ in range(args.runs)]
                walls = [round(wall, 3) for wall, _ in runs]
                results[name] = {"median_s": statistics.median(walls), "min_s": min(walls), "max_s": max(walls),
                                 "runs_s": walls, "heavy_modules": sorted({m for _, heavy in runs for m in heavy})}
                log.info("%s: median %.2f s (%s), heavy: %s", name, results[name]["median_s"], walls,
                         results[name]["heavy_modules"] or "none")
    finally:
        close_env(env)
    report = {
        "benchmark": "startup",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                 "load_before": [round(x, 2) for x in load_before],
                 "load_after": [round(x, 2) for x in os.getloadavg()]},
        "runs": args.runs,
        "commands": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
