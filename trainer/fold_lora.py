"""LoRA folded into the frozen GEMM: ``y = [x | s·x Aᵀ] [W | B]ᵀ``.

PEFT computes ``W x`` and ``s·B(A x)`` as two [tokens, out] tensors and adds them, so every
adapted layer writes and reads one more activation-sized tensor in forward, and backward
reads the output gradient once more for ``dy B``. Joined along the reduction dimension, one
GEMM gives the sum in forward and both ``dy W`` and ``dy B`` in backward; it costs 16 more
reduction columns of 2,048–5,632.
"""

from __future__ import annotations

import types

import torch
from peft.tuners.lora import Linear as LoraLinear


class _FoldedLora(torch.autograd.Function):
    """``x Wᵀ + s·(x Aᵀ) Bᵀ`` with gradients for x, A and B only (W is frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
        xa = (x @ lora_a.t()) * scale
        ctx.save_for_backward(x, xa, weight, lora_a, lora_b)
        ctx.scale = scale
        return torch.cat([x, xa], -1) @ torch.cat([weight, lora_b], 1).t()

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, None, torch.Tensor, torch.Tensor, None]:
        x, xa, weight, lora_a, lora_b = ctx.saved_tensors
        # [B | W], not forward's [W | B]: the same expression would be one node of the joint graph,
        # which the partitioner then saves for backward (another copy of every frozen weight).
        d_joined = dy @ torch.cat([lora_b, weight], 1)
        rank = lora_b.shape[1]
        d_xa = d_joined[..., :rank] * ctx.scale
        dx = d_joined[..., rank:] + d_xa @ lora_a
        grad_a = d_xa.reshape(-1, d_xa.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        grad_b = dy.reshape(-1, dy.shape[-1]).t() @ xa.reshape(-1, xa.shape[-1])
        return dx, None, grad_a, grad_b, None


def _folded_forward(self: LoraLinear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    (name,) = self.active_adapters
    return _FoldedLora.apply(x, self.base_layer.weight, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])


def fold_lora(model: torch.nn.Module) -> int:
    """Route every plain LoRA linear of ``model`` through the folded GEMM; returns how many.

    Parameters and their names stay PEFT's, so adapters save and load unchanged.
    """
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    for layer in layers:
        (name,) = layer.active_adapters
        plain = (
            not layer.merged and layer.base_layer.bias is None and name not in layer.lora_variant
            and isinstance(layer.lora_dropout[name], torch.nn.Identity)
        )  # fmt: skip
        if not plain:
            raise ValueError(f"fold_lora needs unmerged, bias-free LoRA without dropout or variants (DoRA): {layer}")
        layer.forward = types.MethodType(_folded_forward, layer)
    return len(layers)
