"""Hot swap: the served versions follow the registry's ``champion`` (and ``challenger``) aliases, without a restart.

    watcher = SwapWatcher(settings, models, metrics)
    threading.Thread(target=watcher.run, args=(stop,), daemon=True).start()      # alias poll
    threading.Thread(target=watcher.listen, args=(stop,), daemon=True).start()   # retrain.status wakes the poll

A move is applied as load first, then switch: the new adapter is loaded beside the old one while requests
go on, then the routes change in one step. Requests routed before the switch finish on the version they
started with. A version that cannot be loaded is recorded in :attr:`SwapWatcher.failures` and never
retried; its alias keeps serving the version it served before.
"""

from __future__ import annotations

import logging
import threading
import time

from deploy.registry import CHALLENGER, CHAMPION, open_registry
from schemas.events import RetrainStatus
from schemas.settings import Settings
from services.answers.metrics import ServiceMetrics
from services.answers.models import ServedModels, VersionLoadError

log = logging.getLogger(__name__)

LISTEN_RETRY_S = 5.0
"""Wait before reconnecting to the broker after an error (the alias poll keeps swaps going meanwhile)."""


class SwapWatcher:
    def __init__(self, settings: Settings, models: ServedModels, metrics: ServiceMetrics) -> None:
        self.settings, self.models, self.metrics = settings, models, metrics
        self.failures: dict[str, str] = {}
        """Version -> why it could not be loaded."""
        self.last_check_at: float | None = None
        self._wake = threading.Event()

    def targets(self, aliases: dict[str, str]) -> dict[str, str]:
        """Alias -> version this service should serve: the champion, and the challenger while a canary runs."""
        targets = {CHAMPION: str(aliases[CHAMPION])} if CHAMPION in aliases else {}
        challenger = aliases.get(CHALLENGER)
        if self.settings.serve.challenger_fraction > 0 and challenger and str(challenger) != targets.get(CHAMPION):
            targets[CHALLENGER] = str(challenger)
        return targets

    def check_once(self) -> None:
        client, name = open_registry(self.settings)
        targets = self.targets(dict(client.get_registered_model(name).aliases))
        current = self.models.routes()
        routes = {}
        for alias, version in targets.items():
            if version not in self.failures:
                try:
                    self.models.load(version)
                    routes[alias] = version
                    continue
                except VersionLoadError as e:
                    self.failures[version] = str(e)
                    self.metrics.swap_failures.labels(version=version).inc()
                    log.error("%s -> version %s cannot be served, keeping version %s: %s",
                              alias, version, current.get(alias), e)
            if alias in current:
                routes[alias] = current[alias]
        if routes != current:
            self.models.switch(routes)
            for alias, version in routes.items():
                if current.get(alias) != version:
                    self.metrics.swaps.labels(alias=alias).inc()
                    log.info("%s: version %s -> %s", alias, current.get(alias), version)
            self.metrics.set_routes(routes)
        self.models.unload_unused()
        self.last_check_at = time.time()

    def run(self, stop: threading.Event) -> None:
        """Check the aliases every ``serve.swap_poll_interval_s``, or at once when a promotion event arrives."""
        while not stop.is_set():
            try:
                self.check_once()
            except Exception as e:  # noqa: BLE001 - an MLflow outage must not end the watcher
                log.warning("registry check failed, serving unchanged: %s", e)
            self._wake.wait(self.settings.serve.swap_poll_interval_s)
            self._wake.clear()

    def listen(self, stop: threading.Event) -> None:
        """Wake the alias check on each ``promoted`` event on ``retrain.status`` (read from now on, in no group)."""
        while not stop.is_set():
            try:
                self._listen_once(stop)
            except Exception as e:  # noqa: BLE001 - the broker may be down: the alias poll goes on
                log.warning("retrain.status unavailable (%s); relying on the alias poll", e)
                stop.wait(LISTEN_RETRY_S)

    def _listen_once(self, stop: threading.Event) -> None:
        from kafka import KafkaConsumer, TopicPartition

        topic = self.settings.kafka.status_topic
        consumer = KafkaConsumer(bootstrap_servers=self.settings.kafka.bootstrap, enable_auto_commit=False)
        try:
            partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
            if not partitions:
                raise LookupError(f"topic {topic!r} not found")
            consumer.assign(partitions)
            consumer.seek_to_end(*partitions)
            while not stop.is_set():
                for records in consumer.poll(timeout_ms=500).values():
                    if any(_is_promotion(r.value) for r in records):
                        self.metrics.promotion_events.inc()
                        self._wake.set()
        finally:
            consumer.close()


def _is_promotion(value: bytes) -> bool:
    try:
        return RetrainStatus.model_validate_json(value).phase == "promoted"
    except ValueError:
        return False
