"""The drift reference of a model version: embedded questions it was trained on, kept as MLflow artifacts of its run.

    version, reference = champion_reference(settings, engine)   # builds and logs it on first use

A reference is a seeded sample of ``drift.reference_size`` training questions:

- a base version trained on the MedQuAD train split, so its sample comes from that split;
- an adapter version trained on its snapshot's production rows plus MedQuAD replay, so half its
  sample (at most) comes from the store rows of the snapshot its retrain request covered (the
  production evaluation slice left out, as in training), the rest from the MedQuAD train split.
  Earlier snapshots of its lineage are left out: the sample follows the newest data.

It is stored as ``drift/reference.npz`` (embeddings, questions, sources, qtypes) and
``drift/reference.json`` (how it was built) in the version's run; a reference built with other
settings or another embedder is rebuilt and replaced.
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine, select

from schemas.events import utcnow
from schemas.settings import Settings
from services.store import QAEventRow, RetrainRequestRow, SnapshotRow
from services.trigger.drift import QuestionSample, qtype_label
from services.trigger.embeddings import EMBEDDER, embed
from services.trigger.export import in_eval_slice

log = logging.getLogger(__name__)

ARTIFACT_DIR = "drift"
NPZ, META = "reference.npz", "reference.json"

Row = tuple[str, str, str, str | None]
"""(question, source, qtype label, focus)"""


def medquad_rows(split: str = "train") -> list[Row]:
    from trainer.medquad import load_medquad

    return [(p.question, p.source, qtype_label(p.qtype), p.focus) for p in load_medquad(split)]


def snapshot_rows(settings: Settings, engine: Engine, version: str) -> list[Row]:
    """Training rows of the snapshot whose retrain produced ``version`` (none for a base version)."""
    with engine.connect() as conn:
        snapshot_id = conn.execute(select(RetrainRequestRow.snapshot_id)
                                   .where(RetrainRequestRow.model_version == str(version))).scalars().first()
        if snapshot_id is None:
            return []
        bounds = conn.execute(select(SnapshotRow.min_row_id, SnapshotRow.max_row_id)
                              .where(SnapshotRow.snapshot_id == snapshot_id)).first()
        if bounds is None:
            return []
        rows = conn.execute(select(QAEventRow.event_id, QAEventRow.question, QAEventRow.source, QAEventRow.qtype,
                                   QAEventRow.focus)
                            .where(QAEventRow.row_id.between(bounds.min_row_id, bounds.max_row_id))).all()
    fraction = settings.trigger.prod_eval_fraction
    return [(r.question, r.source, qtype_label(r.qtype), r.focus) for r in rows
            if not in_eval_slice(r.event_id, fraction)]


def sample_reference(production: list[Row], size: int, seed: int) -> tuple[list[Row], dict[str, int]]:
    """A seeded sample of ``size`` training rows: production rows up to half, MedQuAD train for the rest."""
    rng = random.Random(seed)
    production = rng.sample(production, min(len(production), size // 2))
    medquad = medquad_rows("train")
    medquad = rng.sample(medquad, min(len(medquad), size - len(production)))
    return production + medquad, {"snapshot_rows": len(production), "medquad_train": len(medquad)}


def build_sample(rows: list[Row], batch_size: int, on_batch: Callable[[int], None] | None = None) -> QuestionSample:
    questions = [row[0] for row in rows]
    return QuestionSample(questions=questions, embeddings=embed(questions, batch_size, on_batch),
                          sources=[row[1] for row in rows], qtypes=[row[2] for row in rows],
                          topics=[row[3] for row in rows])


def save_reference(sample: QuestionSample, meta: dict[str, Any], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(folder / NPZ, embeddings=sample.embeddings, questions=np.array(sample.questions),
                        sources=np.array(sample.sources), qtypes=np.array(sample.qtypes),
                        topics=np.array([t or "" for t in sample.topics or [""] * len(sample)]))
    (folder / META).write_text(json.dumps(meta, indent=2, sort_keys=True))


def read_reference(folder: Path) -> tuple[QuestionSample, dict[str, Any]]:
    try:
        meta = json.loads((folder / META).read_text())
        with np.load(folder / NPZ, allow_pickle=False) as data:
            sample = QuestionSample(questions=data["questions"].tolist(), embeddings=data["embeddings"],
                                    sources=data["sources"].tolist(), qtypes=data["qtypes"].tolist(),
                                    topics=[t or None for t in data["topics"].tolist()])
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"{folder} holds no readable drift reference: {e}") from e
    return sample, meta


def _wanted(settings: Settings, version: str) -> dict[str, Any]:
    """What must match for a stored reference to be reused."""
    return {"embedder": EMBEDDER, "model_version": str(version), "size": settings.drift.reference_size,
            "seed": settings.drift.seed}


def _download(client, run_id: str, folder: Path) -> tuple[QuestionSample, dict[str, Any]] | None:
    names = {Path(f.path).name for f in client.list_artifacts(run_id, ARTIFACT_DIR)}
    if not {NPZ, META} <= names:
        return None
    client.download_artifacts(run_id, ARTIFACT_DIR, str(folder))
    return read_reference(folder / ARTIFACT_DIR)


def load_or_build(settings: Settings, engine: Engine, version: str,
                  on_batch: Callable[[int], None] | None = None) -> QuestionSample:
    """The reference of registered ``version``: from its run's artifacts, else built and logged there."""
    from deploy.registry import open_registry

    client, name = open_registry(settings)
    run_id = client.get_model_version(name, str(version)).run_id
    if not run_id:
        raise ValueError(f"{name} version {version} has no run to keep its drift reference in")
    wanted = _wanted(settings, version)
    with tempfile.TemporaryDirectory(prefix="medretrain-drift-") as tmp:
        stored = _download(client, run_id, Path(tmp))
        if stored is not None and all(stored[1].get(k) == v for k, v in wanted.items()):
            log.info("drift reference of %s version %s loaded from run %s", name, version, run_id)
            return stored[0]
        production = snapshot_rows(settings, engine, version)
        rows, composition = sample_reference(production, settings.drift.reference_size, settings.drift.seed)
        log.info("building the drift reference of %s version %s: %d questions %s", name, version, len(rows),
                 composition)
        sample = build_sample(rows, settings.drift.embed_batch_size, on_batch)
        meta = wanted | {
            "built_at": utcnow().isoformat(),
            "composition": composition,
            "run_id": run_id,
            "source_counts": dict(Counter(sample.sources)),
            "qtype_counts": dict(Counter(sample.qtypes)),
        }
        save_reference(sample, meta, Path(tmp) / "out")
        client.log_artifacts(run_id, str(Path(tmp) / "out"), ARTIFACT_DIR)
    return sample


def champion_version(settings: Settings) -> str:
    """The version the ``champion`` alias points at; LookupError before a bootstrap."""
    from mlflow.exceptions import MlflowException

    from deploy.registry import CHAMPION, alias_version, open_registry

    client, name = open_registry(settings)
    try:
        version = alias_version(client, name, CHAMPION)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        version = None
    if version is None:
        raise LookupError(f"registered model {name!r} has no {CHAMPION} yet: run `medretrain model bootstrap` first")
    return str(version)
