"""Contracts reject what they must and the exported JSON Schemas match the code."""

import subprocess
import sys
import uuid

import pytest
from pydantic import ValidationError

from schemas.events import MAX_QUESTION_CHARS, QAEvent, RetrainRequest
from schemas.export import OUT, rendered
from schemas.settings import load_settings, parse_overrides

GOOD = {"event_id": str(uuid.uuid4()), "question": "What is glaucoma?", "answer": "An eye disease.", "source": "NEI"}


def test_qa_event_round_trip():
    event = QAEvent.model_validate(GOOD)
    assert QAEvent.model_validate_json(event.model_dump_json()) == event


@pytest.mark.parametrize("change, needle", [
    ({"schema_version": 2}, "unsupported schema_version 2"),
    ({"question": ""}, "question"),
    ({"question": "x" * (MAX_QUESTION_CHARS + 1)}, "question"),
    ({"event_id": "not-a-uuid"}, "event_id"),
    ({"surprise": 1}, "surprise"),
    ({"user_rating": 9}, "user_rating"),
])
def test_qa_event_rejects_bad_input_with_a_clear_reason(change, needle):
    with pytest.raises(ValidationError, match=needle):
        QAEvent.model_validate(GOOD | change)


def test_request_id_depends_only_on_reason_and_watermark():
    assert RetrainRequest.derive_id("threshold", 400) == RetrainRequest.derive_id("threshold", 400)
    assert RetrainRequest.derive_id("threshold", 400) != RetrainRequest.derive_id("threshold", 401)
    assert RetrainRequest.derive_id("threshold", 400) != RetrainRequest.derive_id("drift", 400)


def test_settings_overrides_are_validated_all_at_once():
    assert load_settings(["train.lr=0.001", "train.lora.r=4"]).train.lora.r == 4
    with pytest.raises(ValueError) as e:
        load_settings(["train.lr=-1", "trigger.threshold=0"])
    assert "train.lr" in str(e.value) and "trigger.threshold" in str(e.value)
    with pytest.raises(ValueError, match="section.field=value"):
        parse_overrides(["nonsense"])


def test_packed_flex_rows_must_be_whole_blocks():
    fast = ["train.packing=true", "train.attn_implementation=flex_attention"]
    assert load_settings([*fast, "train.max_length=2048"]).train.max_length == 2048
    with pytest.raises(ValueError, match="whole 128-token blocks"):
        load_settings([*fast, "train.max_length=200"])


def test_flex_kernel_options_need_flex_attention():
    options = "train.flex_kernel_options.fwd_BLOCK_N=64"
    assert load_settings(["train.attn_implementation=flex_attention", options]).train.flex_kernel_options == {
        "fwd_BLOCK_N": 64
    }
    with pytest.raises(ValueError, match="flex_kernel_options need attn_implementation=flex_attention"):
        load_settings([options])
    with pytest.raises(ValueError, match="flex_kernel_options need compile_mode=default"):
        load_settings(
            ["train.attn_implementation=flex_attention", options, "train.compile_mode=max-autotune-no-cudagraphs"]
        )


def test_flex_block_size_needs_flex_and_tiles_that_divide_it():
    flex = ["train.attn_implementation=flex_attention", "train.flex_block_size=64"]
    assert load_settings([*flex, "train.flex_kernel_options.bwd_BLOCK_M1=64"]).train.flex_block_size == 64
    with pytest.raises(ValueError, match=r"tiles must divide flex_block_size=64, got \{'fwd_BLOCK_M': 128\}"):
        load_settings([*flex, "train.flex_kernel_options.fwd_BLOCK_M=128", "train.flex_kernel_options.fwd_num_warps=8"])
    with pytest.raises(ValueError, match="flex_block_size needs attn_implementation=flex_attention"):
        load_settings(["train.flex_block_size=64"])
    with pytest.raises(ValueError, match="flex_block_size must divide 128, got 48"):
        load_settings(["train.attn_implementation=flex_attention", "train.flex_block_size=48"])


def test_varlen_attention_needs_packed_rows_and_half_precision_on_gpus():
    assert (
        load_settings(
            ["train.packing=true", "train.attn_implementation=varlen", "train.max_length=200"]
        ).train.max_length
        == 200
    )
    with pytest.raises(ValueError, match="needs packed rows"):
        load_settings(["train.attn_implementation=varlen"])
    with pytest.raises(ValueError, match="bf16 or fp16"):
        load_settings(
            ["train.packing=true", "train.attn_implementation=varlen", "train.use_gpu=true", "train.precision=32-true"]
        )
    with pytest.raises(ValueError, match="needs packed rows.*fold_lora needs"):  # every problem at once
        load_settings(["train.attn_implementation=varlen", "train.fold_lora=true"])


def test_fp16_is_refused_on_the_cpu_with_the_fix_named():
    assert load_settings(["train.use_gpu=true", "train.precision=16-mixed"]).train.precision == "16-mixed"
    assert load_settings(["train.precision=bf16-mixed"]).train.precision == "bf16-mixed"
    fix = r"16-mixed \(fp16\) needs a GPU: set train.use_gpu=true, or on the CPU use bf16"
    with pytest.raises(ValueError, match=fix):
        load_settings(["train.precision=16-mixed"])


def test_fold_lora_needs_no_dropout_and_no_autocast():
    assert load_settings(["train.fold_lora=true", "train.lora.dropout=0", "train.precision=bf16-true"]).train.fold_lora
    for bad in (["train.lora.dropout=0.05"], ["train.lora.dropout=0", "train.precision=bf16-mixed"]):
        with pytest.raises(ValueError, match="fold_lora needs"):
            load_settings(["train.fold_lora=true", *bad])


def test_selective_checkpointing_needs_folded_lora():
    fold = ["train.fold_lora=true", "train.lora.dropout=0", "train.precision=bf16-true"]
    assert (
        load_settings([*fold, "train.activation_checkpointing=selective"]).train.activation_checkpointing == "selective"
    )
    assert load_settings(["train.activation_checkpointing=full"]).train.activation_checkpointing == "full"
    with pytest.raises(ValueError, match="selective needs train.fold_lora"):
        load_settings(["train.activation_checkpointing=selective"])


def test_exported_json_schemas_are_current():
    assert {p.name: p.read_text() for p in OUT.glob("*.json")} == rendered()
    check = subprocess.run([sys.executable, "-m", "schemas.export", "--check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
