"""Packed rows' document mask through FlashAttention's variable-length kernel.

flex_attention walks a packed row in 128 x 128 blocks; with MedQuAD's ~380-token pairs in
2048-token rows most blocks it computes are partial, and it ran at ~48 TFLOP/s on an H100.
``torch.nn.attention.varlen`` runs FlashAttention-2 over the flattened batch with one sequence
per pair (``cu_seq_lens``, made by the collate), so only within-pair causal tiles are computed.
It is registered with transformers as ``attn_implementation="varlen"``; on the CPU, where that
kernel does not exist, the same attention is computed pair by pair with SDPA.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch.nn.attention.varlen import varlen_attn
from transformers import AttentionInterface

VARLEN = "varlen"

_GQA = {"enable_gqa": True} if "enable_gqa" in inspect.signature(varlen_attn).parameters else {}
"""torch < 2.12 has no ``enable_gqa`` flag; its kernel takes fewer key/value heads as they are."""


def cu_seq_lens(position_ids: torch.Tensor) -> torch.Tensor:
    """Offsets of every pair in the flattened batch, then the token total (int32, as the kernel wants).

    A pair starts where its positions restart at 0; a row's padding tail counts as one more pair.
    """
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().squeeze(1)
    return torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: [batch, heads, seq, dim] in, [batch, seq, heads, dim] out."""
    if cu_seq_lens is None:
        raise ValueError("varlen attention needs packed rows: the batch has no cu_seq_lens (train.packing=true)")
    if dropout:
        raise ValueError("varlen attention has no attention dropout")
    batch, heads, length, dim = query.shape
    q, k, v = (t.transpose(1, 2).reshape(batch * length, t.shape[1], dim) for t in (query, key, value))
    out = _flash(q, k, v, cu_seq_lens, length, scaling) if q.is_cuda else _per_pair_sdpa(q, k, v, cu_seq_lens, scaling)
    return out.view(batch, length, heads, dim), None


def _flash(q, k, v, cu: torch.Tensor, max_len: int, scale: float | None) -> torch.Tensor:
    if torch.is_autocast_enabled(q.device.type):
        # A custom op is not autocast: RoPE in fp32 hands fp32 q/k to a kernel that takes fp16/bf16 only.
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    # max_len is the row length, a constant: a per-batch maximum would recompile a compiled model.
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, window_size=(-1, 0), **_GQA)


def _per_pair_sdpa(q, k, v, cu: torch.Tensor, scale: float | None) -> torch.Tensor:
    bounds = cu.tolist()
    heads_first = [t.transpose(0, 1) for t in (q, k, v)]
    pairs = [
        F.scaled_dot_product_attention(*(t[:, s:e] for t in heads_first), is_causal=True, scale=scale, enable_gqa=True)
        for s, e in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return torch.cat(pairs, dim=1).transpose(0, 1)


AttentionInterface.register(VARLEN, varlen_attention)
