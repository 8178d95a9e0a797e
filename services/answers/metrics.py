"""Prometheus metrics of the answer service (``GET /metrics``), in a registry of the service's own.

Requests and latency by endpoint and status code, batch sizes, generated tokens and answers by
version, alias swaps and versions that failed to load, feedback by version and rating.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r, p = self.registry, "medretrain_answers_"
        self.requests = Counter(f"{p}requests", "HTTP requests", ["endpoint", "code"], registry=r)
        self.latency = Histogram(f"{p}latency_seconds", "HTTP request latency", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(f"{p}batch_size", "Questions generated per batch", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.answers = Counter(f"{p}answers", "Answers served", ["version", "alias"], registry=r)
        self.tokens = Counter(f"{p}generated_tokens", "Tokens generated", ["version"], registry=r)
        self.swaps = Counter(f"{p}swaps", "Alias moves applied without a restart", ["alias"], registry=r)
        self.swap_failures = Counter(f"{p}swap_failures", "Versions that could not be loaded", ["version"],
                                     registry=r)
        self.promotion_events = Counter(f"{p}promotion_events", "retrain.status promotions that woke the swap check",
                                        registry=r)
        self.feedback = Counter(f"{p}feedback", "Feedback accepted", ["version", "rating"], registry=r)
        self.served = Gauge(f"{p}served_version", "1 for the version each alias serves", ["alias", "version"],
                            registry=r)

    def set_routes(self, routes: dict[str, str]) -> None:
        self.served.clear()
        for alias, version in routes.items():
            self.served.labels(alias=alias, version=version).set(1)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
