"""An ASHA search on the real stack: early stopping, MLflow child runs and a best config later retrains can use."""

import json
import uuid

import pytest
from mlflow import MlflowClient

from deploy.registry import KIND_TAG
from schemas.events import RetrainRequest
from schemas.settings import Settings, with_overrides
from trainer import tracking
from trainer.data import steps_for_epochs
from trainer.registry import bootstrap
from trainer.retrain import effective_settings, steps_from_epochs
from trainer.tune import run_tune, search_space, trial_overrides

TINY_TRAIN = {
    "max_steps": 2, "checkpoint_every_steps": 1, "max_length": 64, "val_rows": 2, "replay_min_rows": 8,
    "warmup_steps": 0,
}  # fmt: skip


def test_trial_overrides_map_the_search_space():
    assert trial_overrides({"lr": 1e-3, "lora_r": 8, "alpha_per_r": 2, "micro_batch_size": 4}) == {
        "lr": 1e-3,
        "micro_batch_size": 4,
        "lora": {"r": 8, "alpha": 16},
    }


def test_search_space_draws_micro_batches_from_the_setting():
    from ray import tune

    assert search_space((8,))["micro_batch_size"].categories == [8]
    assert isinstance(search_space((2, 4), (1.0, 2.0))["epochs"], tune.search.sample.Categorical)
    assert "epochs" not in search_space((2, 4))


def test_epochs_become_max_steps_at_the_micro_batch():
    config = {"lr": 1e-3, "lora_r": 4, "alpha_per_r": 1, "micro_batch_size": 4, "epochs": 1.5}
    train = {**trial_overrides(config), "num_workers": 2, "gradient_accum": 1}
    # 100 items, 4 per rank and 2 ranks per step: 12.5 steps an epoch, 18.75 for 1.5 epochs.
    assert steps_from_epochs(with_overrides(Settings(), {"train": train}), items=100).train.max_steps == 19
    assert steps_from_epochs(Settings(), items=100).train.max_steps == Settings().train.max_steps  # no epochs set
    assert steps_for_epochs(3, 0.1, Settings().train, 1) == 1  # a run is never zero steps


@pytest.mark.integration
@pytest.mark.slow
def test_asha_stops_a_trial_early_and_writes_child_runs_and_a_usable_best_config(stack, tiny_model_dir, tmp_path):
    # Every trial is 2 or 4 steps (8 rows, micro batch 2, half or one epoch) with a report per step. ASHA's one rung
    # that can stop a trial is the first report (grace 1): a trial whose val_loss there is worse than the top quarter
    # of the trials before it stops after 1 step. One at a time, from seeded samples on a deterministic CPU run, the
    # trials reach that rung in the same order with the same losses every time, so the stop is not left to timing.
    tune = {"num_samples": 4, "max_steps": 2, "workers_per_trial": 1, "max_concurrent": 1, "epochs": [0.5, 1],
            "micro_batches": [2], "grace_checkpoints": 1}  # fmt: skip
    overrides = {"mlflow": {"registered_model": f"t-tune-{uuid.uuid4().hex[:8]}"}, "train": TINY_TRAIN, "tune": tune}
    settings = with_overrides(stack, overrides)
    bootstrap(settings, from_path=tiny_model_dir)

    search = run_tune(settings, snapshot_id=None, out=tmp_path / "best.json")
    best = search["train"]

    client = MlflowClient(settings.mlflow.tracking_uri)
    parents = client.search_runs(
        [tracking.experiment_id(settings)],
        filter_string=f"tags.`{KIND_TAG}` = 'tune'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    parent = parents[0]
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(children) == 4 and all(c.data.tags[KIND_TAG] == "tune-trial" for c in children)
    assert all("val_loss" in c.data.metrics for c in children)
    assert json.loads((tmp_path / "best.json").read_text()) == best
    assert {"lr", "micro_batch_size", "lora", "epochs"} == set(best) and best["epochs"] in (0.5, 1)
    # 8 replay rows on one worker at micro batch 2: an epoch is 4 steps.
    planned = [int(t["train"]["epochs"] * 8 // 2) for t in search["trials"]]
    assert sorted(int(c.data.params["max_steps"]) for c in children) == sorted(planned)
    assert all(t["val_loss"] is not None and t["error"] is None for t in search["trials"])
    stopped = [t for t, steps in zip(search["trials"], planned, strict=True) if t["steps"] < steps]
    assert stopped and all(t["steps"] == 1 for t in stopped), search["trials"]  # ASHA cut them at the first rung

    request = RetrainRequest(request_id="rr-x", reason="manual", watermark=0, overrides={"train": {"lr": 0.5}})
    tuned = effective_settings(
        with_overrides(settings, {"train": {"tuned_config": str(tmp_path / "best.json")}}), request
    )
    assert tuned.train.lora.r == best["lora"]["r"] and tuned.train.micro_batch_size == best["micro_batch_size"]
    assert tuned.train.lr == 0.5  # the request's own override wins over the tuned default
