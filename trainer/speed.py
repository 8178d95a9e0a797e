"""The GPU fast path's model-side switches, applied after the LoRA adapter is attached.

Kept apart from model building so CPU runs (tests, the demo) stay plain and the bench and
``retrain.py`` apply exactly the same switches from ``TrainSettings``.
"""

from __future__ import annotations

import torch

from schemas.settings import TrainSettings
from trainer.fold_lora import fold_lora
from trainer.loss import causal_lm


def apply_speed_settings(model: torch.nn.Module, train: TrainSettings) -> torch.nn.Module:
    """Attention kernel, folded LoRA, activation checkpointing and torch.compile of the decoder, as configured."""
    lm = causal_lm(model)
    lm.set_attn_implementation(train.attn_implementation)
    if train.fold_lora:
        fold_lora(model)
    if train.activation_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if train.compile:
        # In-place compile keeps parameter names, so checkpoints and adapters save unchanged.
        getattr(lm, lm.base_model_prefix).compile(dynamic=False, mode=train.compile_mode)
    return model
