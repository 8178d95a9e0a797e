"""Selective activation checkpointing: same loss and gradients, fewer saved activations, no GEMM recomputed."""

import collections
import copy

import pytest
import torch
from test_fold_lora import _adapted, _loss_and_lora_grads, partition_backend

from schemas.settings import TrainSettings
from trainer.speed import apply_speed_settings


def _checkpointed(model, mode: str):
    train = TrainSettings(activation_checkpointing=mode, fold_lora=True, lora={"dropout": 0.0})
    return apply_speed_settings(model, train).train()


def test_selective_checkpointing_keeps_loss_and_gradients():
    plain = _adapted().train()
    selective = _checkpointed(copy.deepcopy(plain), "selective")
    ids = torch.randint(0, 97, (2, 24))
    loss, grads = _loss_and_lora_grads(plain, ids)
    selective_loss, selective_grads = _loss_and_lora_grads(selective, ids)
    assert torch.allclose(selective_loss, loss, atol=1e-6)
    for name, grad in grads.items():
        assert torch.allclose(selective_grads[name], grad, atol=1e-6), name


def _partition(model, tokens: int) -> tuple[int, int, int]:
    """Activation bytes the compiled decoder saves for backward, the GEMM/attention calls backward repeats
    from forward (same op, same shapes), and backward's RMSNorm recomputations (rsqrt)."""
    found = collections.Counter()

    def signatures(graph: torch.fx.Graph) -> list[tuple]:
        heavy = ("mm", "attention")
        calls = [n for n in graph.nodes if n.op == "call_function" and any(h in str(n.target) for h in heavy)]
        return [
            (n.target, *(tuple(a.meta["val"].shape) for a in n.args if isinstance(a, torch.fx.Node))) for n in calls
        ]

    def record(saved: list, forward: torch.fx.Graph, backward: torch.fx.Graph) -> None:
        # Only concrete [.., tokens, ..] activations count; a symbolic size would add a guard mid-compile.
        concrete = [v for v in saved if isinstance(v, torch.Tensor) and all(isinstance(d, int) for d in v.shape)]
        found["saved"] += sum(v.nbytes for v in concrete if tokens in v.shape)
        forward_calls = set(signatures(forward))
        found["repeated"] += sum(sig in forward_calls for sig in signatures(backward))
        found["rsqrt"] += sum(n.target is torch.ops.aten.rsqrt.default for n in backward.nodes)

    torch._dynamo.reset()  # each model compiles afresh, not as a dynamic-shape recompile of the last
    decoder = torch.compile(model.base_model.model.model, dynamic=False, backend=partition_backend(record))
    decoder(input_ids=torch.randint(0, 97, (1, tokens))).last_hidden_state.sum().backward()
    return found["saved"], found["repeated"], found["rsqrt"]


def test_compiled_selective_checkpointing_saves_less_and_repeats_no_gemm_or_attention():
    tokens = 48  # distinct from every weight dimension of the tiny model
    plain = _checkpointed(_adapted(), "off")
    saved, repeated, rsqrt = _partition(plain, tokens)
    selective = _checkpointed(copy.deepcopy(plain), "selective")
    selective_saved, selective_repeated, selective_rsqrt = _partition(selective, tokens)
    full_saved, full_repeated, _ = _partition(_checkpointed(copy.deepcopy(plain), "full"), tokens)
    assert full_saved < selective_saved < 0.7 * saved
    assert repeated == selective_repeated == 0 < full_repeated  # full recomputes GEMMs, which the check can see
    assert selective_rsqrt > rsqrt  # RMSNorm is recomputed instead of saved


def test_unknown_flex_kernel_options_are_refused_before_training():
    train = TrainSettings(
        attn_implementation="flex_attention", flex_kernel_options={"fwd_BLOCK_N": 64, "bwd_BLOK_M1": 32}
    )
    with pytest.raises(ValueError, match=r"\['bwd_BLOK_M1'\] are not flex_attention kernel options"):
        apply_speed_settings(_adapted(), train)
