"""The fused LoRA projections compute what peft computes: same outputs, same gradients, same adapter files."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from schemas.settings import LoraSettings, TrainSettings
from trainer.fused import fuse_lora
from trainer.loss import answer_loss
from trainer.model import attach_lora
from trainer.packing import IGNORE, Example, collate_packed, pack_examples

LORA = LoraSettings(r=4, alpha=8, dropout=0.0)


def _peft_llama(lora: LoraSettings = LORA, bias: bool = False):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, attention_bias=bias, mlp_bias=bias,
    )
    config._attn_implementation = "sdpa"
    model = attach_lora(LlamaForCausalLM(config), lora)
    # B starts at zero in peft; random B makes the LoRA path's every term count.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model.train()


def _batch() -> dict[str, torch.Tensor]:
    examples = [Example(list(range(3, 3 + n)), [IGNORE] * 3 + list(range(6, 3 + n))) for n in (20, 11, 30)]
    return collate_packed(pack_examples(examples, row_len=64, pad_id=0))


def _loss_and_grads(model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = answer_loss(model, _batch(), chunk_tokens=16)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("bias", [False, True])
def test_fused_loss_and_lora_gradients_equal_peft(bias):
    plain = _peft_llama(bias=bias)
    fused = copy.deepcopy(plain)
    assert fuse_lora(fused) == 4  # 2 layers x (attention, MLP)
    loss, grads = _loss_and_grads(plain)
    fused_loss, fused_grads = _loss_and_grads(fused)
    assert torch.allclose(fused_loss, loss, atol=1e-6)
    assert grads.keys() == fused_grads.keys() and len(grads) == 2 * 7 * 2  # A and B of 7 projections, 2 layers
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        assert torch.allclose(fused_grads[name], grad, rtol=1e-4, atol=1e-6), name


def test_fused_model_keeps_peft_parameter_names_and_values():
    plain = _peft_llama()
    fused = copy.deepcopy(plain)
    fuse_lora(fused)
    assert fused.state_dict().keys() == plain.state_dict().keys()
    inputs = {k: v for k, v in _batch().items() if k in ("input_ids", "position_ids")}
    with torch.no_grad():
        assert torch.allclose(fused(**inputs).logits, plain(**inputs).logits, atol=1e-5)


def test_fusing_rejects_dropout_and_partial_targets_with_every_reason():
    with pytest.raises(ValueError) as err:
        fuse_lora(_peft_llama(LoraSettings(r=4, alpha=8, dropout=0.1, target_modules=("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"))))
    text = str(err.value)
    assert "k_proj has no LoRA adapter" in text and "o_proj has no LoRA adapter" in text and "lora.dropout=0" in text


def test_settings_reject_fused_lora_with_dropout_and_partial_flex_blocks():
    with pytest.raises(ValueError) as err:
        TrainSettings(fused_lora=True, packing=True, attn_implementation="flex_attention", max_length=200)
    assert "whole 128-token blocks" in str(err.value) and "fused_lora needs lora.dropout=0" in str(err.value)
