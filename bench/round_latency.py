"""Round latency (issue 28): how long after the threshold is crossed the improved model is champion (and serving).

    python bench/round_latency.py                                   # GPU node, stack up: 2,500 events a round
    python bench/round_latency.py --profile cpu --tiny --events 60  # this 2-core machine, a tiny random model
    python bench/round_latency.py --serve                           # also start the answer service, time its swap
    python bench/round_latency.py --answers-url http://127.0.0.1:18100   # or wait on one already running

Everything runs through the product: the embedded stack, a registered base model as champion, the
accumulator and orchestrator (and with ``--serve`` the answer service) as their own processes
(``medretrain serve``), events published to Kafka. A first round (MedQuAD training-split pairs published
as production events) warms the stack and the Ray cluster and gives the cold figure; the measured round
publishes ``--events`` pairs of the production split, which cross the threshold. Each round's stages are
read back from the store, Ray and MLflow (``services/loop/timeline.py``), never from this script's clock;
the swap is the answer service's first answer by the new version. ``--isolate`` (default) gives the run its
own topics, database, buckets, registered model and experiment, so it can share a stack.
Writes ``bench/results/round_latency_<card>.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quality import PROFILES as QUALITY  # noqa: E402 - bench/ is the script's folder: one GPU fast path for both benches

from schemas.settings import Settings, load_settings, with_overrides  # noqa: E402

log = logging.getLogger("bench.round_latency")

PROFILES: dict[str, dict[str, Any]] = {
    # One GPU: the shipped fast path (bench/quality.py's gpu profile), two epochs over the round's rows.
    "gpu": {"train": QUALITY["gpu"]["train"], "evaluate": QUALITY["gpu"]["evaluate"], "trigger": {"cooldown_s": 0}},
    # Two shared CPU cores: the demo's shape (two Ray workers) at a size that measures the overheads.
    "cpu": {
        "train": {
            "num_workers": 2, "cpus_per_worker": 0.5, "max_length": 96, "micro_batch_size": 2, "max_steps": 8,
            "warmup_steps": 1, "checkpoint_every_steps": 4, "val_rows": 4, "replay_min_rows": 16,
        },
        "evaluate": {"promotion": "auto", "sample_size": 4, "max_new_tokens": 8, "loss_rows": 8, "batch_size": 4},
        "trigger": {"cooldown_s": 0},
    },
}  # fmt: skip
DEFAULT_EVENTS = {"gpu": 2500, "cpu": 60}
LENIENT_RULES = {"schema_version": 1, "rules": [
    # A tiny random model's answers say nothing; any trained candidate passes, so the round reaches the promotion.
    {"name": "degenerate_bounded", "metric": "medquad.degenerate_rate", "kind": "value", "op": "<=", "threshold": 1.0},
]}
SERVICES = ("accumulator", "orchestrator")
SETTINGS_KEPT = ("train", "evaluate", "trigger", "orchestrator", "s3")


def isolated(settings: Settings) -> Settings:
    """Own topics, consumer groups, database, buckets, registered model and experiment (a uuid suffix)."""
    from sqlalchemy import make_url

    from deploy.clients import database_url

    suffix = uuid.uuid4().hex[:8]
    url = database_url(settings)
    if url.startswith("postgresql"):
        url = make_url(url).set(database=f"medretrain_rl_{suffix}").render_as_string(hide_password=False)
    else:
        url = f"sqlite:///{settings.stack.home / f'round_latency_{suffix}.db'}"
    k = settings.kafka
    return with_overrides(settings, {
        "kafka": {"events_topic": f"{k.events_topic}.rl{suffix}", "dlq_topic": f"{k.dlq_topic}.rl{suffix}",
                  "requests_topic": f"{k.requests_topic}.rl{suffix}", "status_topic": f"{k.status_topic}.rl{suffix}",
                  "accumulator_group": f"rl-acc-{suffix}", "orchestrator_group": f"rl-orch-{suffix}"},
        "database": {"url": url},
        "s3": {"checkpoints_bucket": f"rl-checkpoints-{suffix}", "datasets_bucket": f"rl-datasets-{suffix}"},
        "mlflow": {"registered_model": f"rl-{suffix}", "experiment": f"round-latency-{suffix}"},
    })  # fmt: skip


def start_services(settings: Settings, logs: Path, names: tuple[str, ...]) -> list[subprocess.Popen]:
    """``medretrain serve <name>`` for each of ``names`` with this run's settings, each in its own process."""
    from deploy.ray_env import settings_env

    env = os.environ | settings_env(settings, secrets=True)  # every setting as MEDRETRAIN_* variables (the store too)
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for name in names:
        with (logs / f"{name}.log").open("ab") as out:
            procs.append(subprocess.Popen([sys.executable, "-m", "services", "serve", name], cwd=REPO, env=env,
                                          stdout=out, stderr=subprocess.STDOUT))
    return procs


def stop_services(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def split_events(split: str, n: int, seed: int) -> list:
    """``n`` seeded MedQuAD pairs of ``split`` as production events (ids derived as the publisher does)."""
    import random

    from schemas.events import QAEvent
    from services.stream.publisher import derive_event_id
    from trainer.medquad import load_medquad

    pairs = random.Random(seed).sample(load_medquad(split), n)
    return [QAEvent(event_id=derive_event_id(p.question, p.answer), question=p.question, answer=p.answer,
                    source=p.source, qtype=p.qtype, focus=p.focus) for p in pairs]  # fmt: skip


def wait_ready(url: str, timeout_s: float) -> None:
    """Until the answer service's ``/v1/readyz`` says a champion is loaded."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v1/readyz", timeout=10).status_code == 200:
                return
        except httpx.TransportError:
            pass  # the Serve proxy is not up yet
        time.sleep(0.5)
    raise TimeoutError(f"the answer service at {url} was not ready within {timeout_s:.0f}s")


def wait_for_swap(settings: Settings, url: str, version: str, timeout_s: float) -> float:
    """Epoch seconds of the first answer the service generated with ``version``."""
    import httpx

    from schemas.serving import AnswerRequest, AnswerResponse
    from services.answers.keys import ensure_keys

    body = AnswerRequest(question="What are the symptoms of glaucoma?").model_dump(mode="json")
    headers = {"Authorization": f"Bearer {ensure_keys(settings).api_key}"}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = httpx.post(f"{url}/v1/answers", json=body, headers=headers, timeout=60)
        answer = AnswerResponse.model_validate_json(response.raise_for_status().content)
        if answer.model_version == version:
            return time.time() - answer.latency_ms / 1000  # the request that was first served by the new version
        time.sleep(0.2)
    raise TimeoutError(f"the answer service at {url} did not serve v{version} within {timeout_s:.0f}s")


def stage_table(timeline) -> list[dict[str, Any]]:
    return [{"stage": name, "seconds": round(seconds, 2), "share": round(seconds / timeline.total_s, 4),
             "floor_s": None if name not in timeline.floors else round(timeline.floors[name], 2)}
            for name, seconds in timeline.stages]  # fmt: skip


def run_round(settings: Settings, events: list, timeout_s: float, answers_url: str | None) -> dict[str, Any]:
    """Publish ``events`` (they cross the threshold), wait for the final status, read the round's timeline."""
    from schemas.events import utcnow
    from services.loop.demo import FINAL_PHASES, wait_for_final
    from services.loop.timeline import retrain_timeline
    from services.stream import publisher

    since = utcnow()
    publisher.publish(settings, events)
    seen = wait_for_final(settings, since, timeout_s, show=log.info)
    final = next(seen[p] for p in FINAL_PHASES if p in seen)
    if final.phase != "promoted":
        raise RuntimeError(f"retrain {final.request_id} ended {final.phase}: {final.detail}")
    timeline = retrain_timeline(settings, final.request_id, seen["started"], final)
    out = {"request_id": final.request_id, "version": final.model_version,
           "trigger_to_promotion_s": round(timeline.total_s, 2), "stages": stage_table(timeline),
           "ray_job_s": round(timeline.ray_job_s, 2), "training_s": round(timeline.training_s, 2),
           "steps": timeline.steps.__dict__ if timeline.steps else None}  # fmt: skip
    if answers_url:
        served = wait_for_swap(settings, answers_url, final.model_version, timeout_s)
        out["swap_s"] = round(served - final.at.timestamp(), 2)
        out["trigger_to_serving_s"] = round(timeline.total_s + out["swap_s"], 2)
        out["stages"].append({"stage": "answer service: promotion seen, first answer by the new version",
                              "seconds": out["swap_s"], "share": round(out["swap_s"] / out["trigger_to_serving_s"], 4),
                              "floor_s": None})  # fmt: skip
    return out


def tune_starts(settings: Settings, trials: int, out_dir: Path) -> list[dict[str, float]]:
    """A Ray Tune search of ``trials`` trials, one at a time: how long each trial took to reach its first step."""
    from deploy.registry import mlflow_client
    from services.loop.timeline import training_window
    from trainer.tune import run_tune

    tune = {"num_samples": trials, "max_steps": 2 * settings.train.checkpoint_every_steps, "max_concurrent": 1,
            "micro_batches": [settings.train.micro_batch_size], "epochs": []}  # fmt: skip
    summary = run_tune(with_overrides(settings, {"tune": tune}), None, out_dir / "tuned.json")
    mlflow = mlflow_client(settings)
    experiment = mlflow.get_experiment_by_name(settings.mlflow.experiment).experiment_id
    trial_runs = f"tags.`medretrain.tune_id` = '{summary['tune_id']}' and tags.`medretrain.kind` = 'tune-trial'"
    runs = mlflow.search_runs([experiment], filter_string=trial_runs, order_by=["attributes.start_time ASC"])
    figures, previous_end = [], None
    for i, r in enumerate(runs):
        first_step, last_step, _ = training_window(mlflow, r.info.run_id)
        # The run opens inside the trial; the previous trial's end also counts the trial's process start-up.
        since_previous = None if previous_end is None else round(first_step - previous_end, 2)
        figures.append({"trial": i, "run_start_to_first_step_s": round(first_step - r.info.start_time / 1000, 2),
                        "previous_trial_end_to_first_step_s": since_previous})  # fmt: skip
        previous_end = last_step  # a trial ASHA stopped keeps its run open: no end time
    return figures


def card() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def run(settings: Settings, args: argparse.Namespace, save) -> None:
    """Both rounds, saved as soon as they are done (``save(figures)``), then the Tune search."""
    from deploy import stack
    from deploy.clients import ensure_topics
    from evaluator.evaluate import measure_champion, medquad_set
    from services.store import create_schema, make_engine
    from trainer.model import build_tiny_llama
    from trainer.registry import bootstrap, resolve

    stack.up(settings)  # also creates the run's buckets
    ensure_topics(settings)
    create_schema(make_engine(settings))
    base = build_tiny_llama(Path(tempfile.mkdtemp(prefix="rl-tiny-"))) if args.tiny else args.base_model
    bootstrap(settings, from_path=base)
    # As in the demo: the first champion's MedQuAD baseline is scored once, outside any round.
    measure_champion(settings, resolve(settings, "champion"), [medquad_set(settings)])
    answers_url = args.answers_url
    if args.serve:
        from services.answers.client import service_url
        from services.answers.keys import ensure_keys

        ensure_keys(settings)  # as `serve answers` does first: the bench asks with the same key
        answers_url = service_url(settings)
    procs = start_services(settings, args.logs, SERVICES + (("answers",) if args.serve else ()))
    try:
        if args.serve:
            wait_ready(answers_url, 600)  # a real base loads in well under a minute
        cold = run_round(settings, split_events("train", args.events, seed=28), args.timeout, answers_url)
        save({"cold_trigger_to_promotion_s": cold["trigger_to_promotion_s"], "cold": cold})  # kept if the rest fails
        warm = run_round(settings, split_events("production", args.events, seed=28), args.timeout, answers_url)
    finally:
        stop_services(procs)
    serving = {"trigger_to_serving_s": warm["trigger_to_serving_s"]} if "trigger_to_serving_s" in warm else {}
    save({**serving, "trigger_to_promotion_s": warm["trigger_to_promotion_s"],
          "cold_trigger_to_promotion_s": cold["trigger_to_promotion_s"], "stage_table": warm["stages"],
          "warm": warm, "cold": cold})  # fmt: skip
    if args.tune_trials:
        save({"tune_trials": tune_starts(settings, args.tune_trials, args.logs)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="gpu")
    parser.add_argument("--events", type=int, help="production events of the measured round (also the threshold)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama as the base (CPU rehearsal)")
    parser.add_argument("--base-model", type=Path, help="local HF checkpoint as the base (default: shipped SmolLM2)")
    parser.add_argument("--serve", action="store_true", help="start the answer service too and time its swap")
    parser.add_argument("--answers-url", help="an answer service already running to wait on for the swap")
    parser.add_argument("--no-isolate", dest="isolate", action="store_false", help="use the settings' own names")
    parser.add_argument("--tune-trials", type=int, default=3, help="then a Tune search of this many trials (0: none)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds each round may take")
    parser.add_argument("--out", type=Path, help="default: bench/results/round_latency_<card>.json")
    parser.add_argument("--logs", type=Path, default=Path(tempfile.gettempdir()) / "round_latency_logs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the readiness and swap polls would fill the log
    args.events = args.events or DEFAULT_EVENTS[args.profile]
    settings = with_overrides(load_settings(), PROFILES[args.profile])
    settings = with_overrides(settings, {"trigger": {"threshold": args.events}})
    if args.tiny:
        rules = args.logs / "lenient_rules.json"
        rules.parent.mkdir(parents=True, exist_ok=True)
        rules.write_text(json.dumps(LENIENT_RULES))
        settings = with_overrides(settings, {"evaluate": {"gate_rules": str(rules)}})
    if args.isolate:
        settings = isolated(settings)
    if not (args.serve or args.answers_url):
        log.warning("no --serve or --answers-url: stopping the clock at the promotion")
    name = card()
    out = args.out or REPO / "bench" / "results" / f"round_latency_{name.lower().replace(' ', '_')}.json"
    results = {"benchmark": "round_latency", "card": name, "profile": args.profile, "events": args.events,
               "tiny_model": args.tiny, "load_average_before": os.getloadavg(),
               "settings": {k: settings.model_dump(mode="json")[k] for k in SETTINGS_KEPT},
               "python": platform.python_version()}  # fmt: skip

    def save(figures: dict[str, Any]) -> None:
        results.update(figures, load_average_after=os.getloadavg(),
                       measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))  # fmt: skip
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=str))
        log.info("wrote %s", out)

    run(settings, args, save)

if __name__ == "__main__":
    main()
