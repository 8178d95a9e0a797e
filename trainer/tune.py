"""Ray Tune ASHA over lr, LoRA rank/alpha, micro batch size (and epochs); a trial is a Ray Train run + MLflow child run.

    medretrain tune --samples 8 [--snapshot SNAP_ID] [--out .medretrain/tuned/best_train.json]
    medretrain --set train.tuned_config=.medretrain/tuned/best_train.json train --reason manual

Trials train a fresh adapter on the champion's base (the LoRA shape is what is searched), on the
same rows a retrain would use, and report ``val_loss`` at every checkpoint; ASHA stops the weak
ones early. The best trial's train overrides are written as JSON: ``train.tuned_config`` makes
them the defaults of later retrains (a request's own overrides still win; a champion adapter's
shape still wins over the tuned LoRA shape).
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from pathlib import Path
from typing import Any

from deploy.clients import pyarrow_s3
from deploy.registry import CHAMPION, KIND_TAG
from schemas.events import RetrainRequest
from schemas.settings import Settings, with_overrides
from trainer import tracking
from trainer.retrain import (
    build_torch_trainer,
    connect_ray,
    count_items,
    rows_payload,
    steps_from_epochs,
    training_rows,
)

log = logging.getLogger(__name__)

METRIC, MODE = "val_loss", "min"


def search_space(micro_batches: tuple[int, ...], epochs: tuple[float, ...] = ()) -> dict[str, Any]:
    """lr, LoRA shape and micro batch; plus the number of epochs when ``tune.epochs`` lists choices."""
    from ray import tune

    space = {
        "lr": tune.loguniform(5e-5, 2e-3),
        "lora_r": tune.choice([4, 8, 16, 32]),
        "alpha_per_r": tune.choice([1, 2]),
        "micro_batch_size": tune.choice(list(micro_batches)),
    }
    return space | ({"epochs": tune.choice(list(epochs))} if epochs else {})


def trial_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """Train-section overrides of one sampled config (also the format of ``train.tuned_config``)."""
    r = int(config["lora_r"])
    overrides = {
        "lr": float(config["lr"]),
        "micro_batch_size": int(config["micro_batch_size"]),
        "lora": {"r": r, "alpha": r * int(config["alpha_per_r"])},
    }
    return overrides | ({"epochs": float(config["epochs"])} if "epochs" in config else {})


def trial_func(config: dict[str, Any], shared: dict[str, Any]) -> None:
    """One Tune trial: a Ray Train run of the trial's settings, logged as a child of the tune run."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    overrides = trial_overrides(config)
    settings = with_overrides(Settings.model_validate_json(shared["settings"]), {"train": overrides})
    settings = steps_from_epochs(settings, shared["items"])
    trial = ray.tune.get_context().get_trial_id()
    tags = {KIND_TAG: "tune-trial", "medretrain.tune_id": shared["tune_id"], "medretrain.trial_id": trial}
    name = f"{shared['tune_id']}-{trial}"
    run_id = tracking.open_run(settings, tags, run_name=name, parent_run_id=shared["parent_run_id"])
    lora = overrides["lora"]
    params = {
        "lr": overrides["lr"],
        "micro_batch_size": overrides["micro_batch_size"],
        "max_steps": settings.train.max_steps,
    }
    tracking.log_params(settings, run_id, params | {"lora_r": lora["r"], "lora_alpha": lora["alpha"]})
    loop_config = {
        "settings": settings.model_dump_json(),
        "model_version": shared["model_version"],
        "run_id": run_id,
        "train_rows": shared["train_rows"],
        "val_rows": shared["val_rows"],
    }
    trainer = build_torch_trainer(settings, name, loop_config, callbacks=[TuneReportCallback()])
    with tracking.finishing(settings, run_id):
        trainer.fit()


def run_tune(settings: Settings, snapshot_id: str | None, out: Path) -> dict[str, Any]:
    """Run the search; write the best train overrides to ``out``; return the search (best overrides under "train")."""
    from ray import tune

    from trainer.registry import resolve

    cfg = settings.tune
    trial_train = {"max_steps": cfg.max_steps, "num_workers": cfg.workers_per_trial}
    settings = with_overrides(settings, {"stack": {"home": str(settings.stack.home.resolve())}, "train": trial_train})
    tune_id = f"tune-{uuid.uuid4().hex[:10]}"
    request = RetrainRequest(request_id=tune_id, reason="manual", watermark=0, snapshot_id=snapshot_id)
    _, train_rows, val_rows = training_rows(settings, request)
    champion = resolve(settings, CHAMPION)  # its base: the searched LoRA shape needs a fresh adapter
    # Tokenizing every row on the driver only pays off when some trial's length is given in epochs.
    items = count_items(settings, train_rows, champion.base_dir) if cfg.epochs or settings.train.epochs else 0
    longest = {"epochs": max(cfg.epochs, default=None), "micro_batch_size": min(cfg.micro_batches)}
    longest_steps = steps_from_epochs(with_overrides(settings, {"train": longest}), items).train.max_steps
    tags = {KIND_TAG: "tune", "medretrain.tune_id": tune_id}
    parent_run_id = tracking.open_run(settings, tags, run_name=tune_id)
    params = {"num_samples": cfg.num_samples, "max_steps": cfg.max_steps, "snapshot_id": snapshot_id or ""}
    tracking.log_params(
        settings,
        parent_run_id,
        {**params, "epochs": ",".join(map(str, cfg.epochs)), "base_version": champion.base_version},
    )
    shared = {
        "settings": settings.model_dump_json(),
        "tune_id": tune_id,
        "parent_run_id": parent_run_id,
        "model_version": champion.base_version,
        "items": items,
        "train_rows": rows_payload(train_rows),
        "val_rows": rows_payload(val_rows),
    }
    connect_ray(settings)
    reports = math.ceil(max(cfg.max_steps, longest_steps) / settings.train.checkpoint_every_steps)
    tuner = tune.Tuner(
        # A trial only drives its TorchTrainer; its workers reserve the real CPUs/GPUs.
        tune.with_resources(tune.with_parameters(trial_func, shared=shared), {"CPU": 0.25}),
        param_space=search_space(cfg.micro_batches, cfg.epochs),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            num_samples=cfg.num_samples,
            time_budget_s=cfg.time_budget_s,
            scheduler=tune.schedulers.ASHAScheduler(max_t=reports, grace_period=min(cfg.grace_checkpoints, reports)),
            # The limit goes here: Tune ignores max_concurrent_trials beside a generator instance (all trials
            # then started at once and waited for the one GPU until their worker groups timed out).
            search_alg=tune.search.BasicVariantGenerator(random_state=cfg.seed, max_concurrent=cfg.max_concurrent),
        ),
        run_config=tune.RunConfig(
            name=tune_id, storage_path=f"{settings.s3.checkpoints_bucket}/tune", storage_filesystem=pyarrow_s3(settings)
        ),
    )
    with tracking.finishing(settings, parent_run_id):
        grid = tuner.fit()
        best = grid.get_best_result(metric=METRIC, mode=MODE)
        best_overrides = trial_overrides(best.config)
        trials = [
            {"train": trial_overrides(r.config), METRIC: r.metrics.get(METRIC),
             "steps": r.metrics.get("step"), "error": str(r.error) if r.error else None}
            for r in grid
        ]  # fmt: skip
        summary = {"tune_id": tune_id, "train": best_overrides, METRIC: best.metrics.get(METRIC), "trials": trials}
        tracking.log_json(settings, parent_run_id, "best_config.json", summary)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(best_overrides, indent=2, sort_keys=True))
    log.info("best of %s: %s (%s %s), written to %s", tune_id, best_overrides, METRIC, best.metrics.get(METRIC), out)
    return summary
