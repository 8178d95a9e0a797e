"""Helpers of the evaluator tests: rule sets, and REAL candidate runs made the way the trainer makes them.

A candidate is a LoRA adapter on the tiny base, saved as a PEFT folder with the tokenizer and
logged as ``adapter/`` on an MLflow run that carries the trainer's lineage tags and loss history.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import torch

from schemas.artifacts import Lineage, TrainedAdapter
from schemas.settings import LoraSettings, Settings
from trainer.model import attach_lora, load_base

CHEAP_EVAL = {"sample_size": 4, "loss_rows": 8, "max_new_tokens": 8, "batch_size": 4}
PASS_RULES = [
    {"name": "medquad_loss_finite", "metric": "medquad.loss", "kind": "value", "op": "<=", "threshold": 1e6},
    {
        "name": "forgetting_guard",
        "metric": "medquad.perplexity",
        "kind": "relative_delta",
        "op": "<=",
        "threshold": 1e9,
    },
    {
        "name": "production_loss_improves",
        "metric": "production.loss",
        "kind": "delta",
        "op": "<=",
        "threshold": 1e9,
        "on_missing": "pass",
    },
]
FAIL_RULES = [
    *PASS_RULES[:2],
    {"name": "impossible_loss", "metric": "medquad.loss", "kind": "value", "op": "<=", "threshold": 0.0},
]


def write_rules(path: Path, rules: list[dict]) -> Path:
    path.write_text(json.dumps({"schema_version": 1, "rules": rules}))
    return path


def save_adapter(base_dir: Path, out_dir: Path, seed: int) -> Path:
    """A PEFT folder (+ tokenizer) whose LoRA B matrices are random, so it really changes the model."""
    model, tokenizer = load_base(base_dir)
    adapter = attach_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj")))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, weight in adapter.named_parameters():
            if "lora_B" in name:
                weight.normal_(0.0, 0.5)
    adapter.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def log_candidate(
    settings: Settings, adapter_dir: Path | None, base_version: str, snapshot_id: str | None
) -> TrainedAdapter:
    """A finished MLflow run shaped like the trainer's: lineage tags, base version, loss history, ``adapter/``,
    ``trained_adapter.json``."""
    from deploy.registry import BASE_VERSION_TAG, mlflow_client
    from schemas.artifacts import TRAINED_ADAPTER_FILE
    from trainer.tracking import experiment_id

    client = mlflow_client(settings)
    lineage = Lineage(
        request_id=f"rr-test-{uuid.uuid4().hex[:8]}", snapshot_id=snapshot_id, parent_version="1", base_model="test"
    )
    tags = {**lineage.as_tags(), BASE_VERSION_TAG: base_version}
    run_id = client.create_run(experiment_id(settings), tags=tags, run_name=lineage.request_id).info.run_id
    for step in range(1, 6):
        client.log_metric(run_id, "train_loss", 3.0 / step, step=step)
    client.log_metric(run_id, "val_loss", 2.5, step=5)
    if adapter_dir is not None:
        client.log_artifacts(run_id, str(adapter_dir), artifact_path="adapter")
    adapter = TrainedAdapter(
        run_id=run_id,
        lineage=lineage.model_copy(update={"run_id": run_id}),
        steps=5,
        train_loss=0.6,
        val_loss=2.5,
        wall_s=1.0,
    )
    client.log_text(run_id, adapter.model_dump_json(), TRAINED_ADAPTER_FILE)
    client.set_terminated(run_id, "FINISHED")
    return adapter
