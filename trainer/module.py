"""Lightning pieces of the LoRA fine-tune: the module (loss, optimizer, adapter-only checkpoints) and the
per-rank data module (deterministic, resumable order).

Runs the same inside a Ray worker or plainly::

    module = LoraFineTune(peft_model, settings.train)
    data = RankData(train_rows, val_rows, tokenizer, settings.train)
    trainer = lightning.Trainer(max_steps=..., reload_dataloaders_every_n_epochs=1, use_distributed_sampler=False)
    trainer.fit(module, data)

One Lightning "epoch" is ``checkpoint_every_steps`` optimizer steps, so checkpoints fall on epoch
ends, where Lightning resumes cleanly, and the next epoch's data starts at the position the
checkpoint records.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from schemas.data import QAPair
from schemas.settings import TrainSettings
from trainer.data import StepBatchSampler, collate, collate_packed_items, eval_shard, training_items
from trainer.loss import answer_loss
from trainer.packing import IGNORE, blank_row

log = logging.getLogger(__name__)


def warmup_cosine(warmup_steps: int, total_steps: int, floor: float = 0.1):
    """LR multiplier: linear warmup, then cosine decay to ``floor`` at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class LoraFineTune(L.LightningModule):
    """Trains the trainable (LoRA) parameters of ``model`` on answer tokens only."""

    def __init__(self, model: torch.nn.Module, train: TrainSettings):
        super().__init__()
        # from_pretrained returns eval mode; Lightning keeps module modes, and LoRA dropout needs train mode.
        self.model = model.train()
        self.cfg = train
        # Checkpoints hold only the adapter; the frozen base comes from the registry.
        self.strict_loading = False

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = answer_loss(self.model, batch, self.cfg.loss_chunk_tokens, self.cfg.flex_kernel_options)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss = answer_loss(self.model, batch, self.cfg.loss_chunk_tokens, self.cfg.flex_kernel_options)
        # Weighted by answer tokens: the epoch's val_loss is the token mean, whatever the batching.
        answer_tokens = int((batch["labels"] != IGNORE).sum())
        self.log("val_loss", loss, sync_dist=True, batch_size=answer_tokens)

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters: attach a trainable LoRA adapter first")
        optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(self.cfg.warmup_steps, self.cfg.max_steps)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}


class RankData(L.LightningDataModule):
    """This rank's micro-batches: a :class:`StepBatchSampler` window per epoch, evaluation shard for validation."""

    def __init__(self, train_rows: Sequence[QAPair], val_rows: Sequence[QAPair], tokenizer, train: TrainSettings,
                 encode=None):
        super().__init__()
        self.train_rows, self.val_rows = list(train_rows), list(val_rows)
        self.tokenizer, self.cfg = tokenizer, train
        self.encode = encode
        """Replaces ``encode_rows`` (trainer.item_cache.item_encoder: cached MedQuAD encodings)."""
        self.resumed_from: dict[str, int] | None = None

    def setup(self, stage: str) -> None:
        self.train_items = training_items(self.tokenizer, self.train_rows, self.cfg, self.encode)
        # Packed like training rows: fixed shapes, so a compiled model is not recompiled per validation batch.
        self.val_items = training_items(self.tokenizer, self.val_rows, self.cfg, self.encode)

    def _collate(self):
        return partial(collate, pad_id=self.tokenizer.pad_token_id)

    def _train_collate(self):
        return collate_packed_items if self.cfg.packing else self._collate()

    def position(self) -> int:
        """Micro-batches this rank has consumed: checkpoints are taken at optimizer-step boundaries."""
        return self.trainer.global_step * self.cfg.gradient_accum

    def train_dataloader(self) -> DataLoader:
        start = self.position()
        resumed, self.resumed_from = self.resumed_from, None
        if resumed is not None and resumed["position"] != start:
            raise RuntimeError(
                f"checkpoint data position {resumed['position']} disagrees with its step ({start} micro-batches)"
            )
        per_epoch = self.cfg.checkpoint_every_steps * self.cfg.gradient_accum
        remaining = max(0, self.cfg.max_steps * self.cfg.gradient_accum - start)
        sampler = StepBatchSampler(
            len(self.train_items),
            rank=self.trainer.global_rank,
            world_size=self.trainer.world_size,
            batch_size=self.cfg.micro_batch_size,
            seed=self.cfg.seed,
            start=start,
            count=min(per_epoch, remaining),
        )
        return DataLoader(self.train_items, batch_sampler=sampler, collate_fn=self._train_collate())

    def val_dataloader(self) -> DataLoader:
        shard = [
            self.val_items[i]
            for i in eval_shard(len(self.val_items), self.trainer.global_rank, self.trainer.world_size)
        ]
        if self.cfg.packing:
            # Full batches only: a compiled model would recompile for a short last batch (a minute on a GPU).
            blank = ((), blank_row(self.cfg.max_length, self.tokenizer.pad_token_id))
            shard += [blank] * (-len(shard) % self.cfg.micro_batch_size)
        return DataLoader(shard, batch_size=self.cfg.micro_batch_size, collate_fn=self._train_collate())

    def state_dict(self) -> dict[str, int]:
        return {
            "position": self.position(),
            "world_size": self.trainer.world_size,
            "rows": len(self.train_rows),
            "seed": self.cfg.seed,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        now = {"world_size": self.trainer.world_size, "rows": len(self.train_rows), "seed": self.cfg.seed}
        changed = {k: (state[k], v) for k, v in now.items() if state.get(k) != v}
        if changed:
            log.warning(
                "resuming with a different data layout %s: the data order will not match the first attempt", changed
            )
        self.resumed_from = dict(state)
