"""Drift detector calibration: false-alarm rate, power on shifted streams, embedding throughput, latency.

    .venv/bin/python bench/drift_calibration.py        # JSON to stdout and bench/results/drift_calibration.json
    .venv/bin/python bench/drift_calibration.py --null-windows 100 --shift-windows 50 --set drift.permutations=1000

The reference is built exactly as for the base champion (``drift.reference_size`` MedQuAD train
questions, seeded). Windows of ``drift.window_size`` questions:

- null: held-out MedQuAD (validation + test documents) against the train reference: any alarm is false;
- ``rare_sources``: production-split questions of sources under 5% of the reference;
- ``consumer_style``: consumer-style questions (tests/services/trigger/drift_shifts.py) about production topics, with
  source and qtype drawn from the reference, so only the embedding and length tests can see them;
- ``consumer_mix_25``: a quarter consumer-style, the rest held-out MedQuAD (a partial shift).

Embeddings are cached under ``--cache`` (keyed by the questions), so a rerun measures the detector only;
throughput is always measured on a fresh batch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import random
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "services" / "trigger")]  # drift_shifts: the shifted-stream fixture
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from drift_shifts import consumer_questions  # noqa: E402

from schemas.settings import DriftSettings, load_settings  # noqa: E402
from services.trigger.drift import QuestionSample, detect  # noqa: E402
from services.trigger.drift_reference import Row, medquad_rows, sample_reference  # noqa: E402
from services.trigger.embeddings import embed  # noqa: E402

log = logging.getLogger("bench.drift")


def cached_sample(rows: list[Row], cache: Path, batch_size: int) -> QuestionSample:
    questions = [row[0] for row in rows]
    key = hashlib.sha256("\n".join(questions).encode()).hexdigest()[:16]
    path = cache / f"embeddings-{key}.npy"
    if path.is_file():
        vectors = np.load(path)
    else:
        log.info("embedding %d questions", len(questions))
        vectors = embed(questions, batch_size)
        cache.mkdir(parents=True, exist_ok=True)
        np.save(path, vectors)
    return QuestionSample(
        questions, vectors, [row[1] for row in rows], [row[2] for row in rows], [row[3] for row in rows]
    )


def subset(sample: QuestionSample, index: np.ndarray) -> QuestionSample:
    return QuestionSample(
        [sample.questions[i] for i in index],
        sample.embeddings[index],
        [sample.sources[i] for i in index],
        [sample.qtypes[i] for i in index],
        [sample.topics[i] for i in index],
    )


def concat(a: QuestionSample, b: QuestionSample) -> QuestionSample:
    return QuestionSample(
        a.questions + b.questions,
        np.concatenate([a.embeddings, b.embeddings]),
        a.sources + b.sources,
        a.qtypes + b.qtypes,
        a.topics + b.topics,
    )


def shifted_pools(reference: list[Row], seed: int) -> dict[str, list[Row]]:
    """Rows of the shifted streams (see the module docstring)."""
    from trainer.medquad import load_medquad

    production = load_medquad("production")
    shares = Counter(row[1] for row in reference)
    rare = {s for s, c in shares.items() if c / len(reference) < 0.05}
    rng = random.Random(seed)
    labels = [(row[1], row[2]) for row in reference]
    consumer = consumer_questions([p.focus or "" for p in production], 1000, seed)
    return {
        "rare_sources": [(p.question, p.source, p.qtype or "(none)", p.focus) for p in production if p.source in rare],
        # People asking an assistant name no focus: every consumer question is its own topic.
        "consumer_style": [(q, *rng.choice(labels), None) for q in consumer],
    }


def run_windows(reference: QuestionSample, draw, windows: int, drift: DriftSettings) -> dict:
    """Detect on ``windows`` windows from ``draw(i)``; alarm rate, which tests fired, detector latency."""
    alarms, fired, latency = 0, Counter(), []
    for i in range(windows):
        window = draw(i)
        start = time.perf_counter()
        result = detect(reference, window, drift.model_copy(update={"seed": drift.seed + i}))
        latency.append(time.perf_counter() - start)
        alarms += result.drift
        fired.update(name for name, t in result.tests.items() if t.rejected)
    return {
        "windows": windows,
        "alarms": alarms,
        "alarm_rate": alarms / windows,
        "tests_fired": dict(fired),
        "detect_s_median": float(np.median(latency)),
        "detect_s_p95": float(np.percentile(latency, 95)),
    }


def throughput(questions: list[str], batch_size: int) -> float:
    embed(questions[:batch_size], batch_size)  # warm-up: first call loads the model
    start = time.perf_counter()
    embed(questions, batch_size)
    return len(questions) / (time.perf_counter() - start)


def calibrate(args: argparse.Namespace) -> dict:
    settings = load_settings(args.set)
    drift, rng = settings.drift, np.random.default_rng(args.seed)
    ref_rows, _ = sample_reference([], drift.reference_size, drift.seed)
    reference = cached_sample(ref_rows, args.cache, drift.embed_batch_size)
    held_out = cached_sample(medquad_rows("validation") + medquad_rows("test"), args.cache, drift.embed_batch_size)
    pools = {
        name: cached_sample(rows, args.cache, drift.embed_batch_size)
        for name, rows in shifted_pools(ref_rows, args.seed).items()
    }
    m = drift.window_size

    def window_of(pool: QuestionSample, size: int = m) -> QuestionSample:
        return subset(pool, rng.choice(len(pool), size=size, replace=False))

    quarter = m // 4
    draws = {
        "rare_sources": lambda i: window_of(pools["rare_sources"]),
        "consumer_style": lambda i: window_of(pools["consumer_style"]),
        "consumer_mix_25": lambda i: concat(
            window_of(pools["consumer_style"], quarter), window_of(held_out, m - quarter)
        ),
    }
    null = run_windows(reference, lambda i: window_of(held_out), args.null_windows, drift)
    power = {name: run_windows(reference, draw, args.shift_windows, drift) for name, draw in draws.items()}
    per_s = throughput(held_out.questions[: args.throughput_questions], drift.embed_batch_size)
    return {
        "settings": drift.model_dump(),
        "reference": {"size": len(reference), "sources": dict(Counter(reference.sources))},
        "held_out_pool": len(held_out),
        "shift_pools": {name: len(pool) for name, pool in pools.items()},
        "false_alarm": null,
        "power": power,
        "embedding_questions_per_s": per_s,
        "check_latency_s": m / per_s + null["detect_s_median"],
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_1m_at_end": os.getloadavg()[0],
            "python": platform.python_version(),
            "torch_threads": __import__("torch").get_num_threads(),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], help="Setting override section.field=value (repeatable)")
    parser.add_argument("--null-windows", type=int, default=100)
    parser.add_argument("--shift-windows", type=int, default=40)
    parser.add_argument("--throughput-questions", type=int, default=512)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "medretrain-drift-bench")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "drift_calibration.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = calibrate(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
