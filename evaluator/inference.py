"""Model-side measurements: teacher-forced answer loss and batched greedy generation.

Both reuse the trainer's formatting (``trainer.data``) and loss (``trainer.loss``), so a
model is scored on exactly the tokens and the chat template it was trained on.
:func:`run_tasks` runs several such measurements of one model at once on a CPU.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from rich.console import Console
from rich.progress import Progress, track
from transformers import StoppingCriteria, StoppingCriteriaList

from schemas.data import QAPair
from trainer.data import build_messages, collate, encode_rows
from trainer.loss import causal_lm, chunked_answer_loss, decoder_hidden

_progress_console = Console(stderr=True)
_tokenizer_lock = threading.Lock()
"""A fast tokenizer's padding state is shared Rust state: concurrent tasks take turns using it."""
Task = Callable[[Progress], object]
"""One measurement of a model; it reports its batches on the shared progress display."""


def run_tasks(model, tasks: Sequence[Task]) -> list:
    """Results of ``tasks`` in order; on a CPU, as many at once as torch has threads, each on one thread.

    Their small matmuls and per-token generation steps keep two OpenMP threads waiting on each
    other (and spinning whenever the other one is descheduled on a shared host), while
    independent single-threaded tasks keep every core busy: on 2 shared cores a loss pass and
    a generation took 62-94 s side by side against 198-216 s one after the other on 2 threads.
    Pass the longest tasks first.
    """
    workers = min(len(tasks), torch.get_num_threads()) if model.device.type == "cpu" else 1
    with Progress(console=_progress_console, transient=True) as progress:
        if workers <= 1:
            return [task(progress) for task in tasks]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # read by each pool thread when it first runs an op
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="scoring") as pool:
                return [future.result() for future in [pool.submit(task, progress) for task in tasks]]
        finally:
            torch.set_num_threads(threads)


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _tracked(items: Sequence, description: str, progress: Progress | None) -> Iterable:
    if progress is None:
        return track(items, description=description, console=_progress_console, transient=True)
    return progress.track(items, description=description)


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    return pad


@torch.inference_mode()
def answer_loss(
    model,
    tokenizer,
    rows: Sequence[QAPair],
    max_length: int,
    batch_size: int,
    label: str,
    progress: Progress | None = None,
) -> dict[str, float]:
    """Token-weighted mean cross-entropy over answer tokens, its perplexity, and the token count."""
    if not rows:
        raise ValueError(f"{label}: no rows to score")
    # Length-sorted batches pad least; the token-weighted sum does not depend on the order.
    with _tokenizer_lock:
        encoded = encode_rows(tokenizer, rows, max_length)
    examples = sorted(encoded, key=lambda item: len(item[1].input_ids))
    head = causal_lm(model).get_output_embeddings().weight
    total, count = 0.0, 0
    batches = list(_batches(examples, batch_size))
    for chunk in _tracked(batches, f"loss {label}", progress):
        batch = {k: v.to(model.device) for k, v in collate(chunk, pad_id=_pad_id(tokenizer)).items()}
        batch_sum, batch_count = chunked_answer_loss(decoder_hidden(model, batch), head, batch["labels"], 4096)
        total, count = total + float(batch_sum), count + int(batch_count)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": float(count)}


class _AfterStep(StoppingCriteria):
    """A stopping criterion that never stops: it calls ``hook`` once per decode step."""

    def __init__(self, hook: Callable[[], None]) -> None:
        self.hook = hook

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.hook()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


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
    progress: Progress | None = None,
    after_step: Callable[[], None] | None = None,
) -> list[str]:
    """Greedy answers, batched with left padding so every prompt ends where generation starts.

    ``no_repeat_ngram_size`` > 0 forbids repeating any token n-gram of that size (still
    deterministic): small models fine-tuned on long list-style answers otherwise loop under
    plain greedy decoding until the token limit. ``after_step`` runs after each decode step (the
    answer service lets adapter changes in there).
    """
    stopping = StoppingCriteriaList([_AfterStep(after_step)] if after_step else [])
    answers: list[str] = []
    for chunk in _tracked(list(_batches(list(questions), batch_size)), f"generate {label}", progress):
        prompts = [prompt_text(tokenizer, q) for q in chunk]
        with _tokenizer_lock:
            side, tokenizer.padding_side = tokenizer.padding_side, "left"
            try:
                enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            finally:
                tokenizer.padding_side = side
        enc = enc.to(model.device)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            no_repeat_ngram_size=no_repeat_ngram_size,
            pad_token_id=_pad_id(tokenizer),
            stopping_criteria=stopping,
        )
        with _tokenizer_lock:
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        answers.extend(t.strip() for t in texts)
    return answers
