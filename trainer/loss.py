"""Answer-token loss without materialising fp32 logits for the whole batch.

A causal LM's head turns [tokens, hidden] into [tokens, vocab] logits; for SmolLM2
(49k vocab) at 16k tokens per step that is 3 GiB in fp32 plus its gradient. Here the
decoder runs once; then only the positions that predict an answer token go through the
head, in fixed-size chunks, and each chunk's gradient is taken right away (softmax minus
one-hot, times the head), so one chunk of logits exists at a time and backward needs no
second pass through the head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.attention import VARLEN
from trainer.packing import IGNORE


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers CausalLM inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_hidden(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], flex_kernel_options: dict | None = None
) -> torch.Tensor:
    """Last hidden states of the decoder stack (LoRA layers included), without the LM head.

    ``flex_kernel_options`` reach flex_attention's kernels when the model attends with it.
    """
    lm = causal_lm(model)
    decoder = getattr(lm, lm.base_model_prefix)
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    if flex_kernel_options and lm.config._attn_implementation == "flex_attention":
        inputs["kernel_options"] = flex_kernel_options
    if lm.config._attn_implementation == VARLEN:
        inputs["cu_seq_lens"] = batch["cu_seq_lens"]
        # The pair count changes every batch: one compiled graph for all counts, not one each.
        torch._dynamo.mark_dynamic(inputs["cu_seq_lens"], 0)
    return decoder(**inputs, use_cache=False).last_hidden_state


def _logits_loss_and_grad(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of ``logits`` [n, vocab] (taken in fp32) and its gradient, in the logits' dtype."""
    log_probs = torch.log_softmax(logits.float(), -1)
    loss = -log_probs.gather(1, targets[:, None]).sum()
    grad = log_probs.exp().scatter_add(1, targets[:, None], log_probs.new_full((len(targets), 1), -1.0))
    return loss, grad.to(logits.dtype)


_compiled_loss_and_grad = torch.compile(_logits_loss_and_grad, dynamic=True)
"""The same on GPUs: inductor fuses upcast, softmax, gather and one-hot into two passes over the logits."""


class _HeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ head^T`` against ``targets``, chunk by chunk; gradients taken in forward."""

    @staticmethod
    def forward(
        ctx, hidden: torch.Tensor, head: torch.Tensor, targets: torch.Tensor, chunk_tokens: int
    ) -> torch.Tensor:
        loss_and_grad = _compiled_loss_and_grad if hidden.is_cuda else _logits_loss_and_grad
        grad = torch.empty_like(hidden) if hidden.requires_grad else None
        # LoRA leaves the head frozen; a trained head (full fine-tuning) gets its gradient too.
        grad_head = torch.zeros_like(head) if head.requires_grad else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, len(targets), chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            logits = hidden[rows] @ head.t()
            if grad is None and grad_head is None:  # evaluation: the loss alone
                total += F.cross_entropy(logits.float(), targets[rows], reduction="sum")
                continue
            loss, grad_logits = loss_and_grad(logits, targets[rows])
            total += loss
            # Assignments, not out=: under fp16 autocast the products are fp16 and the buffers fp32.
            if grad is not None:
                grad[rows] = grad_logits @ head
            if grad_head is not None:
                grad_head += grad_logits.t() @ hidden[rows]
        ctx.save_for_backward(grad, grad_head)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        grads = [None if g is None else g * grad_total.to(g.dtype) for g in ctx.saved_tensors]
        return grads[0], grads[1], None, None


def chunked_answer_loss(
    hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over labelled positions, and their count.

    ``hidden`` is [batch, seq, dim]; position t predicts ``labels[:, t + 1]``.
    """
    if not torch.is_grad_enabled():
        # The function takes gradients for inputs that require them; under no_grad nothing will use them.
        head_weight = head_weight.detach()
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE).reshape(-1)
    scored = (targets != IGNORE).nonzero().squeeze(1)
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, scored)
    total = _HeadCrossEntropy.apply(picked, head_weight, targets.index_select(0, scored), chunk_tokens)
    return total, scored.new_tensor(len(scored))


def answer_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    chunk_tokens: int = 4096,
    flex_kernel_options: dict | None = None,
) -> torch.Tensor:
    """Mean cross-entropy over answer tokens of a (padded or packed) batch."""
    hidden = decoder_hidden(model, batch, flex_kernel_options)
    head = causal_lm(model).get_output_embeddings().weight
    total, count = chunked_answer_loss(hidden, head, batch["labels"], chunk_tokens)
    return total / count.clamp(min=1)
