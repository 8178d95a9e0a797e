"""Answer service benchmark on CPU: SmolLM2-135M from the registry, 64 new tokens, the real `serve answers` process.

    .venv/bin/python bench/serve_cpu.py                     # JSON to stdout and bench/results/serve_cpu.json

Runs against the stack the settings name (``MEDRETRAIN_*`` env, e.g. the test stack's) with a registered
model, topics and database of its own, dropped afterwards. First a bare ``generate`` of the model in this
process; then batching on: throughput under 16 clients, one request alone, and >= 500 requests from 8
clients across two promotions and a rollback; then batching off (``serve.max_batch_size=1``, canary on):
the same throughput, and RSS with the champion alone and with a challenger adapter of the trainer's
default LoRA shape beside it. Each phase's figures are written as soon as they are measured.
Goals: batching_speedup >= 3, overhead_ratio <= 1.3, 0 failed requests, swap latency <= 5 s, RSS <= +5%.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "services" / "answers"), str(REPO / "tests" / "services")]

from serving_stack import Service, register_adapter, start_service, stop_service, wait_for  # noqa: E402
from stream_stack import close_env, open_env  # noqa: E402

from evaluator import promotion  # noqa: E402
from schemas.settings import load_settings  # noqa: E402

log = logging.getLogger("bench.serve_cpu")

QUESTIONS = ("What are the symptoms of glaucoma?", "How is type 2 diabetes treated?",
             "What causes high blood pressure?", "Is asthma hereditary?")
GOALS = {"batching_speedup": (">=", 3.0), "overhead_ratio": ("<=", 1.3), "swap_failed_requests": ("<=", 0),
         "swap_latency_s": ("<=", 5.0), "rss_increase_pct": ("<=", 5.0)}


def start_clients(service: Service, clients: int, per_client: int | None = None,
                  stop: threading.Event | None = None) -> tuple[list[tuple], list[threading.Thread]]:
    """``clients`` threads asking in a loop, ``per_client`` times or until ``stop``; (sent, received, code, body)."""
    results: list[tuple] = []

    def client(i: int) -> None:
        with httpx.Client(base_url=service.http.base_url, timeout=600, headers=service.auth) as http:
            n = 0
            while (per_client is None or n < per_client) and not (stop and stop.is_set()):
                sent = time.time()
                try:
                    r = http.post("/v1/answers", json={"question": QUESTIONS[(i + n) % len(QUESTIONS)],
                                                       "session_id": f"bench-{i}"})
                    results.append((sent, time.time(), r.status_code, r.json() if r.status_code == 200 else {}))
                except httpx.HTTPError as e:
                    results.append((sent, time.time(), repr(e), {}))
                n += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    return results, threads


def run_clients(service: Service, clients: int, per_client: int) -> list[tuple]:
    results, threads = start_clients(service, clients, per_client)
    for t in threads:
        t.join()
    return results


def throughput(service: Service, clients: int = 16, per_client: int = 3) -> float:
    """Answers per second under ``clients`` concurrent clients, each asking again as soon as it is answered.

    Several rounds, not one burst: a single burst measures mostly how its arrivals (spread over ~0.1 s
    here) fell on either side of the first batch's ``serve.batch_wait_s``.
    """
    run_clients(service, 2, 1)  # warm-up
    start = time.time()
    results = run_clients(service, clients, per_client)
    assert all(r[2] == 200 for r in results), [r[2] for r in results if r[2] != 200]
    return len(results) / (time.time() - start)


def single_p50(service: Service, n: int = 7) -> float:
    service.ask(QUESTIONS[0])
    latencies = []
    for _ in range(n):
        start = time.perf_counter()
        assert service.ask(QUESTIONS[0]).status_code == 200
        latencies.append(time.perf_counter() - start)
    return statistics.median(latencies)


def bare_generate_p50(settings, version: str, n: int = 7) -> float:
    """The same model, prompt and decoding as served, generated in this process without the service."""
    import torch

    from evaluator.inference import generate_answers
    from trainer.registry import load_resolved, resolve

    torch.set_num_threads(os.cpu_count() or 1)
    model, tokenizer = load_resolved(resolve(settings, version), torch.float32)
    ev = settings.evaluate
    latencies = []
    for i in range(n + 1):
        start = time.perf_counter()
        generate_answers(model, tokenizer, [QUESTIONS[0]], ev.max_new_tokens, batch_size=1, label="bare",
                         no_repeat_ngram_size=ev.no_repeat_ngram_size)
        if i:  # the first call warms up
            latencies.append(time.perf_counter() - start)
    return statistics.median(latencies)


def renice_serve(service: Service) -> list[int]:
    """Give the Serve proxy and the replica niceness 0, as every other process here has.

    Ray starts its workers at niceness 15; on this shared host other helpers' work at 0 would then
    starve the request path and the bench would measure the neighbours (the replica does this itself,
    the proxy does not). Linux keeps a niceness per thread: every thread is reset.
    """
    import psutil
    from ray.util.state import list_actors

    from deploy.clients import use_ray

    use_ray(service.settings)  # the state API needs the cluster's token, as every Ray client here
    alive = [("class_name", "=", "ProxyActor"), ("state", "=", "ALIVE")]
    pids = [a.pid for a in list_actors(address=service.settings.ray.address, filters=alive)]
    pids.append(service.status()["pid"])
    for pid in pids:
        for thread in psutil.Process(pid).threads():
            os.setpriority(os.PRIO_PROCESS, thread.id, 0)
    return pids


def canary_rss(service: Service, settings, base_dir: Path, tmp: Path) -> dict:
    """RSS of the replica after the same load, with the champion alone, then with a challenger beside it."""
    run_clients(service, 4, 2)
    alone = service.status()["rss_bytes"]
    challenger = register_adapter(settings, base_dir, "1", tmp / "challenger", seed=11, lora=settings.train.lora)
    # The champion is the base here; a challenger adapter joins it on the same base.
    wait_for(lambda: service.status()["serving"].get("challenger") == challenger, 300, "challenger loaded")
    results = run_clients(service, 4, 2)
    both = service.status()["rss_bytes"]
    return {"rss_alone_bytes": alone, "rss_both_bytes": both, "rss_increase_pct": 100 * (both - alone) / alone,
            "canary_versions_served": sorted({r[3].get("model_version") for r in results}), "challenger": challenger}


def swap_phase(service: Service, settings, base_dir: Path, tmp: Path, min_requests: int = 500) -> dict:
    """8 clients ask without pause while the champion moves to a new version, to another, and back to the first."""
    first, second = (register_adapter(settings, base_dir, "1", tmp / f"v{seed}", seed=seed, lora=settings.train.lora)
                     for seed in (12, 13))
    moves: list[tuple[str, float, str]] = []  # (what, time the registry call returned, version now champion)
    stop = threading.Event()
    results, threads = start_clients(service, 8, stop=stop)
    switches: list[tuple[float, str | None]] = []  # (time, the version the service routes the champion to)
    threads.append(threading.Thread(target=_watch_routes, args=(service, switches, stop), daemon=True))
    threads[-1].start()

    def versions(since: float) -> list[str | None]:
        return [r[3].get("model_version") for r in results if r[0] >= since]

    def move(what: str, call, version: str) -> None:
        call()
        moves.append((what, time.time(), version))
        wait_for(lambda: versions(moves[-1][1]).count(version) >= 40, 600, f"answers after {what}")

    wait_for(lambda: len(results) >= 40, 600, "answers before the first move")
    move("promote", lambda: promotion.promote(settings, first, actor="bench"), first)
    move("promote", lambda: promotion.promote(settings, second, actor="bench"), second)
    move("rollback", lambda: promotion.rollback(settings, actor="bench"), first)
    wait_for(lambda: len(results) >= min_requests, 1800, f"{min_requests} requests")
    stop.set()
    for t in threads:
        t.join()
    return {"requests": len(results), "failed": sum(r[2] != 200 for r in results),
            "moves": [_move_report(results, switches, moves, i) for i in range(len(moves))]}


def _watch_routes(service: Service, switches: list, stop: threading.Event) -> None:
    """Each change of the version ``/v1/status`` routes the champion to, polled every 0.25 s."""
    with httpx.Client(base_url=service.http.base_url, timeout=60, headers=service.auth) as http:
        while not stop.is_set():
            champion = http.get("/v1/status").json()["serving"].get("champion")
            if not switches or switches[-1][1] != champion:
                switches.append((time.time(), champion))
            time.sleep(0.25)


def _move_report(results: list, switches: list, moves: list, i: int) -> dict:
    """How long after a move the service routed to the new version, and when a request sent got it.

    The clients ask again only once answered (a batch takes 20-30 s here), so the first request sent after
    the switch may leave long after it: ``switch_s`` is the service's part, ``latency_s`` the requests'.
    """
    what, at, version = moves[i]
    until = moves[i + 1][1] if i + 1 < len(moves) else float("inf")
    window = sorted((r for r in results if at <= r[0] < until), key=lambda r: r[0])
    first_new = next(r for r in window if r[3].get("model_version") == version)
    stale = [r for r in window if r[0] > first_new[0] and r[3].get("model_version") != version]
    since = moves[i - 1][1] if i else 0.0  # the service may switch before the registry call returns
    switched = next(t for t, champion in switches if since < t < until and champion == version)
    return {"move": what, "to_version": version, "switch_s": switched - at, "latency_s": first_new[0] - at,
            "first_answer_received_s": first_new[1] - at, "stale_after_switch": len(stale)}


def machine() -> dict:
    import psutil

    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "processor": platform.processor()}


def goals(result: dict) -> dict:
    ops = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b}
    return {k: {"goal": f"{op} {bound}", "value": result[k], "met": ops[op](result[k], bound)}
            for k, (op, bound) in GOALS.items() if k in result}


def bench(stack, tmp: Path, record) -> None:
    """Each phase's figures go to ``record`` as soon as they are measured (a cut-short run keeps them)."""
    from trainer.registry import bootstrap, resolve

    env = open_env(stack, {"mlflow.registered_model": f"bench-serve-{uuid.uuid4().hex[:8]}",
                           "evaluate.max_new_tokens": 64, "evaluate.promotion": "review"})
    try:
        settings = env.settings
        record(settings={"serve": settings.serve.model_dump(mode="json"),
                         "evaluate": settings.evaluate.model_dump(mode="json"), "model": "bootstrap (SmolLM2-135M)"})
        base = bootstrap(settings)  # SmolLM2-135M-Instruct, version 1, champion
        base_dir = resolve(settings, base).base_dir
        record(bare_generate_p50_s=bare_generate_p50(settings, base))
        on = start_service(settings, env.overrides, tmp / "serve-on.log")
        try:
            on.wait_ready()
            renice_serve(on)
            record(throughput_on_rps=throughput(on))
            record(single_request_p50_s=single_p50(on))
            record(swap=swap_phase(on, settings, base_dir, tmp))
            promotion.rollback(settings, actor="bench")  # back to the base, for the batching-off run
        finally:
            stop_service(on)
        off = start_service(settings, (*env.overrides, "serve.max_batch_size=1", "serve.challenger_fraction=0.5"),
                            tmp / "serve-off.log")
        try:
            off.wait_ready()
            renice_serve(off)
            record(throughput_off_rps=throughput(off))
            record(rss=canary_rss(off, settings, base_dir, tmp))
        finally:
            stop_service(off)
    finally:
        close_env(env)


def summary(raw: dict) -> dict:
    """The headline figures from what was measured; a missing phase leaves its figure out."""
    out = {}
    if "throughput_on_rps" in raw and "throughput_off_rps" in raw:
        out["batching_speedup"] = raw["throughput_on_rps"] / raw["throughput_off_rps"]
    if "single_request_p50_s" in raw and "bare_generate_p50_s" in raw:
        out["overhead_ratio"] = raw["single_request_p50_s"] / raw["bare_generate_p50_s"]
    if "swap" in raw:
        out["swap_failed_requests"] = raw["swap"]["failed"]
        out["swap_latency_s"] = max(m["switch_s"] for m in raw["swap"]["moves"])
    if "rss" in raw:
        out["rss_increase_pct"] = raw["rss"]["rss_increase_pct"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serve_cpu.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("kafka", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C stops the services and drops the bench's env
    raw: dict = {}
    started, load_before = time.time(), os.getloadavg()

    def record(**measured) -> None:
        raw.update(measured)
        headline = summary(raw)
        result = {**headline, "goals": goals(headline), **raw, "machine": machine(), "wall_s": time.time() - started,
                  "load_average": {"before": load_before, "now": os.getloadavg()},
                  "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        log.info("recorded %s: %s", ", ".join(measured), json.dumps(headline))

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        bench(load_settings(), Path(tmp), record)
    print(args.out.read_text())


if __name__ == "__main__":
    main()
