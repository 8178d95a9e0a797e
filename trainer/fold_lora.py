"""LoRA folded into the frozen GEMMs: ``y = x Wᵀ + s·(x Aᵀ) Bᵀ`` without PEFT's extra activation passes.

PEFT computes ``W x`` and ``s·B(A x)`` as two [tokens, out] tensors and adds them, and in backward
writes ``dy B A`` as a [tokens, in] tensor and adds it to ``dy W``: each an activation-sized write and
read per adapted layer. Here:

- forward joins the two products along the reduction dimension, ``[x | s·xAᵀ] [W | B]ᵀ``, where the
  layer's input is no wider than its output (q, o, gate, up): copying x with 16 more columns costs less
  than a [tokens, out] sum. Narrower outputs (k, v, down) keep the sum, one addmm reading ``x Wᵀ``.
- backward takes ``dx`` against the merged weight ``W + s·BA`` (rebuilt each step, weight-sized), in the
  same GEMM as ``dy B``: ``dy [B | W + s·BA]``. Only the input gradient uses the merged weight; forward
  and the LoRA gradients keep the unmerged products.
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
        out_features, in_features = weight.shape
        if in_features <= out_features:
            return torch.cat([x, xa], -1) @ torch.cat([weight, lora_b], 1).t()
        # One addmm, not mm + add: selective checkpointing then keeps the sum, not both products.
        y = torch.addmm(x.reshape(-1, in_features) @ weight.t(), xa.reshape(-1, xa.shape[-1]), lora_b.t())
        return y.view(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, None, torch.Tensor, torch.Tensor, None]:
        x, xa, weight, lora_a, lora_b = ctx.saved_tensors
        rank = lora_b.shape[1]
        # dx against W' = W + s·BA: one GEMM gives dy B and dx, with no [tokens, in] LoRA term to write and add.
        # Joined here, not taken from forward's [W | B], which the partitioner would then save (a second
        # copy of every frozen weight).
        d_joined = dy @ torch.cat([lora_b, weight + ctx.scale * (lora_b @ lora_a)], 1)
        d_xa = d_joined[..., :rank] * ctx.scale
        dx = d_joined[..., rank:]
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
