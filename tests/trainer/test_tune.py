"""A 2-trial ASHA search on the real stack: two MLflow child runs and a best config later retrains can use."""

import json
import uuid

import pytest
from mlflow import MlflowClient

from schemas.events import RetrainRequest
from schemas.settings import with_overrides
from trainer import tracking
from trainer.registry import bootstrap
from trainer.retrain import effective_settings
from trainer.tune import run_tune, trial_overrides

TINY_TRAIN = {
    "max_steps": 2, "checkpoint_every_steps": 1, "max_length": 64, "val_rows": 2, "replay_min_rows": 32,
    "warmup_steps": 0,
}  # fmt: skip


def test_trial_overrides_map_the_search_space():
    assert trial_overrides({"lr": 1e-3, "lora_r": 8, "alpha_per_r": 2, "micro_batch_size": 4}) == {
        "lr": 1e-3,
        "micro_batch_size": 4,
        "lora": {"r": 8, "alpha": 16},
    }


@pytest.mark.integration
@pytest.mark.slow
def test_two_trials_write_child_runs_and_a_usable_best_config(stack, tiny_model_dir, tmp_path):
    tune = {"num_samples": 2, "max_steps": 2, "workers_per_trial": 1, "max_concurrent": 1}
    overrides = {"mlflow": {"registered_model": f"t-tune-{uuid.uuid4().hex[:8]}"}, "train": TINY_TRAIN, "tune": tune}
    settings = with_overrides(stack, overrides)
    bootstrap(settings, from_path=tiny_model_dir)

    best = run_tune(settings, snapshot_id=None, out=tmp_path / "best.json")

    client = MlflowClient(settings.mlflow.tracking_uri)
    parents = client.search_runs(
        [tracking.experiment_id(settings)], filter_string=f"tags.`{tracking.KIND_TAG}` = 'tune'", order_by=["attributes.start_time DESC"], max_results=1
    )
    parent = parents[0]
    children = client.search_runs([parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 2 and all(c.data.tags[tracking.KIND_TAG] == "tune-trial" for c in children)
    assert all("val_loss" in c.data.metrics for c in children)
    assert json.loads((tmp_path / "best.json").read_text()) == best
    assert {"lr", "micro_batch_size", "lora"} == set(best)

    request = RetrainRequest(request_id="rr-x", reason="manual", watermark=0, overrides={"train": {"lr": 0.5}})
    tuned = effective_settings(with_overrides(settings, {"train": {"tuned_config": str(tmp_path / "best.json")}}), request)
    assert tuned.train.lora.r == best["lora"]["r"] and tuned.train.micro_batch_size == best["micro_batch_size"]
    assert tuned.train.lr == 0.5  # the request's own override wins over the tuned default
