"""Fused LoRA projections for LLaMA blocks: the GPU fast path's ``train.fused_lora``.

peft runs every adapted projection on its own: the frozen GEMM, then LoRA's A and B, each
reading the layer's input again; in backward each projection adds one more [tokens, in] GEMM
and an add for the LoRA path's input gradient. Here the projections that share an input
(q/k/v; gate/up; o and down alone) and their A matrices are one GEMM against
``[W_1; ...; W_n; A_1; ...; A_n]``: forward reads the input once, and backward produces the
whole input gradient, frozen and LoRA paths together, in one GEMM. Each B stays a small GEMM
whose add inductor fuses into what follows (RoPE, SiLU·mul, the residual add).

    from trainer.fused import fuse_lora
    fuse_lora(peft_model)   # before torch.compile; parameters and their names stay peft's

Adapters save, load and resume exactly as before; only the forward of LLaMA attention and MLP
blocks changes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from types import MethodType

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from transformers.models.llama.modeling_llama import (
    ALL_ATTENTION_FUNCTIONS,
    LlamaAttention,
    LlamaMLP,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

log = logging.getLogger(__name__)

ADAPTER = "default"
"""peft's name for the one adapter a training run attaches."""


class _SharedInputLinear(torch.autograd.Function):
    """``x @ [frozen; lora_a]^T`` with a gradient for ``lora_a`` only (the frozen rows get none)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x: torch.Tensor, frozen: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
        weight = torch.cat([frozen, lora_a])
        ctx.save_for_backward(x, weight)
        ctx.frozen_rows = frozen.shape[0]
        return x @ weight.t()

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor]:
        x, weight = ctx.saved_tensors
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        grad_xa = grad[..., ctx.frozen_rows :].flatten(0, -2)
        grad_a = grad_xa.t() @ x.flatten(0, -2)
        return grad_x, None, grad_a


def lora_projections(x: torch.Tensor, layers: Sequence[LoraLinear]) -> list[torch.Tensor]:
    """Each layer's output ``W x + b + s·B A x`` for LoRA layers sharing the input ``x``, in one frozen GEMM."""
    bases = [layer.base_layer for layer in layers]
    downs = [layer.lora_A[ADAPTER].weight for layer in layers]
    frozen = torch.cat([b.weight for b in bases]) if len(bases) > 1 else bases[0].weight
    lora_a = torch.cat(downs) if len(downs) > 1 else downs[0]
    parts = _SharedInputLinear.apply(x, frozen, lora_a).split([b.out_features for b in bases] + [d.shape[0] for d in downs], -1)
    outputs = []
    for layer, base, frozen_out, xa in zip(layers, bases, parts, parts[len(layers) :]):
        out = frozen_out + (xa @ layer.lora_B[ADAPTER].weight.t()) * layer.scaling[ADAPTER]
        outputs.append(out if base.bias is None else out + base.bias)
    return outputs


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
    """``LlamaAttention.forward`` with q/k/v and o through :func:`lora_projections`."""
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q, k, v = (t.view(hidden_shape).transpose(1, 2) for t in lora_projections(hidden_states, (self.q_proj, self.k_proj, self.v_proj)))
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    if past_key_values is not None:
        k, v = past_key_values.update(k, v, self.layer_idx)
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
    dropout = self.attention_dropout if self.training else 0.0
    out, weights = attention(self, q, k, v, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs)
    (out,) = lora_projections(out.reshape(*input_shape, -1).contiguous(), (self.o_proj,))
    return out, weights


def _mlp_forward(self, x):
    """``LlamaMLP.forward`` with gate/up and down through :func:`lora_projections`."""
    gate, up = lora_projections(x, (self.gate_proj, self.up_proj))
    (down,) = lora_projections(self.act_fn(gate) * up, (self.down_proj,))
    return down


_PROJECTIONS = {LlamaAttention: ("q_proj", "k_proj", "v_proj", "o_proj"), LlamaMLP: ("gate_proj", "up_proj", "down_proj")}
_FORWARDS = {LlamaAttention: _attention_forward, LlamaMLP: _mlp_forward}


def _check_fusable(name: str, layer: torch.nn.Module) -> str | None:
    """Why ``layer`` cannot take the fused path, or None when it can."""
    if not isinstance(layer, LoraLinear) or ADAPTER not in layer.lora_A:
        return f"{name} has no LoRA adapter (fused_lora needs LoRA on every projection of a block)"
    if layer.active_adapters != [ADAPTER] or layer.merged or layer.use_dora.get(ADAPTER):
        return f"{name}: fused_lora supports one active, unmerged, plain LoRA adapter"
    if not isinstance(layer.lora_dropout[ADAPTER], torch.nn.Identity):
        return f"{name}: fused_lora needs lora.dropout=0 (dropout would feed A a second copy of the input)"
    return None


def fuse_lora(model: torch.nn.Module) -> int:
    """Route every LLaMA attention and MLP block through the fused projections; returns how many.

    Raises ValueError, listing each problem, when a block's projections are not all plain LoRA
    layers of one active adapter with dropout 0.
    """
    blocks = [(name, m) for name, m in model.named_modules() if type(m) in _FORWARDS]
    problems = [
        problem
        for name, block in blocks
        for proj in _PROJECTIONS[type(block)]
        if (problem := _check_fusable(f"{name}.{proj}", getattr(block, proj)))
    ]
    if problems or not blocks:
        raise ValueError("cannot fuse LoRA projections:\n  " + "\n  ".join(problems or ["the model has no LLaMA attention or MLP block"]))
    for _, block in blocks:
        block.forward = MethodType(_FORWARDS[type(block)], block)
    log.info("fused LoRA projections in %d blocks", len(blocks))
    return len(blocks)
