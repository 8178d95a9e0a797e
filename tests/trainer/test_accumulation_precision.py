"""Gradient accumulation and bf16 through the trainer's own module and data, on the CPU without Ray.

The Lightning Trainer here takes the settings the way ``trainer.retrain.build_lightning_trainer`` does
(``precision``, ``accumulate_grad_batches``, an epoch per checkpoint, no distributed sampler); that one
needs a Ray worker for its strategy, so these tests build the same Trainer without it.
"""

from pathlib import Path

import lightning as L
import pytest
import torch

from schemas.data import QAPair
from schemas.settings import LoraSettings, TrainSettings
from tests.trainer.fitting import cpu_trainer
from trainer.data import encode_rows
from trainer.model import attach_lora, load_base
from trainer.module import LoraFineTune, RankData
from trainer.packing import IGNORE

# One letter per row: every row is 44 tokens with 10 answer tokens, so no micro-batch pads and all weigh the same.
ROWS = [
    QAPair(question=f"What causes condition {c}?", answer=f"Condition {c} is caused by factor {c}.", source="t")
    for c in "ABCD"
]
LORA = LoraSettings(r=4, alpha=8, dropout=0.0)


class Recording(LoraFineTune):
    """The module as trained, recording each micro-batch's loss and the precision its forward ran in."""

    def __init__(self, model: torch.nn.Module, train: TrainSettings):
        super().__init__(model, train)
        self.losses: list[float] = []
        self.dtypes: set[tuple[torch.dtype, torch.dtype | None]] = set()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        self.dtypes.add((next(p for p in self.model.parameters() if p.requires_grad).dtype, autocast))
        self.losses.append(float(loss.detach()))
        return loss


class Gradients(L.Callback):
    """The LoRA gradients the optimizer is about to apply (after Lightning's accumulation)."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None})


def _fit(model_dir: Path, cfg: TrainSettings, callbacks=()) -> Recording:
    model, tokenizer = load_base(model_dir)
    torch.manual_seed(0)  # the same LoRA A in every run
    model = attach_lora(model, LORA)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero, which would leave every A gradient zero
            torch.nn.init.normal_(param, std=0.02)
    module = Recording(model, cfg)
    trainer = cpu_trainer(cfg, callbacks, precision=cfg.precision, accumulate_grad_batches=cfg.gradient_accum,
                          limit_val_batches=0)
    trainer.fit(module, datamodule=RankData(ROWS, ROWS[:2], tokenizer, cfg))
    return module


def test_accumulating_two_micro_batches_of_2_equals_one_of_4(tiny_model_dir: Path):
    """Lightning divides each micro-batch's loss by the accumulation count, so an accumulated step optimises the
    mean of micro-batch means. The loss is a token mean per micro-batch; with equal answer tokens per row that
    mean of means is the token mean of all 4 rows: exactly what one micro-batch of 4 optimises."""
    _, tokenizer = load_base(tiny_model_dir)
    answer_tokens = {sum(label != IGNORE for label in e.labels) for _, e in encode_rows(tokenizer, ROWS, 64)}
    assert answer_tokens == {10}, "rows must weigh the same for the two objectives to be equal"
    base = TrainSettings(max_steps=1, checkpoint_every_steps=1, max_length=64, warmup_steps=0, lr=1e-2, lora=LORA)
    whole, halves = Gradients(), Gradients()
    one = _fit(tiny_model_dir, base.model_copy(update={"micro_batch_size": 4, "gradient_accum": 1}), [whole])
    two = _fit(tiny_model_dir, base.model_copy(update={"micro_batch_size": 2, "gradient_accum": 2}), [halves])

    assert len(one.losses) == 1 and len(two.losses) == 2 and two.losses[0] != pytest.approx(two.losses[1])
    assert sum(two.losses) / 2 == pytest.approx(one.losses[0], rel=1e-6)
    assert len(whole.steps) == len(halves.steps) == 1  # one optimizer step each
    grads, accumulated = whole.steps[0], halves.steps[0]
    assert grads.keys() == accumulated.keys()
    assert any("lora_A" in n for n in grads) and any("lora_B" in n for n in grads)
    assert all(g.abs().max() > 0 for g in grads.values())  # A and B both receive gradient: the equality is not 0 == 0
    for name, grad in grads.items():
        torch.testing.assert_close(accumulated[name], grad, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_bf16_training_on_the_cpu_lowers_the_loss(tiny_model_dir: Path, precision: str):
    # 4 rows at micro-batch 4: every step sees the same rows, so the loss falls without sampling noise.
    cfg = TrainSettings(precision=precision, max_steps=8, checkpoint_every_steps=8, micro_batch_size=4, max_length=64,
                        warmup_steps=0, lr=2e-2, lora=LORA)
    module = _fit(tiny_model_dir, cfg)
    # bf16-true casts the weights to bf16; bf16-mixed keeps fp32 weights and runs forward under bf16 autocast.
    expected = (torch.bfloat16, None) if precision == "bf16-true" else (torch.float32, torch.bfloat16)
    assert module.dtypes == {expected}
    assert len(module.losses) == 8 and module.losses[-1] < module.losses[0] - 0.1, module.losses
