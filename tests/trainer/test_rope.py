"""RoPE's cos/sin: evaluated once a step by the compiled decoder, not again in every layer, with the same outputs."""

import copy

import torch
from test_fold_lora import _adapted
from torch._inductor.utils import run_and_get_code

from schemas.settings import TrainSettings
from trainer.rope import store_rope_tables
from trainer.speed import apply_speed_settings


def _compiled_run(model, ids: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """Forward and backward of the inductor-compiled decoder: last hidden states and each kernel source it generated."""
    torch._dynamo.reset()
    decoder = torch.compile(model.base_model.model.model, dynamic=False)
    return run_and_get_code(_step, decoder, ids)


def _step(decoder, ids: torch.Tensor) -> torch.Tensor:
    hidden = decoder(input_ids=ids).last_hidden_state
    hidden.square().sum().backward()
    return hidden.detach()


def _kernels_computing_cos(code: list[str]) -> int:
    """Generated C++ kernels (one ``extern "C"`` function each) that evaluate a cosine."""
    return sum(
        ".cos()" in kernel or "std::cos" in kernel for source in code for kernel in source.split('extern "C"')[1:]
    )


def test_stored_tables_are_evaluated_once_with_the_same_outputs():
    plain = _adapted()
    layers = plain.config.num_hidden_layers
    stored = copy.deepcopy(plain)
    assert store_rope_tables(stored) == 1
    ids = torch.randint(0, 97, (2, 24))
    plain_hidden, plain_code = _compiled_run(plain, ids)
    stored_hidden, stored_code = _compiled_run(stored, ids)
    assert _kernels_computing_cos(plain_code) >= 2 * layers  # inlined: each layer's forward and backward
    assert _kernels_computing_cos(stored_code) == 1
    assert torch.allclose(stored_hidden, plain_hidden, atol=1e-6)  # kernels fused differently round differently
    for (name, p), q in zip(plain.named_parameters(), stored.parameters(), strict=True):
        if p.requires_grad:
            # Compiled and eager gradients of this model differ by ~1e-4 of their largest entry in fp32 as well.
            assert (q.grad - p.grad).abs().max() <= 1e-3 * p.grad.abs().max(), name
    assert store_rope_tables(stored) == 0  # already routed: not wrapped twice


def test_the_trainer_stores_the_tables_when_it_compiles_and_only_then():
    for compile in (False, True):
        model = apply_speed_settings(_adapted(), TrainSettings(compile=compile))
        assert hasattr(model.base_model.model.model.rotary_emb, "unstored_forward") is compile
