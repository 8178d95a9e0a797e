"""Document-masked causal attention on packed rows: flex_attention (the trainer's) against other kernels.

TinyLlama-1.1B's attention shape (32 query heads, 4 KV heads, head dim 64), bf16, forward and forward +
backward of one layer on micro-batches of the shipped MedQuAD packing (``bench/packed_segments.json``:
segment lengths of 64 packed 2048-token rows, SmolLM2 tokenizer). Candidates: compiled flex_attention
with the trainer's block mask, under its default kernel options, hand-picked forward and backward tiles,
kernel flags, max-autotune, the best forward and backward tiles found together, and the trainer's tuned
tiles on mask blocks smaller than flex's default 128 x 128; and, on the
flattened batch with one sequence per pair, FlashAttention-2 (``torch.nn.attention.varlen``) and cuDNN's
ragged attention (``aten._cudnn_attention_forward``). Every candidate's output is checked against
flex's. TFLOP/s counts the causal work inside pairs only. JSON to stdout and ``--out``.

    python bench/attention.py --batch 16 --out $OUT/attention.json
    python bench/attention.py --batch 24 --only 'flex$|flex_tuned'     # a subset, by name
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.train_gpu import FLEX_64, FLEX_TUNED  # noqa: E402
from trainer.flex_mask import use_flex_block_size  # noqa: E402

HERE = Path(__file__).parent
HEADS, KV_HEADS, DIM = 32, 4, 64
FWD_OPTIONS = {
    "fwd_m128_n64_w4_s3": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3},
    "fwd_m128_n64_w8_s3": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 8, "fwd_num_stages": 3},
    "fwd_m128_n128_w8_s3": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_warps": 8, "fwd_num_stages": 3},
    "fwd_m64_n64_w4_s3": {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3},
}
BWD_OPTIONS = {
    f"bwd_m{m}_n{n}_w{w}_s{s}": {
        "bwd_BLOCK_M1": m,
        "bwd_BLOCK_N1": n,
        "bwd_BLOCK_M2": n,
        "bwd_BLOCK_N2": m,
        "bwd_num_warps": w,
        "bwd_num_stages": s,
    }
    for m, n, w, s in (
        (64, 128, 8, 3),
        (64, 128, 4, 3),
        (32, 128, 4, 3),
        (64, 64, 4, 3),
        (64, 128, 8, 2),
        (32, 64, 4, 4),
    )
}
FLAGS = {
    "flex_rows_safe": {"ROWS_GUARANTEED_SAFE": True},  # every query sees itself
    "flex_blocks_contiguous": {"BLOCKS_ARE_CONTIGUOUS": True},
    "flex_prescale_qk": {"PRESCALE_QK": True},
}
"""Two promises about the mask that let the kernels skip checks (together they gave NaNs on an H100), and
Q·Kᵀ pre-scaled, which trades accuracy for speed."""
TILES_64 = FLEX_64["flex_kernel_options"]
TILES_32 = {k: 32 if "BLOCK" in k else v for k, v in FLEX_TUNED.items()}
MASK_BLOCKS = {
    "flex_tuned": ((128, 128), FLEX_TUNED),
    "flex_tuned_mask128x64": ((128, 64), FLEX_TUNED),
    "flex_tuned_mask64": ((64, 64), TILES_64),
    "flex_mask64_bwd_m32": ((64, 64), {**TILES_64, "bwd_BLOCK_M1": 32, "bwd_BLOCK_N2": 32}),
    "flex_mask64_bwd_w8": ((64, 64), {**TILES_64, "bwd_num_warps": 8}),
    "flex_mask64_bwd_s2": ((64, 64), {**TILES_64, "bwd_num_stages": 2}),
    "flex_mask64_fwd_w8": ((64, 64), {**TILES_64, "fwd_num_warps": 8}),
    "flex_mask32": ((32, 32), TILES_32),
}
"""The trainer's tuned tiles on mask blocks of (query, key) tokens: smaller blocks skip more of the area outside
the pairs (~58% more than the pairs' causal area is computed at 128 x 128 on the shipped packing, ~28% at 64 x 64).
A kernel's tiles must divide the mask's blocks (``use_flex_block_size`` lets torch's backward take such tiles)."""


def timed(fn: Callable[[], object], iters: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--only", help="regular expression: time only the candidates whose names it matches")
    args = parser.parse_args()
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    packed = json.loads((HERE / "packed_segments.json").read_text())
    rows, row_len = packed["rows"][: args.batch], packed["row_len"]
    dev = "cuda"
    doc = torch.tensor([[i for i, n in enumerate(r) for _ in range(n)] for r in rows], device=dev)
    lengths = [n for r in rows for n in r]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=dev, dtype=torch.int32)
    b, total, longest = len(rows), len(rows) * row_len, max(lengths)
    # Causal within each pair: QK^T and PV, 2 FLOPs a multiply-add; backward does 2.5x forward's work.
    forward_flop = sum(n * (n + 1) / 2 for n in lengths) * HEADS * DIM * 4

    def leaf(*shape):
        return torch.randn(*shape, device=dev, dtype=torch.bfloat16, requires_grad=True)

    q, k, v = leaf(b, HEADS, row_len, DIM), leaf(b, KV_HEADS, row_len, DIM), leaf(b, KV_HEADS, row_len, DIM)
    grad = torch.randn(b, HEADS, row_len, DIM, device=dev, dtype=torch.bfloat16)

    def document_mask(block_size) -> object:
        return create_block_mask(
            lambda bi, h, qi, ki: (qi >= ki) & (doc[bi, qi] == doc[bi, ki]),
            b,
            None,
            row_len,
            row_len,
            BLOCK_SIZE=block_size,
        )

    mask = document_mask(128)

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).reshape(total, t.shape[1], DIM)

    # The flattened layout the varlen kernels take; K/V also with their heads repeated for kernels without GQA.
    qv, kv, vv = (flat(t.detach()).contiguous().requires_grad_() for t in (q, k, v))
    kr, vr = (t.detach().repeat_interleave(HEADS // KV_HEADS, 1).requires_grad_() for t in (kv, vv))
    flat_grad = flat(grad).contiguous()

    def flex_call(compiled, options=None, block_mask=mask):
        return (lambda: compiled(q, k, v, block_mask=block_mask, enable_gqa=True, kernel_options=options)), grad, flat

    # One compiled flex per option set and grad mode: more graphs than dynamo's default limit of 8.
    torch._dynamo.config.recompile_limit = 256
    flex_options = {"flex": None, **FWD_OPTIONS, **BWD_OPTIONS, **FLAGS}
    candidates = {name: flex_call(torch.compile(flex_attention), options) for name, options in flex_options.items()}
    candidates["flex_autotune"] = flex_call(torch.compile(flex_attention, mode="max-autotune-no-cudagraphs"))
    for name, (block_size, options) in MASK_BLOCKS.items():
        candidates[name] = flex_call(torch.compile(flex_attention), options, document_mask(block_size))

    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    candidates["fa2_varlen"] = (lambda: varlen_attn(qv, kr, vr, cu, cu, longest, longest, **causal)), flat_grad, None

    def cudnn(key, value):
        return torch.ops.aten._cudnn_attention_forward(
            qv, key, value, None, cu, cu, longest, longest, True, 0.0, True, False
        )[0]

    candidates["cudnn_ragged"] = (lambda: cudnn(kr, vr)), flat_grad, None
    candidates["cudnn_ragged_gqa"] = (lambda: cudnn(kv, vv)), flat_grad, None

    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "cudnn": torch.backends.cudnn.version(),
               "batch": b, "row_len": row_len, "segments": len(lengths), "mean_segment": total / len(lengths),
               "forward_gflop": forward_flop / 1e9, "kernels": {}}  # fmt: skip
    with torch.no_grad():
        reference = flat(candidates["flex"][0]()).float()

    def measure(name: str, call, out_grad: torch.Tensor, to_flat) -> None:
        try:
            with torch.no_grad():
                out = call()
                diff = ((to_flat(out) if to_flat else out).float() - reference).abs().max().item()
                forward_ms = timed(call, args.iters)
            both_ms = timed(lambda: call().backward(out_grad), args.iters)
        except Exception as e:  # noqa: BLE001 - reported, not hidden: a kernel may not exist for this card or build
            results["kernels"][name] = f"failed: {type(e).__name__}: {str(e)[:300]}"
            return
        results["kernels"][name] = {
            "max_abs_diff_vs_flex": diff, "forward_ms": forward_ms, "forward_backward_ms": both_ms,
            "forward_tflops": forward_flop / forward_ms / 1e9,
            "forward_backward_tflops": 3.5 * forward_flop / both_ms / 1e9,
        }  # fmt: skip
        print(name, json.dumps(results["kernels"][name]), flush=True)

    for name, candidate in candidates.items():
        if args.only and not re.search(args.only, name):
            continue
        if name in MASK_BLOCKS:
            use_flex_block_size(min(MASK_BLOCKS[name][0]))
        measure(name, *candidate)
    if not args.only:  # The best forward and the best backward tiles of the full sweep, together.
        timings = {name: r for name, r in results["kernels"].items() if isinstance(r, dict) and name in flex_options}
        best_fwd = min((n for n in timings if n == "flex" or n in FWD_OPTIONS), key=lambda n: timings[n]["forward_ms"])
        best_bwd = min(
            (n for n in timings if n == "flex" or n in BWD_OPTIONS),
            key=lambda n: timings[n]["forward_backward_ms"] - timings[n]["forward_ms"],
        )
        best = {**(flex_options[best_fwd] or {}), **(flex_options[best_bwd] or {})}
        results["flex_best_options"] = best
        measure("flex_best", *flex_call(torch.compile(flex_attention), best))
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
