"""Fixtures of the trainer tests: a tiny random LLaMA with the real SmolLM2 tokenizer."""

from pathlib import Path

import pytest

from trainer.model import build_tiny_llama


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HF folder (safetensors + tokenizer with chat template), built once per test session."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")
