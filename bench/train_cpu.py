"""CPU training benchmark: tokens/s and time per step of SmolLM2-135M LoRA through the real Ray Train path, 1 vs 2
workers.

    .venv/bin/python bench/train_cpu.py                     # JSON to stdout and bench/results/train_cpu.json
    .venv/bin/python bench/train_cpu.py --steps 12 --workers 1 2 --out /tmp/train_cpu.json

Runs against the stack the settings name (``MEDRETRAIN_*`` env, e.g. the test stack's). The base is
the registry's SmolLM2 base version (bootstrapped if missing); each worker count is one Ray Train
run of :func:`trainer.retrain.train_func` (Lightning DDP, gloo) with its metrics in an MLflow run
tagged ``medretrain.kind=bench``. The machine's cores are split evenly among the workers, so
both runs use the whole CPU. Reported per run: median time per optimizer step and median tokens/s
(all ranks, non-padding tokens) over the steps after the first (warm-up), plus the Ray run's wall time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deploy.registry import KIND_TAG, mlflow_client  # noqa: E402
from schemas.events import RetrainRequest  # noqa: E402
from schemas.settings import Settings, load_settings, with_overrides  # noqa: E402
from trainer import tracking  # noqa: E402
from trainer.retrain import build_torch_trainer, connect_ray, rows_payload, training_rows  # noqa: E402

log = logging.getLogger("bench.train_cpu")


def bench_settings(settings: Settings, steps: int, workers: int, cores: int) -> Settings:
    train = {
        "num_workers": workers, "cpus_per_worker": cores / workers, "max_steps": steps, "checkpoint_every_steps": steps,
        "micro_batch_size": 4, "max_length": 256, "val_rows": 4, "replay_min_rows": 256, "warmup_steps": 1,
    }  # fmt: skip
    return with_overrides(settings, {"stack": {"home": str(settings.stack.home.resolve())}, "train": train})


def measure(settings: Settings, base_version: str, rows: tuple[list, list]) -> dict:
    """One Ray Train run; medians of the per-step metrics its rank 0 logged to MLflow."""
    cfg = settings.train
    name = f"bench-{uuid.uuid4().hex[:8]}-w{cfg.num_workers}"
    run_id = tracking.open_run(settings, {KIND_TAG: "bench"}, run_name=name)
    loop_config = {"settings": settings.model_dump_json(), "model_version": base_version, "run_id": run_id,
                   "train_rows": rows_payload(rows[0]), "val_rows": rows_payload(rows[1])}  # fmt: skip
    started = time.perf_counter()
    with tracking.finishing(settings, run_id):
        build_torch_trainer(settings, name, loop_config).fit()
    wall = time.perf_counter() - started
    client = mlflow_client(settings)

    def steady(metric: str) -> list[float]:
        history = sorted(client.get_metric_history(run_id, metric), key=lambda m: m.step)
        return [m.value for m in history[1:]]  # the first step pays for lazy initialisation

    step_s, tokens_s = steady("time_per_iter"), steady("tokens_per_s")
    return {
        "workers": cfg.num_workers,
        "cpus_per_worker": cfg.cpus_per_worker,
        "steps": cfg.max_steps,
        "global_batch": cfg.micro_batch_size * cfg.num_workers,
        "time_per_step_s": statistics.median(step_s),
        "tokens_per_s": statistics.median(tokens_s),
        "peak_memory_mb_rank0": max(m.value for m in client.get_metric_history(run_id, "peak_memory_mb")),
        "ray_run_wall_s": wall,
        "mlflow_run_id": run_id,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "train_cpu.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from trainer.registry import bootstrap, resolve

    settings = load_settings()
    base_version = bootstrap(settings)  # idempotent: the SmolLM2 base already registered comes back
    resolve(settings, base_version)  # download once here, so a broken registry fails before Ray starts
    _, train_rows, val_rows = training_rows(
        bench_settings(settings, args.steps, 1, args.cores),
        RetrainRequest(request_id="bench", reason="manual", watermark=0),
    )
    connect_ray(settings)
    runs = [
        measure(bench_settings(settings, args.steps, n, args.cores), base_version, (train_rows, val_rows))
        for n in args.workers
    ]
    report = {
        "benchmark": "train_cpu",
        "model": f"{settings.mlflow.registered_model} v{base_version} "
                 f"(SmolLM2-135M-Instruct, LoRA r{settings.train.lora.r} all linear)",
        "precision": settings.train.precision,
        "micro_batch_size": 4,
        "max_length": 256,
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "processor": platform.processor()},
        "runs": runs,
        "speedup_tokens_per_s": runs[-1]["tokens_per_s"] / runs[0]["tokens_per_s"] if len(runs) > 1 else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    sys.stdout.write(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
