"""DDP scaling through the real Ray Train + Lightning path: 1 GPU against 2 GPUs of one machine.

Each run is a Ray Train ``TorchTrainer`` whose workers build the trainer's own Lightning
Trainer (``build_lightning_trainer``: RayDDPStrategy, RayLightningEnvironment,
RayTrainReportCallback, prepare_trainer) around ``LoraFineTune`` and ``RankData`` (packed
MedQuAD rows, per-rank sharding), with one of bench/train_gpu.py's variants (the fastest by
default). The model is the TinyLlama-1.1B shape with the tokenizer's vocabulary, random init
(no registry or S3 on a bare GPU box).
The 2-GPU run trains one full MedQuAD epoch.

    python bench/train_ray_gpu.py --tokenizer DIR --out $OUT/train_ray_gpu.json
    python bench/train_ray_gpu.py --tokenizer DIR --smoke      # CPU, tiny model: plumbing only
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_gpu import NO_FLEX, SMOKE_TRAIN, VARIANTS, _sync, build_model  # noqa: E402

SMOKE = {**SMOKE_TRAIN, **NO_FLEX, "micro_batch_size": 2}


class Clock(L.Callback):
    """Rank-local wall time of the steps after warm-up; token counts summed over ranks at the end."""

    def __init__(self, warmup: int):
        self.warmup, self.tokens, self.seconds, self._start = warmup, 0, 0.0, 0.0
        self.fit_started = 0.0
        self.summary: dict = {}

    def on_fit_start(self, trainer, module):
        self.fit_started = time.perf_counter()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step >= self.warmup:
            _sync()
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step > self.warmup:
            _sync()
            self.seconds += time.perf_counter() - self._start
            self.tokens += int(batch["num_tokens"])

    def on_train_end(self, trainer, module):
        tokens = float(trainer.strategy.reduce(torch.tensor(float(self.tokens), device=module.device), reduce_op="sum"))
        self.summary = {
            "world_size": trainer.world_size,
            "steps": trainer.global_step,
            "timed_steps": trainer.global_step - self.warmup,
            "tokens_per_s": tokens / self.seconds if self.seconds else None,
            "fit_s": time.perf_counter() - self.fit_started,
            "peak_vram_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        }


def worker(config: dict) -> None:
    """Ray Train per-worker function: the trainer's data module, module and Lightning Trainer."""
    from transformers import AutoTokenizer

    from schemas.settings import Settings
    from trainer.medquad import load_medquad
    from trainer.module import LoraFineTune, RankData
    from trainer.retrain import build_lightning_trainer

    settings = Settings.model_validate_json(config["settings"])
    tokenizer = AutoTokenizer.from_pretrained(config["tokenizer"])
    model, _ = build_model(settings.train, None, config["smoke"], vocab_size=len(tokenizer))
    rows = load_medquad("train")[: config["limit_rows"]]
    clock = Clock(config["warmup"])
    trainer = build_lightning_trainer(settings, None, True, extra_callbacks=[clock])
    trainer.fit(LoraFineTune(model, settings.train), datamodule=RankData(rows, rows[:16], tokenizer, settings.train))
    if trainer.is_global_zero:
        Path(config["out_file"]).write_text(json.dumps(clock.summary))


def epoch_steps(tokenizer_dir: Path, train, limit_rows: int | None, workers: int) -> int:
    """Optimizer steps for one pass over the packed MedQuAD train split on ``workers`` ranks."""
    from transformers import AutoTokenizer

    from trainer.data import encode_rows, pack_items
    from trainer.medquad import load_medquad

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    items = encode_rows(tokenizer, load_medquad("train")[:limit_rows], train.max_length)
    rows = len(pack_items(items, train.max_length, tokenizer.pad_token_id))
    return math.ceil(rows / (train.micro_batch_size * workers))


def run(workers: int, steps: int, args, settings) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out_file = Path(tempfile.mkdtemp()) / "summary.json"
    config = {
        "settings": settings.model_dump_json(),
        "tokenizer": str(args.tokenizer.resolve()),
        "smoke": args.smoke,
        "limit_rows": args.limit_rows,
        "warmup": args.warmup,
        "out_file": str(out_file),
    }
    started = time.perf_counter()
    TorchTrainer(
        worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=not args.smoke),
        run_config=RunConfig(name=f"bench-{workers}", storage_path=tempfile.mkdtemp()),
    ).fit()
    result = json.loads(out_file.read_text()) | {"ray_run_s": time.perf_counter() - started, "max_steps": steps}
    ray.shutdown()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument(
        "--one-gpu-steps", type=int, default=60, help="steps of the 1-GPU run (the 2-GPU run does an epoch)"
    )
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument(
        "--variant", default="fold_mb24_flex64", choices=VARIANTS, help="bench/train_gpu.py's variant to train"
    )
    parser.add_argument("--limit-rows", type=int)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench/results/train_ray_gpu.json"))
    args = parser.parse_args()
    import ray

    from schemas.settings import TrainSettings, load_settings, with_overrides

    base = load_settings()
    variant = {
        **VARIANTS[args.variant],
        **(SMOKE if args.smoke else {}),
        "use_gpu": not args.smoke,
        "checkpoint_every_steps": 50,
    }
    report = {
        "card": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "variant": args.variant,
        "at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "runs": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # The 2-GPU epoch first, and the report written after each run: a call cut short keeps what it measured.
    for workers in (2, 1):
        train = TrainSettings.model_validate({**variant, "num_workers": workers})
        steps = epoch_steps(args.tokenizer, train, args.limit_rows, 2) if workers == 2 else args.one_gpu_steps
        settings = with_overrides(
            base, {"train": {**train.model_dump(mode="json"), "max_steps": steps, "warmup_steps": 5}}
        )
        result = {"workers": workers, **run(workers, steps, args, settings)}
        report["runs"].append(result)
        print(json.dumps(result), flush=True)
        args.out.write_text(json.dumps(report, indent=2))
    two, one = (r["tokens_per_s"] for r in report["runs"])
    report["scaling_2_vs_1"] = two / one if one and two else None
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
