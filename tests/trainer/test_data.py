"""Pure data pieces: chat template, prompt masking, collation, replay mixing, per-rank order."""

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from schemas.data import QAPair
from trainer.data import (
    SYSTEM_PROMPT,
    StepBatchSampler,
    collate,
    encode_pair,
    encode_rows,
    eval_shard,
    mix_rows,
    render_pair,
    sample_replay,
)
from trainer.packing import IGNORE


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _pair(i: int, answer: str = "Influenza is a viral infection of the airways.") -> QAPair:
    return QAPair(question=f"What is influenza, case {i}?", answer=answer, source="test")


def test_chat_template_wraps_question_and_ends_answer_with_end_of_turn(tokenizer):
    prompt, completion = render_pair(tokenizer, "What is flu?", "A virus.")
    assert SYSTEM_PROMPT in prompt
    assert "What is flu?" in prompt and prompt.rstrip().endswith("assistant")
    assert completion.startswith("A virus.") and "<|im_end|>" in completion


def test_labels_cover_exactly_the_answer_tokens(tokenizer):
    example = encode_pair(tokenizer, _pair(0), max_length=512)
    prompt, completion = render_pair(tokenizer, _pair(0).question, _pair(0).answer)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert example.labels[:n_prompt] == [IGNORE] * n_prompt
    assert example.labels[n_prompt:] == example.input_ids[n_prompt:]
    assert tokenizer.decode(example.input_ids[n_prompt:]) == completion


def test_truncation_keeps_the_assistant_header_and_some_answer(tokenizer):
    example = encode_pair(tokenizer, _pair(0, answer="word " * 500), max_length=64)
    assert len(example.input_ids) == 64
    answer_tokens = [t for t in example.labels if t != IGNORE]
    assert len(answer_tokens) >= 32
    header = tokenizer.decode(example.input_ids[: 64 - len(answer_tokens)])
    assert header.rstrip().endswith("assistant")


def test_collate_pads_right_and_masks_padding(tokenizer):
    items = encode_rows(tokenizer, [_pair(0, "Short."), _pair(1, "A much longer answer " * 5)], max_length=256)
    batch = collate(items, pad_id=tokenizer.pad_token_id)
    short_len = len(items[0][1].input_ids)
    assert batch["input_ids"].shape[0] == 2 and batch["input_ids"].shape == batch["labels"].shape
    assert batch["attention_mask"][0].sum() == short_len
    assert (batch["labels"][0, short_len:] == IGNORE).all()
    assert (batch["input_ids"][0, short_len:] == tokenizer.pad_token_id).all()
    assert batch["row_ids"].tolist() == [0, 1]


def test_replay_sample_is_seeded_and_sized():
    pool = [_pair(i) for i in range(100)]
    first = sample_replay(pool, n_new=10, ratio=2.0, seed=3, floor=5)
    assert len(first) == 20 and first == sample_replay(pool, n_new=10, ratio=2.0, seed=3, floor=5)
    assert len(sample_replay(pool, n_new=0, ratio=2.0, seed=3, floor=5)) == 5
    assert len(sample_replay(pool, n_new=1000, ratio=1.0, seed=3, floor=5)) == 100
    assert mix_rows([_pair(-1)], first)[0].question == _pair(-1).question


def test_mix_refuses_no_rows():
    with pytest.raises(ValueError, match="no training rows"):
        mix_rows([], [])


def test_rank_shards_are_disjoint_within_a_pass_and_cover_it():
    ranks = [StepBatchSampler(24, rank=r, world_size=2, batch_size=3, seed=5, start=0, count=4) for r in range(2)]
    seen = [[i for batch in sampler for i in batch] for sampler in ranks]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(24))


def test_sampler_resumes_the_same_order_from_a_position():
    whole = list(StepBatchSampler(10, rank=1, world_size=2, batch_size=2, seed=9, start=0, count=8))
    tail = list(StepBatchSampler(10, rank=1, world_size=2, batch_size=2, seed=9, start=5, count=3))
    assert tail == whole[5:]
    reshuffled = list(StepBatchSampler(10, rank=1, world_size=2, batch_size=2, seed=10, start=0, count=8))
    assert reshuffled != whole


def test_sampler_refuses_too_few_rows():
    with pytest.raises(ValueError, match="cannot fill one micro-batch"):
        StepBatchSampler(3, rank=0, world_size=2, batch_size=2, seed=0, start=0, count=1)


def test_eval_shards_have_equal_length_and_cover_the_set():
    shards = [eval_shard(5, rank, 2) for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) == 3
    assert set(shards[0]) | set(shards[1]) == set(range(5))
