"""torch.compile's kernels kept between retrains and Tune trials (deploy.cache, kind ``compile``).

    callback = CompileCache.for_model(settings, model)    # a Lightning callback; None unless train.compile
    lightning.Trainer(callbacks=[callback, ...])

Compiling the decoder from nothing costs every worker of every round minutes on a GPU. torch's
portable cache (``torch.compiler.save_cache_artifacts`` / ``load_cache_artifacts``: inductor's FX graph
and autotuning caches) is loaded before the first step and, when it was a miss, saved by rank 0 after the
first step and again when training ends (validation compiled its own graphs by then). The key names
what the compiled graphs depend on: the model's shape, the train settings that change the graph, the
versions of torch and transformers, the device, and the source of the modules that build the graph.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch

from deploy.cache import BlobCache, cache_key
from schemas.settings import Settings, TrainSettings
from trainer.loss import causal_lm

log = logging.getLogger(__name__)

KIND = "compile"
GRAPH_SETTINGS = (
    "use_gpu", "precision", "micro_batch_size", "max_length", "packing", "attn_implementation", "flex_kernel_options",
    "flex_block_size", "compile_mode", "fold_lora", "activation_checkpointing", "loss_chunk_tokens", "lora",
)  # fmt: skip
"""TrainSettings fields that change the compiled graphs or their input shapes."""
GRAPH_CODE = ("loss.py", "fold_lora.py", "rope.py", "flex_mask.py", "attention.py", "speed.py", "packing.py")
"""trainer modules whose code ends up inside the compiled graphs."""


def device_name(train: TrainSettings) -> str:
    return torch.cuda.get_device_name() if train.use_gpu and torch.cuda.is_available() else "cpu"


def compile_key(train: TrainSettings, model_config: dict[str, Any], device: str) -> str:
    here = Path(__file__).parent
    code = hashlib.sha256(b"".join((here / name).read_bytes() for name in GRAPH_CODE)).hexdigest()
    config = {k: v for k, v in model_config.items() if k not in ("_name_or_path", "transformers_version")}
    return cache_key(
        settings=train.model_dump(mode="json", include=set(GRAPH_SETTINGS)),
        model=config,
        torch=torch.__version__,
        transformers=importlib.metadata.version("transformers"),
        device=device,
        code=code,
    )


class CompileCache(L.Callback):
    """Restores the compile cache before the first step; rank 0 saves it after a miss."""

    def __init__(self, cache: BlobCache, key: str):
        self.cache, self.key = cache, key
        self.hit = False

    @classmethod
    def for_model(cls, settings: Settings, model: torch.nn.Module) -> CompileCache | None:
        cache = BlobCache.open(settings, KIND)
        if cache is None or not settings.train.compile:
            return None
        config = causal_lm(model).config.to_dict()
        return cls(cache, compile_key(settings.train, config, device_name(settings.train)))

    def restore(self) -> bool:
        body = self.cache.get(self.key)
        if body is None:
            log.info("compile cache %s: miss", self.key)
            return False
        try:
            info = torch.compiler.load_cache_artifacts(body)  # None: the bytes did not deserialize
        except Exception as e:  # noqa: BLE001 - any unreadable entry: compile from nothing, never half-loaded
            info, why = None, str(e)
        else:
            why = "not torch cache artifacts"
        if info is None:
            log.warning("compile cache %s unusable (%s): compiling afresh, then replacing it", self.key, why)
            return False
        log.info("compile cache %s: %d bytes restored (%s)", self.key, len(body), dict(info.artifacts))
        return True

    def save(self) -> None:
        artifacts = torch.compiler.save_cache_artifacts()
        if artifacts is None:
            return
        body, info = artifacts
        self.cache.put(self.key, body)
        log.info("compile cache %s: %d bytes saved (%s)", self.key, len(body), dict(info.artifacts))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.hit = self.restore()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0 and trainer.current_epoch == 0 and not self.hit and trainer.is_global_zero:
            self.save()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.hit and trainer.is_global_zero:
            self.save()
