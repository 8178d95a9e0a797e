"""LoRA folded into the frozen GEMMs: ``y = x Wᵀ + s·(x Aᵀ) Bᵀ`` without PEFT's extra activation passes.

PEFT computes ``W x`` and ``s·B(A x)`` as two [tokens, out] tensors and adds them, and in backward
writes ``dy B A`` as a [tokens, in] tensor and adds it to ``dy W``: each an activation-sized write and
read per adapted layer. Here:

- sibling layers that read the same input (q, k, v; gate, up) run as one layer whose weight is theirs
  stacked and whose ``B`` is theirs block-diagonal: x is read once for ``x Aᵀ``, once for the A
  gradients, and their input gradients come out of one GEMM already summed.
- forward joins the two products along the reduction dimension, ``[x | s·xAᵀ] [W | B]ᵀ``, where the
  layer's input is no wider than its output (qkv, gate-up, o): copying x with a few more columns costs
  less than a [tokens, out] sum. Narrower outputs (down) keep the sum, one addmm reading ``x Wᵀ``.
- backward takes ``dx`` against the merged weight ``W + s·BA`` (rebuilt each step, weight-sized), in the
  same GEMM as ``dy B``: ``dy [B | W + s·BA]``. Only the input gradient uses the merged weight; forward
  and the LoRA gradients keep the unmerged products.
"""

from __future__ import annotations

import types
from collections.abc import Sequence

import torch
from peft.tuners.lora import Linear as LoraLinear

SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Sibling layers that read one input in LLaMA-family blocks; grouping is also checked per call."""


def _stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)  # one layer: no weight-sized copy


def _block_diagonal(lora_b: Sequence[torch.Tensor]) -> torch.Tensor:
    return lora_b[0] if len(lora_b) == 1 else torch.block_diag(*lora_b)


def _by_role(params: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], ...]:
    """The layers' weights, their As and their Bs, from ``params`` laid out in that order."""
    layers = len(params) // 3
    return params[:layers], params[layers : 2 * layers], params[2 * layers :]


class _FoldedLora(torch.autograd.Function):
    """``x Wᵢᵀ + s·(x Aᵢᵀ) Bᵢᵀ`` of layers i sharing x, side by side; gradients for x, the As and Bs (Ws are frozen).

    ``params`` are the layers' weights, then their As, then their Bs.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float, *params: torch.Tensor) -> torch.Tensor:
        weights, lora_as, lora_bs = _by_role(params)
        weight, lora_a, lora_b = _stack(weights), _stack(lora_as), _block_diagonal(lora_bs)
        xa = (x @ lora_a.t()) * scale
        ctx.save_for_backward(x, xa, *params)
        ctx.scale = scale
        out_features, in_features = weight.shape
        if in_features <= out_features:
            return torch.cat([x, xa], -1) @ torch.cat([weight, lora_b], 1).t()
        # One addmm, not mm + add: selective checkpointing then keeps the sum, not both products.
        y = torch.addmm(x.reshape(-1, in_features) @ weight.t(), xa.reshape(-1, xa.shape[-1]), lora_b.t())
        return y.view(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, xa, *params = ctx.saved_tensors
        weights, lora_as, lora_bs = _by_role(tuple(params))
        lora_b = _block_diagonal(lora_bs)
        rank = lora_b.shape[1]
        # dx against W' = W + s·BA: one GEMM gives dy B and dx, with no [tokens, in] LoRA term to write and add.
        # Merged layer by layer from the parameters: nothing shared with forward's [W | B], which the
        # partitioner would then save (a second copy of every frozen weight).
        merged = _stack([w + ctx.scale * (b @ a) for w, a, b in zip(weights, lora_as, lora_bs, strict=True)])
        d_joined = dy @ torch.cat([lora_b, merged], 1)
        d_xa = d_joined[..., :rank] * ctx.scale
        dx = d_joined[..., rank:]
        grad_a = d_xa.reshape(-1, rank).t() @ x.reshape(-1, x.shape[-1])
        grad_b = dy.reshape(-1, dy.shape[-1]).t() @ xa.reshape(-1, rank)  # each layer's block is its B's gradient
        rows, ranks = [w.shape[0] for w in weights], [a.shape[0] for a in lora_as]
        blocks = [part.split(ranks, 1)[i] for i, part in enumerate(grad_b.split(rows))]
        return dx, None, *([None] * len(weights)), *grad_a.split(ranks), *blocks


class _SharedInput:
    """Layers that read one input: the first called computes all, the others take their share given the same tensor."""

    def __init__(self, layers: list[LoraLinear]):
        self.layers = layers
        self.stash: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, index: int, x: torch.Tensor) -> torch.Tensor:
        stashed = self.stash.pop(index, None)
        if stashed is not None and stashed[0] is x:
            return stashed[1]
        (name,) = self.layers[0].active_adapters
        weights = [layer.base_layer.weight for layer in self.layers]
        lora_a = [layer.lora_A[name].weight for layer in self.layers]
        lora_b = [layer.lora_B[name].weight for layer in self.layers]
        y = _FoldedLora.apply(x, _scale(self.layers[0]), *weights, *lora_a, *lora_b)
        outputs = y.split([w.shape[0] for w in weights], -1)
        self.stash = {i: (x, out) for i, out in enumerate(outputs) if i != index}
        return outputs[index]


def _folded_forward(self: LoraLinear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    group, index = self.fold_group
    return group.forward(index, x)


def _check_plain(layer: LoraLinear) -> None:
    (name,) = layer.active_adapters
    plain = (
        not layer.merged and layer.base_layer.bias is None and name not in layer.lora_variant
        and isinstance(layer.lora_dropout[name], torch.nn.Identity)
    )  # fmt: skip
    if not plain:
        raise ValueError(f"fold_lora needs unmerged, bias-free LoRA without dropout or variants (DoRA): {layer}")


def _scale(layer: LoraLinear) -> float:
    (name,) = layer.active_adapters
    return layer.scaling[name]


def _groups(model: torch.nn.Module) -> list[list[LoraLinear]]:
    """Every LoRA linear once: siblings in SHARED_INPUT with one scale together, the rest alone."""
    grouped: list[list[LoraLinear]] = []
    for parent in model.modules():
        for names in SHARED_INPUT:
            layers = [getattr(parent, n, None) for n in names]
            if all(isinstance(layer, LoraLinear) for layer in layers) and len({_scale(layer) for layer in layers}) == 1:
                grouped.append(layers)
    seen = {id(layer) for group in grouped for layer in group}
    return grouped + [[m] for m in model.modules() if isinstance(m, LoraLinear) and id(m) not in seen]


def fold_lora(model: torch.nn.Module) -> int:
    """Route every plain LoRA linear of ``model`` through the folded GEMMs; returns how many layers.

    Parameters and their names stay PEFT's, so adapters save and load unchanged.
    """
    groups = _groups(model)
    for layers in groups:
        for layer in layers:
            _check_plain(layer)
    for layers in groups:
        group = _SharedInput(layers)
        for index, layer in enumerate(layers):
            layer.fold_group = (group, index)
            layer.forward = types.MethodType(_folded_forward, layer)
    return sum(len(layers) for layers in groups)
