"""Model-side measurements: teacher-forced answer loss and batched greedy generation.

Both reuse the trainer's formatting (``trainer.data``) and loss (``trainer.loss``), so a
model is scored on exactly the tokens and the chat template it was trained on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from rich.console import Console
from rich.progress import track

from schemas.data import QAPair
from trainer.data import build_messages, collate, encode_rows
from trainer.loss import causal_lm, chunked_answer_loss, decoder_hidden

_progress_console = Console(stderr=True)


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    return pad


@torch.inference_mode()
def answer_loss(
    model, tokenizer, rows: Sequence[QAPair], max_length: int, batch_size: int, label: str
) -> dict[str, float]:
    """Token-weighted mean cross-entropy over answer tokens, its perplexity, and the token count."""
    if not rows:
        raise ValueError(f"{label}: no rows to score")
    # Length-sorted batches pad least; the token-weighted sum does not depend on the order.
    examples = sorted(encode_rows(tokenizer, rows, max_length), key=lambda item: len(item[1].input_ids))
    head = causal_lm(model).get_output_embeddings().weight
    total, count = 0.0, 0
    batches = list(_batches(examples, batch_size))
    for chunk in track(batches, description=f"loss {label}", console=_progress_console, transient=True):
        batch = {k: v.to(model.device) for k, v in collate(chunk, pad_id=_pad_id(tokenizer)).items()}
        batch_sum, batch_count = chunked_answer_loss(decoder_hidden(model, batch), head, batch["labels"], 4096)
        total, count = total + float(batch_sum), count + int(batch_count)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": float(count)}


def prompt_text(tokenizer, question: str) -> str:
    """The generation prompt, identical to the prompt part of a training row."""
    return tokenizer.apply_chat_template(build_messages(question), tokenize=False, add_generation_prompt=True)


@torch.inference_mode()
def generate_answers(
    model,
    tokenizer,
    questions: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    label: str,
    no_repeat_ngram_size: int = 0,
) -> list[str]:
    """Greedy answers, batched with left padding so every prompt ends where generation starts.

    ``no_repeat_ngram_size`` > 0 forbids repeating any token n-gram of that size (still
    deterministic): small models fine-tuned on long list-style answers otherwise loop under
    plain greedy decoding until the token limit.
    """
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers: list[str] = []
    try:
        batches = list(_batches(list(questions), batch_size))
        for chunk in track(batches, description=f"generate {label}", console=_progress_console, transient=True):
            prompts = [prompt_text(tokenizer, q) for q in chunk]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                no_repeat_ngram_size=no_repeat_ngram_size,
                pad_token_id=_pad_id(tokenizer),
            )
            new_tokens = out[:, enc["input_ids"].shape[1] :]
            answers.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return answers
