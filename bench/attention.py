"""Document-masked causal attention on packed rows: flex_attention (the trainer's) against varlen flash attention.

TinyLlama-1.1B's attention shape (32 query heads, 4 KV heads, head dim 64), bf16, forward + backward of
one layer on micro-batches of the shipped MedQuAD packing (``bench/packed_segments.json``: segment lengths of
64 packed 2048-token rows, SmolLM2 tokenizer). JSON to stdout and ``--out``.

    python bench/attention.py --batch 16 --out $OUT/attention.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent


def timed(fn, iters: int) -> float:
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
    args = parser.parse_args()
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    packed = json.loads((HERE / "packed_segments.json").read_text())
    rows, row_len = packed["rows"][: args.batch], packed["row_len"]
    heads, kv_heads, dim, dev = 32, 4, 64, "cuda"
    doc = torch.tensor([[i for i, n in enumerate(r) for _ in range(n)] for r in rows], device=dev)
    lengths = [n for r in rows for n in r]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=dev, dtype=torch.int32)
    b, total = len(rows), len(rows) * row_len

    def leaf(*shape):
        return torch.randn(*shape, device=dev, dtype=torch.bfloat16, requires_grad=True)

    q, k, v = leaf(b, heads, row_len, dim), leaf(b, kv_heads, row_len, dim), leaf(b, kv_heads, row_len, dim)
    grad = torch.randn(b, heads, row_len, dim, device=dev, dtype=torch.bfloat16)
    mask = create_block_mask(lambda bi, h, qi, ki: (qi >= ki) & (doc[bi, qi] == doc[bi, ki]), b, None, row_len, row_len)
    compiled = torch.compile(flex_attention)

    def flex():
        return compiled(q, k, v, block_mask=mask, enable_gqa=True)

    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "batch": b, "row_len": row_len,
               "segments": len(lengths), "mean_segment": total / len(lengths)}  # fmt: skip
    results["flex_ms"] = timed(lambda: flex().backward(grad), args.iters)

    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as e:
        results["varlen"] = f"unavailable: {e}"
    else:
        signature = inspect.signature(varlen_attn)
        params = signature.parameters
        results["varlen_signature"] = str(signature)
        causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
        qv, kv_, vv = (t.detach().transpose(1, 2).reshape(total, -1, dim).contiguous().requires_grad_() for t in (q, k, v))
        # GQA by repeating K/V heads where the kernel takes no enable_gqa.
        gqa = {"enable_gqa": True} if "enable_gqa" in params else {}
        kr, vr = (kv_, vv) if gqa else (kv_.repeat_interleave(heads // kv_heads, 1), vv.repeat_interleave(heads // kv_heads, 1))
        gv = grad.transpose(1, 2).reshape(total, heads, dim)

        def varlen():
            return varlen_attn(qv, kr, vr, cu, cu, max(lengths), max(lengths), **causal, **gqa)

        try:
            with torch.no_grad():  # same attention as the flex mask?
                reference = flex().transpose(1, 2).reshape(total, heads, dim)
                results["max_abs_diff_vs_flex"] = (varlen().float() - reference.float()).abs().max().item()
            results["varlen_ms"] = timed(lambda: varlen().backward(gv), args.iters)
        except Exception as e:  # noqa: BLE001 - reported, not hidden: the kernel may not exist for this card or build
            results["varlen"] = f"failed: {type(e).__name__}: {e}"
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
