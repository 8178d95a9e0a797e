"""Model builders: the tiny test LLaMA, loading, LoRA adapters and the real SmolLM2 GGUF conversion."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from schemas.settings import LoraSettings
from trainer.model import attach_lora, build_tiny_llama, convert_gguf, load_base

LORA = LoraSettings(r=4, alpha=8, dropout=0.0)


def _next_token_logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(["What is gout?", "How is asthma treated?"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits[:, -1]


def test_tiny_llama_is_safetensors_with_the_smollm2_chat_tokenizer(tiny_model_dir: Path) -> None:
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert "model.safetensors" in names
    assert not {n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))}
    model, tokenizer = load_base(tiny_model_dir)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
    messages = [{"role": "user", "content": "Hi"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert model.dtype == torch.float32


def test_tiny_llama_is_deterministic_per_seed(tmp_path: Path, tiny_model_dir: Path) -> None:
    same = load_file(build_tiny_llama(tmp_path / "same", seed=0) / "model.safetensors")
    other = load_file(build_tiny_llama(tmp_path / "other", seed=1) / "model.safetensors")
    reference = load_file(tiny_model_dir / "model.safetensors")
    assert all(torch.equal(reference[k], same[k]) for k in reference)
    assert not all(torch.equal(reference[k], other[k]) for k in reference)


def test_load_base_rejects_a_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_base(tmp_path)


def test_new_adapter_trains_only_lora_weights(tiny_model_dir: Path) -> None:
    model, _ = load_base(tiny_model_dir)
    peft_model = attach_lora(model, LORA)
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert any("gate_proj" in name for name in trainable)
    with pytest.raises(ValueError, match="adapter_dir"):
        attach_lora(load_base(tiny_model_dir)[0], LORA, trainable=False)


def test_saved_adapter_reloads_frozen_or_trainable_with_same_outputs(tiny_model_dir: Path, tmp_path: Path) -> None:
    model, tokenizer = load_base(tiny_model_dir)
    trained = attach_lora(model, LORA)
    with torch.no_grad():  # stands in for training: LoRA B starts at zero, which would hide a lost adapter
        for name, param in trained.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    trained.eval()
    expected = _next_token_logits(trained, tokenizer)
    trained.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == LORA.r

    frozen = attach_lora(load_base(tiny_model_dir)[0], LORA, tmp_path / "adapter", trainable=False).eval()
    assert not any(p.requires_grad for p in frozen.parameters())
    torch.testing.assert_close(_next_token_logits(frozen, tokenizer), expected)
    base_only = _next_token_logits(load_base(tiny_model_dir)[0].eval(), tokenizer)
    assert not torch.allclose(base_only, expected)

    resumed = attach_lora(load_base(tiny_model_dir)[0], LoraSettings(r=64), tmp_path / "adapter", trainable=True)
    lora_params = [p for name, p in resumed.named_parameters() if "lora_" in name]
    assert lora_params and all(p.requires_grad for p in lora_params)
    assert lora_params[0].shape[0] == LORA.r  # the saved adapter's config wins over the settings


def test_smollm2_gguf_converts_to_bf16_safetensors_that_answer(tmp_path: Path) -> None:
    out = convert_gguf(tmp_path / "smollm2")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert all(t.dtype == torch.bfloat16 for t in load_file(out / "model.safetensors").values())
    model, tokenizer = load_base(out, torch.bfloat16)
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|im_end|>")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    batch = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(generated[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
