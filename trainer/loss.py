"""Answer-token loss without materialising fp32 logits for the whole batch.

A causal LM's head turns [tokens, hidden] into [tokens, vocab] logits; for SmolLM2
(49k vocab) at 16k tokens per step that is 3 GiB in fp32 plus its gradient. Here the
decoder runs once, then the head + cross-entropy run over fixed-size chunks of tokens
under activation checkpointing, so only one chunk of logits exists at a time and the
backward pass recomputes it. Fixed chunk shapes keep torch.compile happy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from trainer.packing import IGNORE


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers CausalLM inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_hidden(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Last hidden states of the decoder stack (LoRA layers included), without the LM head."""
    lm = causal_lm(model)
    decoder = getattr(lm, lm.base_model_prefix)
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    return decoder(**inputs, use_cache=False).last_hidden_state


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = hidden @ weight.t()
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")


def chunked_answer_loss(
    hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over labelled positions, and their count.

    ``hidden`` is [batch, seq, dim]; position t predicts ``labels[:, t + 1]``.
    """
    flat_h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    flat_y = labels[:, 1:].reshape(-1)
    total = flat_h.new_zeros((), dtype=torch.float32)
    for start in range(0, flat_y.numel(), chunk_tokens):
        h, y = flat_h[start : start + chunk_tokens], flat_y[start : start + chunk_tokens]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss_sum, h, head_weight, y, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(h, head_weight, y)
    return total, (flat_y != IGNORE).sum()


def answer_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int = 4096) -> torch.Tensor:
    """Mean cross-entropy over answer tokens of a (padded or packed) batch."""
    hidden = decoder_hidden(model, batch)
    head = causal_lm(model).get_output_embeddings().weight
    total, count = chunked_answer_loss(hidden, head, batch["labels"], chunk_tokens)
    return total / count.clamp(min=1)
