"""flex_attention's document mask in blocks smaller than flex's default 128 x 128 tokens.

flex_attention computes every (query block, key block) tile its block mask lists and masks inside the
partial ones. MedQuAD's pairs average ~340 tokens in 2048-token rows, so with 128-token blocks it
computes ~58% more than the pairs' causal area, with 64-token blocks ~28% (docs/perf-log.md, run 9).
transformers builds the mask at flex's default size; ``use_flex_block_size`` makes it rebuild the
mask at the configured size, and makes inductor's backward heuristic offer tiles that fit it.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch
from torch._inductor import config as inductor_config
from torch._inductor.choices import InductorChoices
from torch._inductor.virtualized import V
from torch.nn.attention.flex_attention import _DEFAULT_SPARSE_BLOCK_SIZE, BlockMask, create_block_mask
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flex_attention_mask

FLEX = "flex_attention"


def use_flex_block_size(block: int) -> None:
    """Build flex_attention masks in ``block`` x ``block`` token blocks from now on (flex's default: 128)."""
    small = block < _DEFAULT_SPARSE_BLOCK_SIZE
    ALL_MASK_ATTENTION_FUNCTIONS.register(FLEX, partial(_reblocked_mask, block=block) if small else flex_attention_mask)
    ours = getattr(inductor_config.inductor_choices_class, "func", None) is _TilesWithinBlocks
    if small or ours:  # another heuristics class (torch's own on ROCm) is left alone
        inductor_config.inductor_choices_class = partial(_TilesWithinBlocks, block) if small else None
        # Inductor keeps one heuristics object per thread, made on first use: replace this thread's as well.
        V.set_choices_handler(_TilesWithinBlocks(block) if small else InductorChoices())


def _reblocked_mask(*args, block: int, **kwargs) -> BlockMask:
    """transformers' flex mask (packing, padding, offsets), rebuilt in smaller blocks from the same mask function.

    Under torch.compile the default-size mask it was built from is dead code and is left out.
    """
    mask = flex_attention_mask(*args, **kwargs)
    q_len, kv_len = mask.seq_lengths
    return create_block_mask(
        mask.mask_mod,
        mask.shape[0],
        None,
        q_len,
        kv_len,
        device=mask.kv_num_blocks.device,
        BLOCK_SIZE=block,
        _compile=True,
    )


class _TilesWithinBlocks(InductorChoices):
    """Backward tiles no larger than the mask's blocks.

    torch checks its default backward tiles (128 on an H100 at head dim 64) against the mask's blocks
    before ``kernel_options`` replace them, and with none left it refuses to compile the backward.
    """

    def __init__(self, block: int):
        super().__init__()
        self.block = block

    def get_flex_attention_bwd_configs(
        self, head_dim: int, dtype: torch.dtype, device_type: str | None = "cuda"
    ) -> list:
        fit = partial(min, self.block)
        return [
            dataclasses.replace(
                c,
                block_m1=fit(c.block_m1),
                block_n1=fit(c.block_n1),
                block_m2=fit(c.block_m2),
                block_n2=fit(c.block_n2),
            )
            for c in super().get_flex_attention_bwd_configs(head_dim, dtype, device_type)
        ]

    def uuid(self) -> str:
        """Inductor's cache key for a custom heuristics class."""
        return f"{type(self).__qualname__}-{self.block}"
