"""Prometheus metrics of the accumulator (scraped at ``http://<host>:<stream.metrics_port>/metrics``)."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

CONSUMED = Counter("medretrain_events_consumed_total", "Records read from the events topic")
ACCEPTED = Counter("medretrain_events_accepted_total", "Valid events newly stored")
DUPLICATES = Counter("medretrain_events_duplicate_total", "Valid events whose event_id was already stored")
DEAD_LETTERED = Counter("medretrain_events_dead_lettered_total", "Records sent to the dead-letter topic", ["category"])
BATCH_SECONDS = Histogram(
    "medretrain_batch_seconds",
    "Store + dead-letter time of one batch (it is validated while the previous one is stored)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
ROWS_SINCE_SNAPSHOT = Gauge("medretrain_rows_since_last_snapshot", "Stored rows not yet covered by a snapshot")
CONSUMER_LAG = Gauge(
    "medretrain_consumer_lag",
    "Records behind the partition high watermark of the last fetch response (not ListOffsets)",
    ["topic", "partition"],
)


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    """Expose the metrics over HTTP; port 0 leaves them off."""
    if port:
        start_http_server(port, addr=host)
        log.info("metrics on http://%s:%d/metrics", host, port)
