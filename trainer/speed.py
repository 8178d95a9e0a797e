"""The GPU fast path's model-side switches, applied after the LoRA adapter is attached.

Kept apart from model building so CPU runs (tests, the demo) stay plain and the bench and
``retrain.py`` apply exactly the same switches from ``TrainSettings``.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.nn.attention.flex_attention import FlexKernelOptions
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from schemas.settings import TrainSettings
from trainer.flex_mask import use_flex_block_size
from trainer.fold_lora import fold_lora
from trainer.loss import causal_lm
from trainer.rope import store_rope_tables


def apply_speed_settings(model: torch.nn.Module, train: TrainSettings) -> torch.nn.Module:
    """Attention kernel (its flex options checked, its mask blocks set), folded LoRA, activation checkpointing and
    torch.compile of the decoder (RoPE tables stored once), as configured."""
    unknown = {
        k
        for k in train.flex_kernel_options
        if k.removeprefix("fwd_").removeprefix("bwd_") not in FlexKernelOptions.__annotations__
    }
    if unknown:
        raise ValueError(
            f"train.flex_kernel_options: {sorted(unknown)} are not flex_attention kernel options (FlexKernelOptions)"
        )
    lm = causal_lm(model)
    lm.set_attn_implementation(train.attn_implementation)
    use_flex_block_size(train.flex_block_size)
    if train.fold_lora:
        fold_lora(model)
    if train.activation_checkpointing != "off":
        kwargs = {"use_reentrant": False}
        if train.activation_checkpointing == "selective":
            kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, _save_matmuls_and_attention)
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if train.fold_lora:
            # Folded siblings hand over their outputs through a stash (trainer/fold_lora.py), emptied within the
            # layer: nothing for backward's recompute to replay. Without this dynamo breaks the graph at every layer.
            torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    if train.compile:
        store_rope_tables(lm)
        # In-place compile keeps parameter names, so checkpoints and adapters save unchanged.
        getattr(lm, lm.base_model_prefix).compile(dynamic=False, mode=train.compile_mode)
    return model


_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


def _save_matmuls_and_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective checkpointing: what a GEMM or an attention kernel made is kept, cheap memory-bound ops recomputed."""
    # Attention ops differ by kernel and torch version (flex_attention, sdpa's, torch_attn::_varlen_attn).
    name = str(op)
    keep = op in _MATMULS or "attention" in name or "attn" in name
    return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE
