"""Lightning callbacks of the Ray workers: per-step metrics, rows read per rank, the adapter upload (rank 0 only)."""

from __future__ import annotations

import resource
import tempfile
import time

import lightning as L
import torch

from deploy.registry import mlflow_client
from schemas.settings import Settings
from trainer.tracking import log_json, mark


def upload_adapter(settings: Settings, run_id: str, model, tokenizer) -> None:
    """The PEFT adapter (safetensors) and the tokenizer under the run's ``adapter/`` artifact folder."""
    mark(settings, run_id, "upload_started")
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        mlflow_client(settings).log_artifacts(run_id, tmp, artifact_path="adapter")
    mark(settings, run_id, "uploaded")


def peak_memory_mb() -> float:
    """Peak GPU memory when on CUDA, else this process's peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StepMetrics(L.Callback):
    """Per optimizer step: train_loss, lr, step, time_per_iter, tokens_per_s, peak_memory_mb; val_loss; and the
    worker's ``timeline.model_loaded`` / ``timeline.data_ready`` points.

    Every rank joins the token all-reduce (so tokens/s counts all ranks); only global rank 0 talks
    to MLflow, and only when a ``run_id`` is given.
    """

    def __init__(self, settings: Settings, run_id: str | None):
        self.settings, self.run_id = settings, run_id
        self.tokens = 0
        self.last = time.perf_counter()
        self.built_at = time.time()  # the worker builds its callbacks once its model is loaded

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning calls this right after the data module's setup: the rows are tokenized (and packed) by now.
        if self.run_id and trainer.is_global_zero:
            mark(self.settings, self.run_id, "model_loaded", self.built_at)
            mark(self.settings, self.run_id, "data_ready")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.last = time.perf_counter()  # time per step excludes data reloads and validation

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.tokens += int(batch["num_tokens"])  # real tokens, padded or packed
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        # Collectives run on the module's device: NCCL has no CPU tensors.
        tokens = trainer.strategy.reduce(torch.tensor(float(self.tokens), device=pl_module.device), reduce_op="sum")
        now, self.tokens = time.perf_counter(), 0
        elapsed, self.last = now - self.last, now
        metrics = {
            "train_loss": float(trainer.callback_metrics.get("train_loss", float("nan"))),
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "step": trainer.global_step,
            "time_per_iter": elapsed,
            "tokens_per_s": float(tokens) / elapsed,
            "peak_memory_mb": peak_memory_mb(),
        }
        self._log(trainer, metrics)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if "val_loss" in trainer.callback_metrics and not trainer.sanity_checking:
            self._log(trainer, {"val_loss": float(trainer.callback_metrics["val_loss"])})

    def _log(self, trainer: L.Trainer, metrics: dict[str, float]) -> None:
        if not (self.run_id and trainer.is_global_zero):
            return
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        batch = [Metric(k, float(v), stamp, trainer.global_step) for k, v in metrics.items()]
        mlflow_client(self.settings).log_batch(self.run_id, metrics=batch)


class RowsSeen(L.Callback):
    """Which training rows each rank read in this attempt, logged by rank 0 as ``data/rows_by_rank.json``.

    Evidence that DDP ranks trained on different data; every rank joins the all-gather.
    """

    def __init__(self, settings: Settings, run_id: str | None):
        self.settings, self.run_id = settings, run_id
        self.rows: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.rows.append(batch["row_ids"].detach().cpu())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.rows:  # every rank agrees: a finished run resumed with nothing left to read
            return
        mine = torch.cat(self.rows).to(pl_module.device)
        # all_gather needs equal shapes; packed batches hold different numbers of rows per rank.
        longest = int(trainer.strategy.reduce(torch.tensor(float(mine.numel()), device=mine.device), reduce_op="max"))
        padded = torch.cat([mine, mine.new_full((longest - mine.numel(),), -1)])
        gathered = trainer.strategy.all_gather(padded)
        if not (self.run_id and trainer.is_global_zero):
            return
        by_rank = gathered.reshape(trainer.world_size, -1)
        payload = {str(rank): sorted({i for i in row.tolist() if i >= 0}) for rank, row in enumerate(by_rank)}
        log_json(self.settings, self.run_id, "rows_by_rank.json", payload, artifact_path="data")
