"""Model quality benchmark (issue 10): does a retrain make the medical QA model better?

    python bench/quality.py --out bench/results/quality_h100.json                  # GPU node, stack up
    python bench/quality.py --profile cpu-smoke --base-model DIR --out /tmp/q.json  # rehearsal on CPU

Everything runs through the product, against the stack the settings name:
1. ``model bootstrap``: v1 = the shipped SmolLM2-135M-Instruct, champion.
2. ``tune``: Ray Tune ASHA over lr, LoRA rank/alpha, micro batch and epochs on the MedQuAD
   training split; the best config becomes ``train.tuned_config`` of what follows.
3. Round 1: the accumulator and orchestrator run; a manual retrain request (MedQuAD training
   split as replay) goes through Ray Train, the evaluator gate against v1, and promotion.
4. Round 2, continual: the production split (MedQuAD documents held out of every other split)
   is published to Kafka; the threshold fires, the snapshot keeps its evaluation slice apart,
   the orchestrator retrains from the round-1 champion, and the gate decides with its
   forgetting guard (MedQuAD test) and the production slice.
5. v1 is also scored on round 2's production slice, so the table has every model on both sets.
The ``decoding`` stage (after round 1) compares greedy decoding with n-gram blocking
(``evaluate.no_repeat_ngram_size``) on v1 and the round-1 model; every round also keeps its Ray
job's log beside ``--out`` and where its job's time went (start-up, training, wrap-up).
Each model is scored by the evaluator on the same rows: teacher-forced loss on every pair of a set
(``evaluate.loss_rows`` null), greedy answers for a seeded sample. JSON goes to stdout and ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from schemas.settings import Settings, load_settings, with_overrides  # noqa: E402

log = logging.getLogger("bench.quality")

REPLAY_ALL = {"replay_min_rows": 1_000_000}
"""A replay floor above the MedQuAD training split's size: Tune and round 1 train on all of it."""

PROFILES: dict[str, dict[str, Any]] = {
    # One GPU: the fast path of bench/train_gpu.py on SmolLM2-135M.
    "gpu": {
        "train": {
            "use_gpu": True, "num_workers": 1, "cpus_per_worker": 4, "precision": "bf16-true", "packing": True,
            "attn_implementation": "flex_attention", "compile": True, "max_length": 2048, "micro_batch_size": 8,
            "epochs": 2, "warmup_steps": 20, "checkpoint_every_steps": 100, "val_rows": 128,
        },
        "evaluate": {"promotion": "auto", "sample_size": 500, "max_new_tokens": 256, "loss_rows": None,
                     "batch_size": 128},
        "trigger": {"threshold": 2000, "cooldown_s": 0},
        # Micro batch fixed at the throughput choice: trials then reuse compiled kernels of one shape.
        "tune": {"num_samples": 5, "micro_batches": [8], "epochs": [1, 2, 3], "max_concurrent": 1,
                 "workers_per_trial": 1,
                 "time_budget_s": 450},
    },
    # The same flow in minutes on two CPU cores with a tiny model: checks the plumbing, not quality.
    "cpu-smoke": {
        "train": {
            "num_workers": 1, "cpus_per_worker": 1, "max_length": 96, "micro_batch_size": 4, "epochs": 0.005,
            "warmup_steps": 0, "checkpoint_every_steps": 4, "val_rows": 4,
        },
        "evaluate": {"promotion": "auto", "sample_size": 3, "max_new_tokens": 4, "loss_rows": 8, "batch_size": 4},
        "trigger": {"threshold": 40, "cooldown_s": 0},
        "tune": {"num_samples": 2, "epochs": [0.002, 0.004], "max_concurrent": 1, "workers_per_trial": 1},
    },
}  # fmt: skip
TUNE_TRAIN = {"gpu": {"gpus_per_worker": 1.0}, "cpu-smoke": {}}
"""Trial workers' resources. One trial at a time: six sharing a GPU each compiled for minutes and barely trained."""
PRODUCTION_EVENTS = {"gpu": 2539, "cpu-smoke": 50}
"""The whole production split on GPU (threshold 2000 fires once)."""


STAGES = ("bootstrap", "tune", "round1", "decoding", "round2", "base_on_production")
NGRAM_BLOCKING = (0, 3, 4, 6)
"""``evaluate.no_repeat_ngram_size`` values the decoding stage compares (0 = plain greedy)."""


class Results:
    """Stage results kept in the output file as they finish: a rerun skips finished stages (a GPU call is 10 min)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"stages_s": {}}

    def stage(self, name: str, fn, *args):
        if name in self.data:
            log.info("stage %s: done before, skipped", name)
            return self.data[name]
        log.info("stage %s", name)
        started = time.monotonic()
        self.data[name] = fn(*args)
        self.data["stages_s"][name] = round(time.monotonic() - started, 1)
        self.save()
        log.info("stage %s done in %.1fs", name, self.data["stages_s"][name])
        return self.data[name]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2, default=str))


def job_time(settings: Settings, ray_job_id: str, run_id: str, log_path: Path) -> dict[str, float]:
    """Where the Ray job's time went, from Ray and the run's step metrics; its log is saved to ``log_path``."""
    from ray.job_submission import JobSubmissionClient

    from deploy.registry import mlflow_client as client
    from services.loop.timeline import training_window

    jobs = JobSubmissionClient(settings.ray.address)
    log_path.write_text(jobs.get_job_logs(ray_job_id))
    job = jobs.get_job_info(ray_job_id)
    first_step, last_step, steps = training_window(client(settings), run_id)
    return {
        "job_s": (job.end_time - job.start_time) / 1000,
        "before_first_step_s": first_step - job.start_time / 1000,
        "training_s": last_step - first_step,
        "after_last_step_s": job.end_time / 1000 - last_step,
        "steps": steps,
    }


def retrain_round(settings: Settings, start, timeout_s: float, log_path: Path) -> dict[str, Any]:
    """Wait for the retrain that ``start()`` sets off to reach a final phase: phases, verdict, training figures."""
    from evaluator.decision import read_decision
    from schemas.events import utcnow
    from services.loop.demo import FINAL_PHASES, wait_for_final
    from trainer.tracking import latest_metrics

    since = utcnow()
    start()
    seen = wait_for_final(settings, since, timeout_s, show=log.info)
    final = next(seen[p] for p in FINAL_PHASES if p in seen)
    if final.phase == "failed":
        raise RuntimeError(f"retrain {final.request_id} failed: {final.detail}")
    verdict, samples = read_decision(settings, final.run_id)
    return {
        "request_id": final.request_id,
        "run_id": final.run_id,
        "outcome": final.phase,
        "version": final.model_version,
        "phases": {phase: event.at.isoformat() for phase, event in seen.items()},
        "training_s": (seen["succeeded"].at - seen["started"].at).total_seconds(),
        "job_time": job_time(settings, seen["started"].ray_job_id, final.run_id, log_path),
        "evaluation_s": (final.at - seen["succeeded"].at).total_seconds(),
        "training_metrics": latest_metrics(settings, final.run_id),
        "verdict": verdict.model_dump(mode="json"),
        "examples": samples,
    }


def promote_without_production_slice(settings: Settings, round_: dict[str, Any]) -> str | None:
    """Round 1 has no production data, so the gate's production rule has no evidence and fails by design.

    An operator then promotes by review (``registry promote V --force --reason``); done here only when
    every failed rule is one without a value, i.e. nothing measured argued against the candidate.
    """
    from evaluator.promotion import promote

    if round_["outcome"] != "rejected":
        return None
    failed = [r for r in round_["verdict"]["rules"] if not r["passed"]]
    if any(r["value"] is not None for r in failed):
        log.warning("round 1 failed measured rules %s: not promoted", [r["name"] for r in failed])
        return None
    reason = f"MedQuAD-only round: no production slice for {', '.join(r['name'] for r in failed)}"
    promote(settings, round_["version"], actor="bench.quality", reason=reason, force=True)
    return reason


def decoding(settings: Settings, versions: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """Generation metrics on the MedQuAD sample per version and n-gram blocking (the loss does not depend on it)."""
    import torch

    from evaluator import inference, scoring
    from evaluator.evaluate import medquad_set
    from trainer.registry import load_resolved, resolve

    sample = medquad_set(settings).sample
    questions, references = [r.question for r in sample], [r.answer for r in sample]
    ev, out = settings.evaluate, {}
    for version in versions:
        model, tokenizer = load_resolved(resolve(settings, version), torch.float32)
        model.to("cuda" if torch.cuda.is_available() else "cpu")
        out[f"v{version}"] = {
            f"no_repeat_{n}": scoring.score_answers(
                inference.generate_answers(
                    model, tokenizer, questions, ev.max_new_tokens, ev.batch_size, f"v{version}", n
                ),
                references,
            )
            for n in NGRAM_BLOCKING
        }
    return out


def production_set(settings: Settings, run_id: str):
    """The production set a run's gate used: its snapshot's evaluation slice, in the gate's seeded order."""
    from evaluator.evaluate import build_eval_set, candidate_from_run
    from trainer.snapshot_reader import read_snapshot

    snapshot_id = candidate_from_run(settings, run_id).lineage.snapshot_id
    if not snapshot_id:
        raise RuntimeError(f"run {run_id} has no snapshot: its production slice is unknown")
    _, _, production = read_snapshot(settings, snapshot_id)
    return build_eval_set("production", production, settings)


def run(
    settings: Settings,
    profile: str,
    base_model: Path | None,
    timeout_s: float,
    results: Results,
    last: str,
    skip: list[str],
) -> None:
    from evaluator.evaluate import measure_version
    from services.loop.demo import start_services, unseen_events
    from services.store import create_schema, make_engine
    from services.stream import publisher
    from services.trigger.trigger import emit_manual
    from trainer.registry import bootstrap
    from trainer.tune import run_tune

    tuned = settings.stack.home / "tuned" / "quality_best_train.json"
    logs = results.path.parent
    tune_settings = with_overrides(settings, {"train": {**TUNE_TRAIN[profile], **REPLAY_ALL}})
    if "tune" not in skip:
        settings = with_overrides(settings, {"train": {"tuned_config": str(tuned)}})
    engine = make_engine(settings)
    create_schema(engine)  # the accumulator may not have created it yet

    def round1() -> dict[str, Any]:
        start_services(settings)
        overrides = {"train": REPLAY_ALL}
        emit = lambda: emit_manual(settings, "quality round 1: MedQuAD train split", overrides, "bench", engine)  # noqa: E731
        outcome = retrain_round(settings, emit, timeout_s, logs / "round1.job.log")
        return outcome | {"forced_promotion": promote_without_production_slice(settings, outcome)}

    def round2() -> dict[str, Any]:
        start_services(settings)
        events = unseen_events(settings, PRODUCTION_EVENTS[profile], seed=10)
        return retrain_round(settings, lambda: publisher.publish(settings, events), timeout_s, logs / "round2.job.log")

    def base_on_production() -> dict[str, float]:
        production = production_set(settings, results.data["round2"]["run_id"])
        return measure_version(settings, "1", [production]).metrics

    steps = {
        "bootstrap": lambda: bootstrap(settings, from_path=base_model),
        "tune": lambda: run_tune(tune_settings, None, tuned),  # its "train" is what the tuned config file holds
        "round1": round1,
        "decoding": lambda: decoding(settings, ["1", results.data["round1"]["version"]]),
        "round2": round2,
        "base_on_production": base_on_production,
    }
    results.data.update(benchmark="quality", profile=profile,
                        settings={k: settings.model_dump(mode="json")[k]
                                  for k in ("train", "evaluate", "trigger", "tune")})  # fmt: skip
    results.data["skipped"] = skip
    for name in STAGES[: STAGES.index(last) + 1]:
        if name not in skip:
            results.stage(name, steps[name])


def device() -> dict[str, Any]:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"gpu": gpu, "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="gpu")
    parser.add_argument("--base-model", type=Path, help="local HF checkpoint for v1 (default: the shipped SmolLM2)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds each round may take")
    parser.add_argument("--until", choices=STAGES, default=STAGES[-1], help="last stage to run now")
    parser.add_argument("--skip", action="append", default=[], choices=["tune", "decoding"],
                        help="without tune, the rounds train with the profile's own settings and the shipped "
                             "defaults")  # fmt: skip
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "quality.json",
                        help="results; stages already in it are skipped")  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = with_overrides(load_settings(), PROFILES[args.profile])
    results = Results(args.out)
    run(settings, args.profile, args.base_model, args.timeout, results, args.until, args.skip)
    results.data.update(device=device(), measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    results.save()
    print(json.dumps(results.data, indent=2, default=str))


if __name__ == "__main__":
    main()
