"""The S3 caches of a retrain: tokenized MedQuAD rows and torch.compile's kernels.

Same key: a hit with the same items as without the cache. Changed key: a miss. Damaged entry: rebuilt.
"""

import gzip
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import lightning as L
import pytest
import torch

from deploy.cache import BlobCache, purge
from schemas.data import QAPair
from schemas.settings import LoraSettings, TrainSettings, with_overrides
from tests.trainer.fitting import cpu_trainer
from trainer import item_cache
from trainer.compile_cache import CompileCache, compile_key
from trainer.data import collate_packed_items, training_items
from trainer.loss import answer_loss
from trainer.model import attach_lora, load_base
from trainer.module import LoraFineTune, RankData

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MEDQUAD = [QAPair(question=f"What is disease {i}?", answer=f"Disease {i} is rare, of organ {i % 5}.", source="m")
           for i in range(20)]  # fmt: skip
PRODUCTION = [QAPair(question=f"How is case {i} treated?", answer=f"Case {i} is treated with rest.", source="p",
                     event_id=str(uuid.uuid4())) for i in range(6)]  # fmt: skip
CFG = TrainSettings(packing=True, max_length=64, micro_batch_size=2)


@pytest.fixture
def settings(stack):
    """A cache prefix of this test's own, purged afterwards."""
    settings = with_overrides(stack, {"s3": {"cache_prefix": f"test-cache-{uuid.uuid4().hex[:8]}"}})
    yield settings
    purge(settings)


def _encoder(settings) -> item_cache.CachedEncoder:
    encoder = item_cache.item_encoder(settings, write=True)
    assert isinstance(encoder, item_cache.CachedEncoder)
    return encoder


def test_cached_items_are_the_plain_items_and_a_new_process_reads_them(settings, tiny_model_dir):
    model, tokenizer = load_base(tiny_model_dir)
    rows = [*PRODUCTION, *MEDQUAD]
    plain = training_items(tokenizer, rows, CFG)
    first = training_items(tokenizer, rows, CFG, _encoder(settings))
    encoder = _encoder(settings)  # a fresh encoder reads S3, as the next retrain's workers do
    second = training_items(tokenizer, rows, CFG, encoder)
    assert first == plain and second == plain
    assert encoder.stats == {"cached": len(MEDQUAD), "encoded": len(PRODUCTION)}  # production rows are never cached
    batch = lambda items: collate_packed_items(items[:2])  # noqa: E731
    assert answer_loss(model, batch(second)).item() == answer_loss(model, batch(plain)).item()


def test_another_max_length_tokenizer_or_encoding_code_is_a_miss(settings, tiny_model_dir, monkeypatch):
    _, tokenizer = load_base(tiny_model_dir)
    _encoder(settings)(tokenizer, MEDQUAD, 64)
    assert _miss(settings, tokenizer, 48)
    tokenizer.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    assert _miss(settings, tokenizer, 64)
    _, tokenizer = load_base(tiny_model_dir)
    assert not _miss(settings, tokenizer, 64)
    monkeypatch.setattr(item_cache.data, "SYSTEM_PROMPT", "Another system prompt.")
    assert _miss(settings, tokenizer, 64)


def _miss(settings, tokenizer, max_length: int) -> bool:
    encoder = _encoder(settings)
    encoder(tokenizer, MEDQUAD, max_length)
    return encoder.stats["cached"] == 0


@pytest.mark.parametrize("damage", ["bytes", "content"])
def test_a_damaged_entry_is_rebuilt_not_used(settings, tiny_model_dir, damage):
    _, tokenizer = load_base(tiny_model_dir)
    plain = _encoder(settings)(tokenizer, MEDQUAD, 64)
    cache = BlobCache.open(settings, item_cache.KIND)
    key = item_cache.encoding_key(tokenizer, 64)
    if damage == "bytes":  # a torn write: the body no longer matches its checksum
        body = cache.get(key)
        cache.client.put_object(Bucket=cache.bucket, Key=cache._name(key), Body=body[: len(body) // 2],
                                Metadata={"sha256": "0" * 64})  # fmt: skip
    else:  # intact bytes that decode to wrong encodings
        rows = {item_cache.row_digest(r): [0, 1, 2] for r in MEDQUAD}
        cache.put(key, gzip.compress(json.dumps({"key": "another key", "rows": rows}).encode()))
    encoder = _encoder(settings)
    assert encoder(tokenizer, MEDQUAD, 64) == plain
    assert encoder.stats == {"cached": 0, "encoded": len(MEDQUAD)}
    assert _encoder(settings)(tokenizer, MEDQUAD, 64) == plain  # rewritten whole


def test_the_cache_keeps_to_its_bound_dropping_the_oldest(settings):
    cache = BlobCache.open(settings, "bound")
    cache.max_bytes = 2500
    for name in ("a", "b", "c"):
        cache.put(name, os.urandom(1000))
    assert cache.get("a") is None and cache.get("b") is not None and cache.get("c") is not None
    assert purge(settings) == 2 and cache.get("c") is None


def test_compile_key_changes_with_torch_shape_and_graph_settings(monkeypatch):
    config = {"hidden_size": 32, "num_hidden_layers": 2, "_name_or_path": "/tmp/a"}
    key = compile_key(CFG, config, "cpu")
    assert compile_key(CFG, config | {"_name_or_path": "/tmp/b"}, "cpu") == key  # where it was loaded from is no input
    assert compile_key(CFG, config | {"hidden_size": 64}, "cpu") != key
    assert compile_key(CFG.model_copy(update={"micro_batch_size": 4}), config, "cpu") != key
    assert compile_key(CFG.model_copy(update={"lr": 1e-3}), config, "cpu") == key  # the lr is not in the graph
    assert compile_key(CFG, config, "NVIDIA H100 80GB HBM3") != key
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    assert compile_key(CFG, config, "cpu") != key


COMPILE_AND_CACHE = """
import json, sys, torch
from deploy.cache import BlobCache
from schemas.settings import Settings
from trainer.compile_cache import CompileCache
settings = Settings.model_validate_json(sys.argv[1])
cache = CompileCache(BlobCache.open(settings, "compile"), sys.argv[2])
hit = cache.restore()
out = torch.compile(lambda x: torch.sin(x) * 2 + 1)(torch.arange(8.0))
if not hit:
    cache.save()
counters = torch._dynamo.utils.counters["inductor"]
print(json.dumps({"hit": hit, "fx_hits": counters["fxgraph_cache_hit"], "out": out.tolist()}))
"""


def _compile_in_a_fresh_process(settings, key: str, tmp_path: Path) -> dict:
    # A fresh inductor cache directory each time: a hit can only come from the S3 entry.
    env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / uuid.uuid4().hex), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", COMPILE_AND_CACHE, settings.model_dump_json(), key], env=env,
                          capture_output=True, text=True, timeout=600, check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_compiled_kernels_come_back_from_s3_in_a_new_process(settings, tmp_path):
    """Inductor on the CPU: about a minute per fresh process on an idle 2-core host."""
    first = _compile_in_a_fresh_process(settings, "k1", tmp_path)
    second = _compile_in_a_fresh_process(settings, "k1", tmp_path)
    assert (first["hit"], second["hit"]) == (False, True)
    assert first["fx_hits"] == 0 and second["fx_hits"] >= 1  # the graph came from the S3 entry, not compiled again
    assert first["out"] == second["out"]
    cache = BlobCache.open(settings, "compile")
    assert CompileCache(cache, "k2").restore() is False  # another key: a miss
    cache.put("k1", b"not a cache")  # a sound checksum over bytes torch cannot read
    damaged = _compile_in_a_fresh_process(settings, "k1", tmp_path)
    assert damaged["hit"] is False and damaged["out"] == first["out"]
    assert cache.get("k1") != b"not a cache"  # replaced by the rebuilt kernels


class Losses(L.Callback):
    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(outputs["loss"]))


def _losses(model_dir: Path, encode) -> list[float]:
    torch.manual_seed(0)
    model, tokenizer = load_base(model_dir)
    cfg = CFG.model_copy(update={"max_steps": 4, "checkpoint_every_steps": 2, "warmup_steps": 1, "lr": 5e-3})
    losses = Losses()
    trainer = cpu_trainer(cfg, [losses])
    module = LoraFineTune(attach_lora(model, LoraSettings(r=4, alpha=8)), cfg)
    trainer.fit(module, datamodule=RankData([*PRODUCTION, *MEDQUAD], MEDQUAD[:4], tokenizer, cfg, encode=encode))
    return losses.values


def test_a_fit_through_the_cache_has_the_losses_of_a_plain_fit(settings, tiny_model_dir):
    plain = _losses(tiny_model_dir, None)
    _losses(tiny_model_dir, _encoder(settings))  # fills the cache
    encoder = _encoder(settings)
    assert _losses(tiny_model_dir, encoder) == plain and len(plain) == 4
    assert encoder.stats["cached"] == len(MEDQUAD) + 4  # training and validation MedQuAD rows came from S3
