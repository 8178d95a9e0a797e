"""GPU LoRA training throughput: the reference recipe against medretrain's fast path.

Each variant runs in its own process (a crashed kernel cannot poison the next) through the
trainer's own pieces: ``LoraFineTune`` under a Lightning Trainer, ``encode_pair``, packing,
``apply_speed_settings``. Model: the TinyLlama-1.1B shape, random init unless ``--weights``.
Data: the shipped MedQuAD train split tokenized with ``--tokenizer`` (ids folded into the
model's vocabulary), so row lengths follow the real distribution.

    python bench/train_gpu.py --tokenizer DIR --out $OUT/train_gpu.json
    python bench/train_gpu.py --tokenizer DIR --variants reference,fast --steps 20
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QV = ("q_proj", "v_proj")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FAST = {
    "precision": "bf16-true", "packing": True, "micro_batch_size": 8, "max_length": 2048,
    "attn_implementation": "flex_attention", "compile": True,
    # LoRA dropout copies every adapted layer's input (154 copies of up to 16k x 5632 here): off on the fast path.
    "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ALL_LINEAR},
}
FLEX_TUNED = {
    "fwd_BLOCK_M": 128,
    "fwd_BLOCK_N": 64,
    "fwd_num_warps": 4,
    "fwd_num_stages": 3,
    "bwd_BLOCK_M1": 64,
    "bwd_BLOCK_N1": 64,
    "bwd_BLOCK_M2": 64,
    "bwd_BLOCK_N2": 64,
    "bwd_num_warps": 4,
    "bwd_num_stages": 3,
}
"""flex_attention tiles: the fastest forward (0.52 against 0.97 ms a layer) and backward (1.97 against 2.17 ms) of
bench/attention.py's sweep on an H100."""
FLEX_64 = {"flex_kernel_options": {**FLEX_TUNED, "fwd_BLOCK_M": 64}, "flex_block_size": 64}
"""The same tiles on 64-token mask blocks (forward tiles of 64 queries to fit): a layer's attention 2.88 against 3.43 ms
at 24 rows in bench/attention.py on an H100."""
VARIANTS: dict[str, dict] = {
    # fp32 master weights + fp16 autocast, LoRA r8 on q/v, padded batches of 8 at <= 512 tokens, full logits.
    "reference": {
        "precision": "16-mixed",
        "packing": False,
        "micro_batch_size": 8,
        "max_length": 512,
        "attn_implementation": "sdpa",
        "compile": False,
        "loss_chunk_tokens": 1 << 30,
        "lora": {"r": 8, "alpha": 16, "target_modules": QV},
    },
    "fast": FAST,
    "fast_mb16": {**FAST, "micro_batch_size": 16},
    "fast_mb24": {**FAST, "micro_batch_size": 24},
    # Triton GEMM templates and kernel configs tuned at compile time: ~7 min of autotuning first.
    "fast_mb16_autotune": {**FAST, "micro_batch_size": 16, "compile_mode": "max-autotune-no-cudagraphs"},
    "fast_mb24_autotune": {**FAST, "micro_batch_size": 24, "compile_mode": "max-autotune-no-cudagraphs"},
    "fast_mb16_liger": {**FAST, "micro_batch_size": 16},
    # Same tokens per step as fast_mb16, in longer rows: fewer row ends to pad.
    "fast_len4096": {**FAST, "micro_batch_size": 8, "max_length": 4096},
    "fast_mb3": {**FAST, "micro_batch_size": 3},
    "fast_mb4": {**FAST, "micro_batch_size": 4},
    "fast_mb5": {**FAST, "micro_batch_size": 5},
    "fast_mb2": {**FAST, "micro_batch_size": 2},
    "fast_ckpt": {**FAST, "activation_checkpointing": "full"},
    # LoRA's product inside the frozen GEMM: no [tokens, out] LoRA output in memory.
    "fold_mb4": {**FAST, "micro_batch_size": 4, "fold_lora": True},
    "fold_mb16": {**FAST, "micro_batch_size": 16, "fold_lora": True},
    "fold_mb24": {**FAST, "micro_batch_size": 24, "fold_lora": True},
    "fold_mb24_autotune": {
        **FAST,
        "micro_batch_size": 24,
        "fold_lora": True,
        "compile_mode": "max-autotune-no-cudagraphs",
    },
    # Selective checkpointing: norms, RoPE and SiLU·mul recomputed in backward, GEMM and attention outputs kept.
    "fold_mb5_sel": {**FAST, "micro_batch_size": 5, "fold_lora": True, "activation_checkpointing": "selective"},
    "fold_mb6_sel": {**FAST, "micro_batch_size": 6, "fold_lora": True, "activation_checkpointing": "selective"},
    "fold_mb16_sel": {**FAST, "micro_batch_size": 16, "fold_lora": True, "activation_checkpointing": "selective"},
    "fold_mb6_sel_autotune": {
        **FAST,
        "micro_batch_size": 6,
        "fold_lora": True,
        "activation_checkpointing": "selective",
        "compile_mode": "max-autotune-no-cudagraphs",
    },
    # flex_attention with tuned tiles (FLEX_TUNED).
    "fold_mb16_flexopt": {**FAST, "micro_batch_size": 16, "fold_lora": True, "flex_kernel_options": FLEX_TUNED},
    "fold_mb24_flexopt": {**FAST, "micro_batch_size": 24, "fold_lora": True, "flex_kernel_options": FLEX_TUNED},
    "fold_mb6_sel_flexopt": {
        **FAST,
        "micro_batch_size": 6,
        "fold_lora": True,
        "activation_checkpointing": "selective",
        "flex_kernel_options": FLEX_TUNED,
    },
    "fold_mb24_flex64": {**FAST, "micro_batch_size": 24, "fold_lora": True, **FLEX_64},
    "fold_mb6_sel_flex64": {
        **FAST,
        "micro_batch_size": 6,
        "fold_lora": True,
        "activation_checkpointing": "selective",
        **FLEX_64,
    },
    # FlashAttention-2 per pair (torch.nn.attention.varlen) in place of flex_attention's block mask.
    "varlen_mb16": {**FAST, "micro_batch_size": 16, "attn_implementation": "varlen"},
    "varlen_mb24": {**FAST, "micro_batch_size": 24, "attn_implementation": "varlen"},
}
LIGER = {"fast_mb16_liger"}
"""Variants with liger-kernel's Triton RMSNorm, SwiGLU and RoPE (``pip install liger-kernel``; the loss stays the
trainer's
chunked CE). Measured slower than inductor's own fusions: docs/benchmarks.md."""
SMOKE_TRAIN = {"precision": "32-true", "compile": False, "max_length": 128}
"""--smoke settings: FlexAttention has no CPU backward, fp16 autocast no CPU kernels; the smoke run checks plumbing."""
NO_FLEX = {"attn_implementation": "sdpa", "flex_kernel_options": {}, "flex_block_size": 128}
SMOKE = {
    "vocab_size": 512,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
"""``--smoke``: a tiny model on the CPU, fp32, no compile: checks the bench's code path without a GPU."""
TINYLLAMA = {
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
}


def matmul_peak_tflops(n: int = 8192, iters: int = 50) -> float:
    """Measured dense bf16 matmul rate of this card: the MFU denominator."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - start) / 1e12


def build_batches(train, tokenizer_dir: Path, vocab: int, limit_rows: int | None):
    """Micro-batches in a fixed order, each with its count of real (non-padding) tokens."""
    import random

    from transformers import AutoTokenizer

    from trainer.data import collate, encode_pair
    from trainer.medquad import load_medquad
    from trainer.packing import Example, collate_packed, pack_examples

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    pairs = load_medquad("train")[:limit_rows]
    # Another tokenizer's ids, folded into the model's vocabulary: lengths are what matter here.
    encoded = (encode_pair(tokenizer, p, train.max_length) for p in pairs)
    examples = [
        Example([i % vocab for i in e.input_ids], [y if y < 0 else y % vocab for y in e.labels]) for e in encoded
    ]
    total_tokens = sum(len(e.input_ids) for e in examples)
    random.Random(0).shuffle(examples)
    size = train.micro_batch_size
    if train.packing:
        rows = pack_examples(examples, train.max_length, pad_id=0)
        random.Random(0).shuffle(rows)
        groups = [rows[i : i + size] for i in range(0, len(rows) - size + 1, size)]
        return [(collate_packed(g), sum(r.real_tokens for r in g)) for g in groups], total_tokens
    groups = [examples[i : i + size] for i in range(0, len(examples) - size + 1, size)]
    batches = [collate(list(enumerate(g)), pad_id=0) for g in groups]
    return [(b, int(b["attention_mask"].sum())) for b in batches], total_tokens


def build_model(train, weights: Path | None, smoke: bool, vocab_size: int | None = None):
    """TinyLlama-1.1B (random init in the training dtype, straight on the GPU) with the variant's LoRA adapter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.model import attach_lora, load_base
    from trainer.speed import apply_speed_settings

    dtype = torch.bfloat16 if train.precision == "bf16-true" else torch.float32
    if weights:
        model, _ = load_base(weights, dtype)
        model.cuda()
    else:
        torch.manual_seed(0)
        with torch.device("cpu" if smoke else "cuda"):
            shape = {**(SMOKE if smoke else TINYLLAMA), **({"vocab_size": vocab_size} if vocab_size else {})}
            model = LlamaForCausalLM(LlamaConfig(**shape)).to(dtype)
    matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    model = attach_lora(model, train.lora)
    return apply_speed_settings(model, train), matmul_params


def run_variant(name: str, args) -> dict:
    """Train ``args.warmup + args.steps`` steps of one variant; time the last ``args.steps``."""
    from torch.utils.data import DataLoader

    from schemas.settings import TrainSettings
    from trainer.module import LoraFineTune

    flex = VARIANTS[name]["attn_implementation"] == "flex_attention"  # varlen runs its per-pair CPU path
    overrides = {**SMOKE_TRAIN, **(NO_FLEX if flex else {})} if args.smoke else {}
    steps = {"max_steps": args.warmup + args.steps, "warmup_steps": 2}
    train = TrainSettings.model_validate({**VARIANTS[name], **overrides, **steps, "use_gpu": not args.smoke})
    if name in LIGER:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(
            rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
        )
    model, matmul_params = build_model(train, args.weights, args.smoke)
    batches, epoch_tokens = build_batches(train, args.tokenizer, model.config.vocab_size, args.limit_rows)
    batches = batches[: args.warmup + args.steps]
    clock = StepClock(args.warmup, [tokens for _, tokens in batches])
    trainer = L.Trainer(
        accelerator="cpu" if args.smoke else "gpu",
        devices=1,
        precision=train.precision,
        max_steps=train.max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )
    if args.profile:
        # Profiles the last 3 steps; their times are then inflated, so profile runs are reported apart.
        schedule = torch.profiler.schedule(wait=args.warmup + args.steps - 4, warmup=1, active=3)
        activity = (
            torch.profiler.ProfilerActivity.CUDA if torch.cuda.is_available() else torch.profiler.ProfilerActivity.CPU
        )
        clock.profiler = torch.profiler.profile(schedule=schedule, activities=[activity])
        clock.profiler.start()
    trainer.fit(LoraFineTune(model, train), train_dataloaders=DataLoader([b for b, _ in batches], batch_size=None))
    top_kernels = None
    if clock.profiler is not None:
        clock.profiler.stop()
        by = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        top_kernels = clock.profiler.key_averages().table(sort_by=by, row_limit=40)
    tokens_per_s = clock.tokens / clock.seconds
    return {
        "variant": name,
        "settings": train.model_dump(mode="json"),
        "steps_timed": args.steps,
        "tokens_per_s": tokens_per_s,
        "s_per_step": clock.seconds / args.steps,
        "peak_vram_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "tflops": 4 * matmul_params * tokens_per_s / 1e12,
        "matmul_params": matmul_params,
        "epoch_tokens": epoch_tokens,
        "projected_epoch_s": epoch_tokens / tokens_per_s,
        "final_loss": clock.last_loss,
        "profile": top_kernels,
    }


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepClock(L.Callback):
    """Wall time and real tokens of the steps after warm-up (compile, autotune)."""

    def __init__(self, warmup: int, tokens_per_batch: list[int]):
        self.warmup, self.tokens_per_batch = warmup, tokens_per_batch
        self.tokens, self.seconds, self.last_loss, self._start = 0, 0.0, None, 0.0
        self.profiler: torch.profiler.profile | None = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx >= self.warmup:
            _sync()
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.profiler is not None:
            self.profiler.step()
        if batch_idx >= self.warmup:
            _sync()
            self.seconds += time.perf_counter() - self._start
            self.tokens += self.tokens_per_batch[batch_idx]
        self.last_loss = float(outputs["loss"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, required=True, help="HF tokenizer folder (SmolLM2's by default)")
    parser.add_argument("--weights", type=Path, help="real TinyLlama weights folder (random init without)")
    parser.add_argument("--variants", default=",".join(v for v in VARIANTS if v not in LIGER))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--limit-rows", type=int, help="tokenize only this many train pairs (quick checks)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/train_gpu.json"))
    parser.add_argument("--profile", action="store_true", help="torch.profiler table of the last 3 steps")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: check the code path only")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_variant(args.child, args)), flush=True)
        return
    report = {
        "card": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "bf16_matmul_peak_tflops": None if args.smoke else matmul_peak_tflops(),
        "variants": [],
    }
    for name in args.variants.split(","):
        child = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--child", name], capture_output=True, text=True
        )
        lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
        result = json.loads(lines[-1][7:]) if lines else {"variant": name, "error": child.stderr[-3000:]}
        if "tflops" in result and report["bf16_matmul_peak_tflops"]:
            result["mfu"] = result["tflops"] / report["bf16_matmul_peak_tflops"]
        report["variants"].append(result)
        print(json.dumps(result), flush=True)
    ok = {v["variant"]: v for v in report["variants"] if "tokens_per_s" in v}
    if "reference" in ok:
        report["speedup_vs_reference"] = {k: v["tokens_per_s"] / ok["reference"]["tokens_per_s"] for k, v in ok.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "variants"}, indent=2))


if __name__ == "__main__":
    main()
