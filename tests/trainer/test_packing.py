"""Packing keeps pairs independent: the packed loss equals each pair's own loss."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trainer.attention import cu_seq_lens, varlen_attention
from trainer.flex_mask import use_flex_block_size
from trainer.loss import answer_loss, chunked_answer_loss
from trainer.packing import IGNORE, Example, collate_packed, pack_examples, packing_efficiency

ROW = 128
"""Packed row length of the attention tests: one flex_attention block."""


def _example(ids: list[int], prompt_len: int) -> Example:
    return Example(list(ids), [IGNORE] * prompt_len + list(ids[prompt_len:]))


def _tiny_llama(attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    config._attn_implementation = attn
    return LlamaForCausalLM(config).eval()


def _only(labels: torch.Tensor, start: int, end: int) -> torch.Tensor:
    kept = torch.full_like(labels, IGNORE)
    kept[:, start:end] = labels[:, start:end]
    return kept


def test_pack_examples_fills_rows_and_restarts_positions():
    examples = [_example(range(10 + i, 10 + i + n), 2) for i, n in enumerate([7, 5, 9, 3, 12])]
    rows = pack_examples(examples, row_len=16, pad_id=0)
    assert all(len(r.input_ids) == len(r.labels) == len(r.position_ids) == 16 for r in rows)
    assert sum(r.real_tokens for r in rows) == 36
    assert len(rows) == 3  # 36 tokens cannot fit in two rows of 16
    assert packing_efficiency(rows) == pytest.approx(36 / 48)
    for row in rows:
        starts = [i for i, p in enumerate(row.position_ids) if p == 0]
        for s in starts:
            assert row.labels[s] == IGNORE  # a pair's first token is never a target


def test_pack_truncates_overlong_examples():
    rows = pack_examples([_example(range(1, 30), 3)], row_len=8, pad_id=0)
    assert rows[0].input_ids == list(range(1, 9)) and rows[0].real_tokens == 8


def test_chunked_loss_gradients_match_full_logits_loss():
    torch.manual_seed(0)
    hidden = torch.randn(2, 20, 16, requires_grad=True)
    head = torch.randn(97, 16, requires_grad=True)
    labels = torch.randint(0, 97, (2, 20))
    labels[:, :5] = IGNORE
    reference = torch.nn.functional.cross_entropy(
        (hidden @ head.t())[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE
    )
    expected = torch.autograd.grad(reference, (hidden, head))
    total, count = chunked_answer_loss(hidden, head, labels, chunk_tokens=7)
    assert int(count) == 2 * 15
    assert torch.allclose(total / count, reference, atol=1e-6)
    for got, want in zip(torch.autograd.grad(total / count, (hidden, head)), expected, strict=True):
        assert torch.allclose(got, want, atol=1e-6)


def test_chunked_loss_matches_full_logits_loss():
    model = _tiny_llama("eager")
    ids = torch.randint(1, 97, (2, 20))
    labels = ids.clone()
    labels[:, :5] = IGNORE
    with torch.no_grad():
        reference = model(input_ids=ids, labels=labels).loss
        hidden = model.model(input_ids=ids).last_hidden_state
        total, count = chunked_answer_loss(hidden, model.lm_head.weight, labels, chunk_tokens=7)
    assert torch.allclose(total / count, reference, atol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa", "flex_attention", "varlen"])
def test_packed_loss_equals_unpacked_per_pair_loss(attn):
    model = _tiny_llama(attn)
    a, b = _example(range(3, 14), 4), _example(range(20, 29), 3)
    # Rows of whole 128-token blocks, as the trainer requires for flex: its kernels read past a
    # partial last block (pytorch#159247), which gave NaNs at random on the CPU.
    batch = collate_packed(pack_examples([a, b], row_len=ROW, pad_id=0))
    # Largest first: a occupies 0..10, b 11..19, padding after.
    with torch.no_grad():
        for start, end, ex in ((0, 11, a), (11, 20, b)):
            packed = answer_loss(model, {**batch, "labels": _only(batch["labels"], start, end)})
            alone = answer_loss(model, collate_packed(pack_examples([ex], row_len=ROW, pad_id=0)))
            assert torch.allclose(packed, alone, atol=1e-5), (attn, start)


def test_flex_kernel_options_reach_flex_attention(monkeypatch):
    from transformers.integrations import flex_attention as hf_flex

    seen = []
    original = hf_flex.compile_friendly_flex_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("kernel_options"))
        return original(*args, **kwargs)

    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", spy)
    model = _tiny_llama("flex_attention")
    batch = collate_packed(pack_examples([_example(range(3, 14), 4)], row_len=ROW, pad_id=0))
    options = {"ROWS_GUARANTEED_SAFE": True}
    with torch.no_grad():
        answer_loss(model, batch, flex_kernel_options=options)
        assert seen == [options, options]  # one call a layer
        seen.clear()
        answer_loss(model, batch)
    assert seen == [None, None]


@pytest.mark.parametrize("attn", ["sdpa", "varlen"])
def test_other_pair_changes_neither_loss_nor_gradients(attn):
    model = _tiny_llama(attn).train()
    b = _example(range(20, 29), 3)

    def loss_and_grads(a_tokens: range) -> tuple[torch.Tensor, list[torch.Tensor]]:
        # a (11 tokens) is packed first, so b (positions 11..19) would see it without the document mask.
        batch = collate_packed(pack_examples([_example(a_tokens, 4), b], row_len=24, pad_id=0))
        model.zero_grad()
        loss = answer_loss(model, {**batch, "labels": _only(batch["labels"], 11, 20)})
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    loss1, grads1 = loss_and_grads(range(3, 14))
    loss2, grads2 = loss_and_grads(range(60, 71))
    assert torch.allclose(loss1, loss2, atol=1e-6)
    assert all(torch.allclose(g1, g2, atol=1e-6) for g1, g2 in zip(grads1, grads2, strict=True))


def test_pack_items_keeps_every_row_id_once():
    from trainer.data import collate_packed_items, pack_items

    items = [(100 + i, _example(range(1, 3 + i), 1)) for i in range(12)]
    packed = pack_items(items, row_len=16, pad_id=0)
    seen = sorted(i for ids, _ in packed for i in ids)
    assert seen == [100 + i for i in range(12)]
    batch = collate_packed_items(packed[:2])
    assert batch["input_ids"].shape == (2, 16) and "attention_mask" not in batch
    assert sorted(batch["row_ids"].tolist()) == sorted(i for ids, _ in packed[:2] for i in ids)


def test_cu_seq_lens_marks_every_pair_and_padding_tail_in_the_flat_batch():
    batch = collate_packed(
        pack_examples(
            [_example(range(1, 12), 2), _example(range(1, 8), 2), _example(range(1, 10), 2)], row_len=16, pad_id=0
        )
    )
    # First fit, longest first: rows [11-token pair, 5 padding] and [9-token pair, 7-token pair].
    assert batch["cu_seq_lens"].tolist() == [0, 11, 16, 25, 32]
    assert batch["cu_seq_lens"].dtype == torch.int32


def _packed_qkv(device: str, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Two 256-token rows of pairs of uneven lengths, 8 query and 2 key/value heads (GQA); then the positions."""
    torch.manual_seed(0)
    positions = torch.cat([torch.arange(n) for n in (37, 180, 39, 5, 251)]).view(2, 256)
    q = torch.randn(2, 8, 256, 64, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, 2, 256, 64, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    return q, k, v, positions.to(device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashAttention's varlen kernel needs a GPU")
def test_flash_varlen_kernel_equals_per_pair_sdpa():
    q, k, v, positions = _packed_qkv("cuda", torch.bfloat16)
    flash, _ = varlen_attention(None, q, k, v, None, scaling=0.125, cu_seq_lens=cu_seq_lens(positions))
    _assert_per_pair_sdpa(flash, q, k, v, positions)


def _assert_per_pair_sdpa(
    out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
) -> None:
    """``out`` [batch, tokens, heads, dim] and the gradients of its sum of squares equal per-pair SDPA (fp32, CPU),
    to bf16 tolerance."""
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    cpu = [t.detach().float().cpu().requires_grad_() for t in (q, k, v)]
    reference, _ = varlen_attention(None, *cpu, None, scaling=0.125, cu_seq_lens=cu_seq_lens(positions).cpu())
    reference_grads = torch.autograd.grad(reference.square().sum(), cpu)
    assert torch.allclose(out.float().cpu(), reference, atol=2e-2)
    for got, want in zip(grads, reference_grads, strict=True):
        assert torch.allclose(got.float().cpu(), want, atol=5e-2 * want.abs().max().item())


def test_varlen_attention_needs_packed_rows():
    q, k, v, _ = _packed_qkv("cpu", torch.float32)
    with pytest.raises(ValueError, match="packed rows"):
        varlen_attention(None, q, k, v, None)


@pytest.fixture
def flex_blocks():
    """``use_flex_block_size``, back to flex's default after the test."""
    yield use_flex_block_size
    use_flex_block_size(128)


@pytest.mark.parametrize("block", [64, 32])
def test_smaller_flex_mask_blocks_attend_as_the_default(flex_blocks, monkeypatch, block):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    flex = ALL_ATTENTION_FUNCTIONS["flex_attention"]
    seen = set()

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.add(attention_mask.BLOCK_SIZE)
        return flex(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "flex_attention", spy)
    model = _tiny_llama("flex_attention")
    pairs = [_example(range(3, 14), 4), _example(range(20, 29), 3), _example(range(30, 90), 5)]
    batch = collate_packed(pack_examples(pairs, row_len=ROW, pad_id=0))
    with torch.no_grad():
        default = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        one_document = model(input_ids=batch["input_ids"]).logits
        flex_blocks(block)
        smaller = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    assert seen == {(128, 128), (block, block)}
    assert torch.allclose(smaller, default, atol=1e-6)
    assert not torch.allclose(one_document, default, atol=1e-4)  # so the pairs' mask is what both kept


def test_flex_backward_tiles_are_offered_within_the_mask_blocks(flex_blocks, monkeypatch):
    from torch._inductor import config
    from torch._inductor.choices import InductorChoices
    from torch._inductor.template_heuristics.triton import FlexBwDConfig

    # torch's H100 default at head dim 64; it checks these against the mask's blocks before kernel_options apply.
    monkeypatch.setattr(
        InductorChoices, "get_flex_attention_bwd_configs", lambda *a, **k: [FlexBwDConfig(64, 128, 128, 64, 3, 8)]
    )
    flex_blocks(64)
    assert config.inductor_choices_class().get_flex_attention_bwd_configs(64, torch.bfloat16) == [
        FlexBwDConfig(64, 64, 64, 64, 3, 8)
    ]
    flex_blocks(128)
    assert config.inductor_choices_class is None


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the compiled flex_attention backward with tuned tiles is a GPU kernel"
)
def test_compiled_flex_on_64_token_blocks_equals_per_pair_sdpa(flex_blocks):
    from torch.nn.attention.flex_attention import flex_attention
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        and_masks,
        causal_mask_function,
        find_packed_sequence_indices,
        packed_sequence_mask_function,
    )

    q, k, v, positions = _packed_qkv("cuda", torch.bfloat16)
    documents = packed_sequence_mask_function(find_packed_sequence_indices(positions))
    flex_blocks(64)
    mask = ALL_MASK_ATTENTION_FUNCTIONS["flex_attention"](
        batch_size=2,
        q_length=256,
        kv_length=256,
        mask_function=and_masks(causal_mask_function, documents),
        device="cuda",
    )
    tiles = {
        "fwd_BLOCK_M": 64,
        "fwd_BLOCK_N": 64,
        "bwd_BLOCK_M1": 64,
        "bwd_BLOCK_N1": 64,
        "bwd_BLOCK_M2": 64,
        "bwd_BLOCK_N2": 64,
    }
    out = torch.compile(flex_attention)(q, k, v, block_mask=mask, scale=0.125, enable_gqa=True, kernel_options=tiles)
    assert mask.BLOCK_SIZE == (64, 64)
    _assert_per_pair_sdpa(out.transpose(1, 2), q, k, v, positions)
