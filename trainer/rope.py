"""RoPE's cos/sin tables stored once a forward under torch.compile, not recomputed in every layer.

transformers computes cos and sin of each (token, frequency) once in the decoder and hands them to
every layer. Inductor sees a cheap pointwise producer and inlines it into its consumers, so each
layer's RoPE kernels, forward and backward, evaluate cos and sin again for every element of q and k:
36 heads x 22 layers at TinyLlama's shape. Passed through an op inductor cannot see into, the tables
are written once ([batch, tokens, head dim], a few MB) and the layers read them.
"""

from __future__ import annotations

import functools

import torch


@torch.library.custom_op("medretrain::stored", mutates_args=())
def stored(x: torch.Tensor) -> torch.Tensor:
    """A copy of ``x``: opaque to inductor, so ``x`` is computed into memory, not inlined into its readers."""
    return x.clone()


@stored.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def store_rope_tables(model: torch.nn.Module) -> int:
    """Route every rotary-embedding module's (cos, sin) through ``stored``; returns how many modules."""
    rotary = [
        m
        for m in model.modules()
        if type(m).__name__.endswith("RotaryEmbedding") and not hasattr(m, "unstored_forward")
    ]
    for module in rotary:
        module.unstored_forward = module.forward
        module.forward = functools.partial(_stored_tables, module.unstored_forward)
    return len(rotary)


def _stored_tables(forward, *args, **kwargs) -> tuple[torch.Tensor, ...]:
    return tuple(stored(table) for table in forward(*args, **kwargs))
