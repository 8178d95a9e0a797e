"""Retrain entry: Ray Train + Lightning DDP LoRA fine-tuning from the registry's champion.

    ray job submit --runtime-env deploy/ray_runtime.json -- python -m trainer.retrain --request '<RetrainRequest JSON>'
    medretrain train --request <id> | --reason manual       # locally, against the stack's Ray head

The finished run holds ``trained_adapter.json`` (the :class:`TrainedAdapter` the evaluator reads).

Model lineage: every registered version is base weights (a version of kind ``base``) plus a LoRA
adapter. A retrain loads the champion's base and keeps training the champion's adapter (or a fresh
adapter when the champion is a bare base), so adapters stay small, the base is stored once, and the
new version's ``parent_version`` is the champion it grew from. Merged weights would cost a full
model per version and make the next retrain's adapter rank meaningless. An override that changes the
LoRA shape of an existing adapter is refused up front.

Fault tolerance: checkpoints (adapter + optimizer + scheduler + step + data position) go to
``s3://<checkpoints bucket>/ray/<request_id>/`` every ``train.checkpoint_every_steps`` steps. A failed
worker group restarts from the latest one (``train.max_failures`` times), and Ray Train V2 restores
a run's checkpoints from storage by name, so resubmitting the same request resumes it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import lightning as L

import trainer
from deploy.clients import pyarrow_s3
from deploy.ray_env import exit_driver, job_arguments, ray_address
from deploy.registry import BASE_VERSION_TAG, CHAMPION, KIND_TAG, REQUEST_TAG
from schemas.artifacts import TRAINED_ADAPTER_FILE, Lineage, SnapshotManifest, TrainedAdapter
from schemas.data import QAPair
from schemas.events import RetrainRequest
from schemas.settings import Settings, with_overrides
from trainer import tracking
from trainer.callbacks import RowsSeen, StepMetrics, upload_adapter
from trainer.data import mix_rows, sample_replay, steps_for_epochs, training_items

log = logging.getLogger(__name__)

LORA_SHAPE = ("r", "alpha", "target_modules")
"""LoRA settings fixed by an existing adapter (dropout may change between retrains)."""


def effective_settings(settings: Settings, request: RetrainRequest) -> Settings:
    """Tuned defaults, then the request's overrides; the stack home made absolute for the workers."""
    tuned = settings.train.tuned_config
    if tuned is not None:
        settings = with_overrides(settings, {"train": json.loads(tuned.read_text())})
    settings = with_overrides(settings, request.overrides)
    return with_overrides(settings, {"stack": {"home": str(settings.stack.home.resolve())}})


def adapter_lora(adapter_dir) -> dict[str, Any]:
    """r / alpha / target_modules of a PEFT adapter folder, in LoraSettings terms."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    return {"r": config["r"], "alpha": config["lora_alpha"], "target_modules": tuple(sorted(config["target_modules"]))}


def check_lora_shape(request: RetrainRequest, adapter: dict[str, Any]) -> None:
    """Fail fast when the request asks for another LoRA shape than the champion's adapter has."""
    asked = request.overrides.get("train", {}).get("lora", {})
    if "target_modules" in asked:
        asked = {**asked, "target_modules": tuple(sorted(asked["target_modules"]))}
    clashes = {k: (asked[k], adapter[k]) for k in LORA_SHAPE if k in asked and asked[k] != adapter[k]}
    if clashes:
        raise ValueError(
            f"request {request.request_id} overrides LoRA {clashes} (asked, champion adapter): a retrain continues the "
            "champion's adapter, whose shape is fixed; drop these overrides or bootstrap a new base"
        )


def training_rows(
    settings: Settings, request: RetrainRequest
) -> tuple[SnapshotManifest | None, list[QAPair], list[QAPair]]:
    """(manifest, train rows = snapshot + MedQuAD replay, validation rows from MedQuAD), all seeded."""
    from trainer.medquad import load_medquad
    from trainer.snapshot_reader import read_snapshot

    cfg = settings.train
    manifest, new_rows = None, []
    if request.snapshot_id:
        manifest, new_rows, _ = read_snapshot(settings, request.snapshot_id)
    replay = sample_replay(load_medquad("train"), len(new_rows), cfg.replay_ratio, cfg.seed, cfg.replay_min_rows)
    validation = load_medquad("validation")
    val_rows = random.Random(cfg.seed).sample(validation, min(cfg.val_rows, len(validation)))
    log.info("%d snapshot rows + %d replay rows, %d validation rows", len(new_rows), len(replay), len(val_rows))
    return manifest, mix_rows(new_rows, replay), val_rows


def steps_from_epochs(settings: Settings, items: int) -> Settings:
    """``train.max_steps`` for ``train.epochs`` passes over ``items`` (pairs, or packed rows), when epochs are set."""
    cfg = settings.train
    if cfg.epochs is None:
        return settings
    return with_overrides(settings, {"train": {"max_steps": steps_for_epochs(items, cfg.epochs, cfg, cfg.num_workers)}})


def count_items(settings: Settings, rows: Sequence[QAPair], model_dir) -> int:
    """Training items the workers will walk over: tokenized (and packed) as they do it.

    The encodings go to the item cache, so this round's workers (on any node) read them instead of encoding again.
    """
    from trainer.item_cache import item_encoder
    from trainer.model import load_tokenizer

    return len(training_items(load_tokenizer(model_dir), rows, settings.train, item_encoder(settings, write=True)))


def run_params(settings: Settings, request: RetrainRequest, parent) -> dict[str, Any]:
    """MLflow params of a retrain; ``parent`` is the resolved version training starts from."""
    cfg = settings.train
    return {
        "num_gpus": cfg.num_workers if cfg.use_gpu else 0,
        "num_workers": cfg.num_workers,
        "gradient_accum": cfg.gradient_accum,
        "mixed_precision": cfg.precision,
        "lora_r": cfg.lora.r,
        "lora_alpha": cfg.lora.alpha,
        "lora_dropout": cfg.lora.dropout,
        "lora_target_modules": ",".join(cfg.lora.target_modules),
        "lr": cfg.lr,
        "micro_batch_size": cfg.micro_batch_size,
        "global_batch_size": cfg.micro_batch_size * cfg.gradient_accum * cfg.num_workers,
        "max_length": cfg.max_length,
        "max_steps": cfg.max_steps,
        "epochs": cfg.epochs or "",
        "parent_version": parent.version,
        "adapter_init": f"continued v{parent.version}" if parent.adapter_dir else "fresh",
        "snapshot_id": request.snapshot_id or "",
        "request_id": request.request_id,
    }


def rows_payload(rows: list[QAPair]) -> list[dict[str, Any]]:
    return [row.model_dump(mode="json", exclude={"split"}) for row in rows]


def build_lightning_trainer(
    settings: Settings, run_id: str | None, first_attempt: bool, extra_callbacks: Sequence[L.Callback] = ()
) -> L.Trainer:
    """The per-worker Lightning Trainer: Ray DDP, an epoch per checkpoint, rank-0 MLflow metrics."""
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, RayTrainReportCallback, prepare_trainer

    cfg = settings.train
    callbacks: list[L.Callback] = [
        RayTrainReportCallback(),
        StepMetrics(settings, run_id),
        RowsSeen(settings, run_id),
        *extra_callbacks,
    ]
    if cfg.fault_at_step and first_attempt:
        callbacks.append(InjectedFault(cfg.fault_at_step))
    trainer = L.Trainer(
        max_steps=cfg.max_steps,
        max_epochs=-1,
        accelerator="gpu" if cfg.use_gpu else "cpu",
        devices="auto",
        strategy=RayDDPStrategy(),
        plugins=[RayLightningEnvironment()],
        callbacks=callbacks,
        precision=cfg.precision,
        accumulate_grad_batches=cfg.gradient_accum,
        reload_dataloaders_every_n_epochs=1,  # each epoch's sampler starts at the current data position
        use_distributed_sampler=False,  # StepBatchSampler shards by rank itself
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    return prepare_trainer(trainer)


class InjectedFault(L.Callback):
    """Chaos testing (``train.fault_at_step``): one rank raises once the given step is done."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == min(1, trainer.world_size - 1):
            raise RuntimeError(f"injected fault at step {self.step} (train.fault_at_step)")


def train_func(config: dict[str, Any]) -> None:
    """Ray Train per-worker function: model from the registry, resume from Ray's latest checkpoint, fit."""
    import ray.train
    from ray.train.lightning import RayTrainReportCallback

    from trainer.compile_cache import CompileCache
    from trainer.item_cache import item_encoder
    from trainer.model import attach_lora, load_base
    from trainer.module import LoraFineTune, RankData
    from trainer.registry import resolve
    from trainer.speed import apply_speed_settings

    settings = Settings.model_validate_json(config["settings"])
    resolved = resolve(settings, config["model_version"])  # a local cache hit on the driver's node
    model, tokenizer = load_base(resolved.base_dir)
    model = apply_speed_settings(attach_lora(model, settings.train.lora, resolved.adapter_dir), settings.train)
    data = RankData(
        [QAPair.model_validate(r) for r in config["train_rows"]],
        [QAPair.model_validate(r) for r in config["val_rows"]],
        tokenizer,
        settings.train,
        encode=item_encoder(settings, write=ray.train.get_context().get_world_rank() == 0),
    )
    checkpoint = ray.train.get_checkpoint()
    caches = [c for c in [CompileCache.for_model(settings, model)] if c is not None]
    trainer = build_lightning_trainer(settings, config["run_id"], checkpoint is None, extra_callbacks=caches)
    with checkpoint.as_directory() if checkpoint else nullcontext() as ckpt_dir:
        ckpt_path = os.path.join(ckpt_dir, RayTrainReportCallback.CHECKPOINT_NAME) if ckpt_dir else None
        trainer.fit(LoraFineTune(model, settings.train), datamodule=data, ckpt_path=ckpt_path)
    if trainer.is_global_zero and config["run_id"]:
        upload_adapter(settings, config["run_id"], model, tokenizer)


def worker_resources(cfg) -> dict[str, float]:
    return {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.use_gpu else {})}


def build_torch_trainer(settings: Settings, name: str, train_loop_config: dict[str, Any], callbacks=()):
    """TorchTrainer whose run ``name`` under the checkpoints bucket makes a resubmission resume."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = settings.train
    return TorchTrainer(
        train_func,
        train_loop_config=train_loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=worker_resources(cfg),
            placement_strategy=cfg.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=f"{settings.s3.checkpoints_bucket}/ray",
            storage_filesystem=pyarrow_s3(settings),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=list(callbacks),
        ),
    )


def connect_ray(settings: Settings) -> None:
    """Join the cluster: RAY_ADDRESS under ``ray job submit``, else the stack's Ray head."""
    import ray

    from deploy.clients import use_ray

    use_ray(settings)
    if not ray.is_initialized():
        ray.init(address=ray_address(settings))


def start_model(settings: Settings, request: RetrainRequest, run_id: str | None):
    """(settings with the adapter's real LoRA shape, resolved parent version).

    A resumed run keeps the parent it started from, even if the champion moved since.
    """
    from trainer.registry import resolve

    pinned = tracking.run_param(settings, run_id, "parent_version") if run_id else None
    parent = resolve(settings, pinned or CHAMPION)
    if parent.adapter_dir is not None:
        adapter = adapter_lora(parent.adapter_dir)
        check_lora_shape(request, adapter)
        settings = with_overrides(settings, {"train": {"lora": adapter}})
    return settings, parent


def run(settings: Settings, request: RetrainRequest) -> TrainedAdapter:
    """Train one request to completion (or resume it) and return the finished MLflow run's adapter."""
    started = time.monotonic()
    settings = effective_settings(settings, request)
    run_id = tracking.find_run(settings, REQUEST_TAG, request.request_id, kind="retrain")
    settings, parent = start_model(settings, request, run_id)
    manifest, train_rows, val_rows = training_rows(settings, request)
    if settings.train.epochs is not None:
        settings = steps_from_epochs(settings, count_items(settings, train_rows, parent.base_dir))
    lineage = Lineage(
        request_id=request.request_id,
        snapshot_id=request.snapshot_id,
        kafka_offsets=manifest.kafka_offsets if manifest else {},
        parent_version=parent.version,
        base_model=parent.origin,
    )
    tags = {**lineage.as_tags(), REQUEST_TAG: request.request_id, BASE_VERSION_TAG: parent.base_version}
    run_id = tracking.start_or_resume(settings, run_id, {**tags, KIND_TAG: "retrain"}, request.request_id)
    lineage = lineage.model_copy(update={"run_id": run_id})
    tracking.log_params(settings, run_id, run_params(settings, request, parent))
    resolved_config = {"train": settings.train.model_dump(mode="json"), "request": request.model_dump(mode="json")}
    tracking.log_json(settings, run_id, "train_config.json", resolved_config)
    loop_config = {
        "settings": settings.model_dump_json(),
        "model_version": parent.version,
        "run_id": run_id,
        "train_rows": rows_payload(train_rows),
        "val_rows": rows_payload(val_rows),
    }
    connect_ray(settings)
    with tracking.finishing(settings, run_id):
        build_torch_trainer(settings, request.request_id, loop_config).fit()
    metrics = tracking.latest_metrics(settings, run_id)
    adapter = TrainedAdapter(
        run_id=run_id,
        lineage=lineage,
        steps=int(metrics.get("step", 0)),
        train_loss=metrics.get("train_loss"),
        val_loss=metrics.get("val_loss"),
        wall_s=time.monotonic() - started,
    )
    tracking.log_text(settings, run_id, TRAINED_ADAPTER_FILE, adapter.model_dump_json(indent=2))
    log.info("request %s trained: run %s, %d steps", request.request_id, run_id, adapter.steps)
    return adapter


def main(argv: list[str] | None = None) -> None:
    # JSON only: a worker never opens the service store (ids are resolved by `medretrain train` before submission).
    settings, request_json = job_arguments("python -m trainer.retrain", __doc__.splitlines()[0], "--request",
                                           "RetrainRequest JSON", argv)
    adapter = trainer.run(settings, RetrainRequest.model_validate_json(request_json))
    log.info("trained adapter: %s", adapter.model_dump_json())

if __name__ == "__main__":
    main()
    exit_driver()
