"""Teacher-forced loss and batched generation on the tiny model, checked against unbatched references."""

from __future__ import annotations

import math
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from eval_fixtures import save_adapter

from evaluator import inference
from evaluator.evaluate import build_eval_set, measure
from schemas.settings import Settings, with_overrides
from trainer.data import encode_rows
from trainer.medquad import load_medquad
from trainer.model import load_adapter, load_base


@pytest.fixture(scope="module")
def adapted(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny base with a random (non-zero) LoRA adapter: its answers are not empty."""
    adapter_dir = save_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter"), seed=11)
    model, tokenizer = load_base(tiny_model_dir)
    return load_adapter(model, adapter_dir).eval(), tokenizer


@pytest.fixture(scope="module")
def rows():
    return load_medquad("test")[:5]


def test_answer_loss_equals_per_row_losses_weighted_by_answer_tokens(adapted, rows):
    model, tokenizer = adapted
    scores = inference.answer_loss(model, tokenizer, rows, max_length=128, batch_size=3, label="t")

    total = count = 0
    for _, example in encode_rows(tokenizer, rows, 128):  # one row at a time: no padding at all
        ids, labels = torch.tensor([example.input_ids]), torch.tensor([example.labels])
        with torch.no_grad():
            row_loss = model(input_ids=ids, labels=labels).loss.item()  # HF shifts and masks -100 itself
        n = int((labels[0, 1:] != -100).sum())
        total, count = total + row_loss * n, count + n
    assert scores["tokens"] == count
    assert scores["loss"] == pytest.approx(total / count, rel=1e-4)
    assert scores["perplexity"] == pytest.approx(math.exp(scores["loss"]), rel=1e-9)


def test_batched_left_padded_generation_matches_one_by_one(adapted, rows):
    model, tokenizer = adapted
    questions = [r.question for r in rows]  # different lengths: the batch needs padding
    batched = inference.generate_answers(model, tokenizer, questions, max_new_tokens=6, batch_size=5, label="t")
    single = [inference.generate_answers(model, tokenizer, [q], 6, 1, "t")[0] for q in questions]
    assert batched == single
    assert any(batched), "the random adapter should produce text"
    assert tokenizer.padding_side == "right"  # restored for the loss path


def _repeats_a_bigram(tokenizer, text: str) -> bool:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bigrams = list(zip(ids, ids[1:], strict=False))
    return len(set(bigrams)) < len(bigrams)


def test_no_repeat_ngram_decoding_breaks_greedy_loops(adapted, rows):
    model, tokenizer = adapted
    question = rows[0].question
    plain = inference.generate_answers(model, tokenizer, [question], 40, 1, "t")[0]
    blocked = inference.generate_answers(model, tokenizer, [question], 40, 1, "t", no_repeat_ngram_size=2)[0]
    assert _repeats_a_bigram(tokenizer, plain), "the random tiny model should loop under plain greedy decoding"
    assert not _repeats_a_bigram(tokenizer, blocked)


def test_prompt_is_the_training_prompt(adapted):
    from trainer.data import render_pair

    _, tokenizer = adapted
    prompt, _ = render_pair(tokenizer, "What is gout?", "A kind of arthritis.")
    assert inference.prompt_text(tokenizer, "What is gout?") == prompt


def test_eval_sets_are_seeded_and_nested():
    settings = with_overrides(Settings(), {"evaluate": {"sample_size": 3, "loss_rows": 7, "seed": 5}})
    rows = load_medquad("test")[:50]
    first = build_eval_set("medquad", rows, settings)
    assert len(first.loss_rows) == 7 and first.sample == first.loss_rows[:3]
    assert first == build_eval_set("medquad", rows, settings)
    other = build_eval_set("medquad", rows, with_overrides(settings, {"evaluate": {"seed": 6}}))
    assert other.loss_rows != first.loss_rows
    with pytest.raises(ValueError, match="empty"):
        build_eval_set("production", [], settings)


@pytest.fixture
def two_torch_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_cpu_tasks_run_side_by_side_on_one_torch_thread_each(two_torch_threads):
    both_started = threading.Barrier(2, timeout=10)  # broken, and the test fails, if the tasks ran one by one

    def task(progress):
        both_started.wait()
        return torch.get_num_threads(), threading.current_thread().name

    first, second = inference.run_tasks(SimpleNamespace(device=torch.device("cpu")), [task, task])
    assert first[0] == second[0] == 1 and first[1] != second[1]
    assert torch.get_num_threads() == 2  # restored for the caller


def test_tasks_on_an_accelerator_run_one_by_one_in_the_caller(two_torch_threads):
    seen = inference.run_tasks(SimpleNamespace(device=torch.device("meta")),
                               [lambda progress: threading.current_thread()] * 2)
    assert seen == [threading.current_thread()] * 2


def test_measurement_side_by_side_equals_one_task_at_a_time(adapted, rows, two_torch_threads):
    model, tokenizer = adapted
    settings = with_overrides(Settings(), {"evaluate": {"sample_size": 3, "loss_rows": 5, "max_new_tokens": 6,
                                                        "batch_size": 2, "no_repeat_ngram_size": 2}})
    sets = [build_eval_set("medquad", rows, settings), build_eval_set("production", rows[1:], settings)]
    side_by_side = measure(model, tokenizer, sets, settings, "t")
    torch.set_num_threads(1)
    one_by_one = measure(model, tokenizer, sets, settings, "t")
    assert side_by_side == one_by_one
    assert set(side_by_side.answers) == {"medquad", "production"} and any(side_by_side.answers["medquad"])
    assert tokenizer.padding_side == "right"
