"""Training data as pure functions: chat formatting, tokenization, replay mixing, per-rank order, collation.

Nothing here knows about Ray or Lightning, so every piece is unit-tested on its own and the GPU
fast path (packing) can swap the collator without touching the loss or the loop:

    items = encode_rows(tokenizer, rows, max_length=256)
    sampler = StepBatchSampler(len(items), rank=0, world_size=2, batch_size=4, seed=17, start=0, count=10)
    loader = DataLoader(items, batch_sampler=sampler, collate_fn=partial(collate, pad_id=0))
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator, Sequence

import torch

from schemas.data import QAPair
from trainer.packing import IGNORE, Example, PackedRow, collate_packed, pack_examples

log = logging.getLogger(__name__)

SYSTEM_PROMPT = "You are a careful medical assistant. Answer the question accurately and concisely."
"""Shared by training and the evaluator, so a model is scored in the format it was trained on."""


def build_messages(question: str, answer: str | None = None) -> list[dict[str, str]]:
    """Chat messages for one QA pair; without ``answer`` it is the generation prompt."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def render_pair(tokenizer, question: str, answer: str) -> tuple[str, str]:
    """(prompt, completion) text through the tokenizer's chat template.

    The completion is what the template adds after the generation prompt, so it carries the
    template's end-of-turn marker and the model learns to stop.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; medretrain trains chat (instruct) models only")
    prompt = tokenizer.apply_chat_template(build_messages(question), tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(build_messages(question, answer), tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently with and without an answer")
    return prompt, full[len(prompt) :]


def _truncated(prompt_ids: list[int], answer_ids: list[int], max_length: int) -> Example:
    """Prompt ids + answer ids with the prompt masked in the labels, cut to ``max_length``.

    Too long: the prompt keeps its last tokens (the question end and the assistant header) within
    half the budget, and the answer is cut at the end.
    """
    if len(prompt_ids) + len(answer_ids) > max_length:
        prompt_ids = prompt_ids[-max(max_length // 2, max_length - len(answer_ids)) :]
        answer_ids = answer_ids[: max_length - len(prompt_ids)]
    return Example(prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids)


def encode_rows(tokenizer, rows: Sequence[QAPair], max_length: int) -> list[tuple[int, Example]]:
    """(row id, example) in order; the row id (position in ``rows``) travels with the batch for lineage.

    Prompts and completions are tokenized separately (as at inference), each list in one call:
    pair by pair, per-call overhead doubled the time (11k MedQuAD pairs: 42 s against 18-22 s
    on 2 cores), and the fast tokenizer may use several threads on a batch.
    """
    rendered = [render_pair(tokenizer, row.question, row.answer) for row in rows]
    if not rendered:
        return []
    prompts = tokenizer([prompt for prompt, _ in rendered], add_special_tokens=False)["input_ids"]
    answers = tokenizer([completion for _, completion in rendered], add_special_tokens=False)["input_ids"]
    return [(i, _truncated(p, a, max_length)) for i, (p, a) in enumerate(zip(prompts, answers, strict=True))]


def encode_pair(tokenizer, pair: QAPair, max_length: int) -> Example:
    """One pair, tokenized and masked exactly as in :func:`encode_rows`."""
    return encode_rows(tokenizer, [pair], max_length)[0][1]


def collate(items: Sequence[tuple[int, Example]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch of (row id, example); padding is masked in attention and labels."""
    width = max(len(e.input_ids) for _, e in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, (_, e) in enumerate(items):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attention_mask[i, :n] = 1
    row_ids = torch.tensor([row_id for row_id, _ in items], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "row_ids": row_ids,
            "num_tokens": attention_mask.sum()}


def pack_items(
    items: Sequence[tuple[int, Example]], row_len: int, pad_id: int
) -> list[tuple[tuple[int, ...], PackedRow]]:
    """Encoded (row id, example) pairs packed into fixed-length rows, each with the row ids it holds."""
    rows = pack_examples([e for _, e in items], row_len, pad_id)
    return [(tuple(items[m][0] for m in row.members), row) for row in rows]


def training_items(tokenizer, rows: Sequence[QAPair], train, encode=None) -> list:
    """What a sampler walks over: encoded pairs, or packed rows of them with ``train.packing``.

    ``encode`` replaces :func:`encode_rows` (same signature, same result), e.g. by one with a cache.
    """
    items = (encode or encode_rows)(tokenizer, rows, train.max_length)
    return pack_items(items, train.max_length, tokenizer.pad_token_id) if train.packing else items


def steps_for_epochs(items: int, epochs: float, train, world_size: int) -> int:
    """Optimizer steps that walk ``epochs`` times over ``items`` micro-batch items on ``world_size`` ranks."""
    per_step = train.micro_batch_size * train.gradient_accum * world_size
    return max(1, math.ceil(epochs * items / per_step))


def collate_packed_items(items: Sequence[tuple[tuple[int, ...], PackedRow]]) -> dict[str, torch.Tensor]:
    """A micro-batch of packed rows; ``row_ids`` lists every pair in it (the data position bookkeeping)."""
    batch = collate_packed([row for _, row in items])
    batch["row_ids"] = torch.tensor([i for ids, _ in items for i in ids], dtype=torch.long)
    return batch


def sample_replay(pool: Sequence[QAPair], n_new: int, ratio: float, seed: int, floor: int) -> list[QAPair]:
    """``ratio * n_new`` rows of ``pool`` (at least ``floor``, at most all), seeded."""
    want = min(len(pool), max(floor, round(ratio * n_new)))
    return random.Random(seed).sample(list(pool), want)


def mix_rows(new_rows: Sequence[QAPair], replay: Sequence[QAPair]) -> list[QAPair]:
    """New rows first, then replay; order does not matter since the sampler shuffles."""
    if not new_rows and not replay:
        raise ValueError("no training rows: the snapshot is empty and the replay sample is empty")
    return [*new_rows, *replay]


def eval_shard(size: int, rank: int, world_size: int) -> list[int]:
    """This rank's indices of an eval set: together they cover it, equally many per rank (the last
    few wrap around and repeat) so every rank runs the same number of validation steps."""
    if size == 0:
        raise ValueError("the evaluation set is empty")
    return [(i * world_size + rank) % size for i in range(-(-size // world_size))]


class StepBatchSampler:
    """Deterministic micro-batches of one rank, addressable by position.

    The global order is an endless sequence of seeded permutations of the dataset (one per
    pass). Global micro-batch ``b`` of rank ``r`` takes the items at ``(b*batch_size + j)*world_size + r``,
    so ranks read disjoint rows within a pass. This sampler yields micro-batches
    ``start .. start+count-1``: a resumed run passes the position stored in its checkpoint and
    continues the same order instead of replaying the first batches.
    """

    def __init__(self, size: int, rank: int, world_size: int, batch_size: int, seed: int, start: int, count: int):
        if size < world_size * batch_size:
            raise ValueError(
                f"{size} rows cannot fill one micro-batch of {batch_size} on each of {world_size} ranks; "
                "lower train.micro_batch_size or add rows"
            )
        self.size, self.rank, self.world_size = size, rank, world_size
        self.batch_size, self.seed, self.start, self.count = batch_size, seed, start, count
        self._perms: dict[int, list[int]] = {}

    def _item(self, global_index: int) -> int:
        pass_no, offset = divmod(global_index, self.size)
        if pass_no not in self._perms:
            self._perms = {pass_no: random.Random(self.seed * 1_000_003 + pass_no).sample(range(self.size), self.size)}
        return self._perms[pass_no][offset]

    def batch(self, position: int) -> list[int]:
        first = position * self.batch_size
        return [self._item((first + j) * self.world_size + self.rank) for j in range(self.batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        for position in range(self.start, self.start + self.count):
            yield self.batch(position)

    def __len__(self) -> int:
        return self.count
