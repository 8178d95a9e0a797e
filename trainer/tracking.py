"""MLflow tracking of a retrain: one run per request, metrics and the adapter from rank 0 only.

The driver opens (or, on a resubmitted request, reopens) the run and records params and lineage
tags; inside the Ray workers :class:`StepMetrics` logs per-step metrics and :func:`upload_adapter`
stores the PEFT adapter, both on global rank 0. The orchestrator finds the run by the tag
``medretrain.request_id``; nothing here moves registry aliases.
"""

from __future__ import annotations

import json
import logging
import resource
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch

from schemas.settings import Settings

log = logging.getLogger(__name__)

REQUEST_TAG = "medretrain.request_id"
BASE_VERSION_TAG = "medretrain.base_version"
KIND_TAG = "medretrain.kind"
"""``retrain`` for a retrain run, ``tune`` / ``tune-trial`` for Ray Tune runs (kept apart in searches)."""


def client(settings: Settings):
    """An MlflowClient on the tracking server (no global mlflow state, so it is safe in workers)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=settings.mlflow.tracking_uri)


def experiment_id(settings: Settings) -> str:
    """The configured experiment, created on first use (another process may win the race)."""
    from mlflow.exceptions import MlflowException

    mlflow_client, name = client(settings), settings.mlflow.experiment
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return mlflow_client.create_experiment(name)
    except MlflowException:
        return mlflow_client.get_experiment_by_name(name).experiment_id


def find_run(settings: Settings, tag: str, value: str, kind: str) -> str | None:
    """Id of the newest run with ``tag == value`` and ``medretrain.kind == kind``, or None."""
    runs = client(settings).search_runs(
        [experiment_id(settings)],
        filter_string=f"tags.`{tag}` = '{value}' and tags.`{KIND_TAG}` = '{kind}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def open_run(settings: Settings, tags: dict[str, str], run_name: str, parent_run_id: str | None = None) -> str:
    """A new run with ``tags`` (child of ``parent_run_id`` when given); returns its id."""
    all_tags = dict(tags)
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client(settings).create_run(experiment_id(settings), tags=all_tags, run_name=run_name)
    return run.info.run_id


def start_or_resume(settings: Settings, run_id: str | None, tags: dict[str, str], run_name: str) -> str:
    """Reopen ``run_id`` (a resubmitted request) or open a new run; tags are (re)applied either way."""
    mlflow_client = client(settings)
    if run_id is None:
        return open_run(settings, tags, run_name)
    mlflow_client.update_run(run_id, status="RUNNING")
    for key, value in tags.items():
        mlflow_client.set_tag(run_id, key, value)
    log.info("resuming MLflow run %s", run_id)
    return run_id


@contextmanager
def finishing(settings: Settings, run_id: str) -> Iterator[None]:
    """Mark the run FINISHED when the block succeeds, FAILED when it raises (the error propagates)."""
    try:
        yield
    except BaseException:
        client(settings).set_terminated(run_id, status="FAILED")
        raise
    client(settings).set_terminated(run_id, status="FINISHED")


def run_param(settings: Settings, run_id: str, key: str) -> str | None:
    return client(settings).get_run(run_id).data.params.get(key)


def latest_metrics(settings: Settings, run_id: str) -> dict[str, float]:
    """The last logged value of every metric of the run."""
    return dict(client(settings).get_run(run_id).data.metrics)


def log_params(settings: Settings, run_id: str, params: dict[str, Any]) -> None:
    """Params are write-once in MLflow: a resumed run re-logs the same values, a changed one is only warned about."""
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException

    try:
        client(settings).log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
    except MlflowException as e:
        log.warning("run %s keeps its first params (%s)", run_id, e)


def log_json(settings: Settings, run_id: str, name: str, payload: Any, artifact_path: str | None = None) -> None:
    """A JSON artifact (e.g. ``train_config.json``) at the run's root or under ``artifact_path``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
        client(settings).log_artifact(run_id, str(path), artifact_path=artifact_path)


TIMELINE_METRIC = "timeline.{point}"
"""Zero-valued metrics whose timestamps mark points inside the Ray workers (services/timeline.py reads them)."""


def mark(settings: Settings, run_id: str, point: str, at: float | None = None) -> None:
    """Record that ``point`` (``model_loaded``, ``data_ready``, ``upload_started``, ``uploaded``) was reached."""
    from mlflow.entities import Metric

    stamp = int((time.time() if at is None else at) * 1000)
    client(settings).log_batch(run_id, metrics=[Metric(TIMELINE_METRIC.format(point=point), 0.0, stamp, 0)])


def upload_adapter(settings: Settings, run_id: str, model, tokenizer) -> None:
    """The PEFT adapter (safetensors) and the tokenizer under the run's ``adapter/`` artifact folder."""
    mark(settings, run_id, "upload_started")
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        client(settings).log_artifacts(run_id, tmp, artifact_path="adapter")
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
        client(self.settings).log_batch(self.run_id, metrics=batch)


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
