"""The one-process CPU Lightning Trainer of the trainer tests: the product's module and data, no Ray, no logs."""

from __future__ import annotations

import lightning as L

from schemas.settings import TrainSettings


def cpu_trainer(cfg: TrainSettings, callbacks=(), **options) -> L.Trainer:
    """``cfg.max_steps`` steps on one CPU device, the data module reloaded each epoch as the Ray workers do."""
    return L.Trainer(
        max_steps=cfg.max_steps, max_epochs=-1, accelerator="cpu", devices=1, callbacks=list(callbacks),
        reload_dataloaders_every_n_epochs=1, use_distributed_sampler=False, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **options,
    )  # fmt: skip
