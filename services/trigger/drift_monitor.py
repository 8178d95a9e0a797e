"""The live drift monitor: latest production questions vs the champion's reference, a retrain when they differ.

    medretrain drift check            # one check now, a table of the tests
    medretrain serve drift            # check every ``drift.stride`` new rows (Ctrl-C stops)

    monitor = DriftMonitor(settings)
    outcome = monitor.check()         # CheckOutcome(result, champion, request, report_run_id)

When drift is declared the monitor logs a report run to MLflow (``drift_report.json`` and
``drift_report.png``, tagged with the champion version), then calls
:func:`services.trigger.trigger.signal_drift`, so the trigger's cooldown and one-in-flight rules decide
whether a ``RetrainRequest`` (reason ``drift``) goes out; the run is tagged with the outcome.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, select

from schemas.events import RetrainRequest
from schemas.settings import Settings
from services.store import QAEventRow, create_schema, make_engine, max_row_id
from services.trigger.drift import DriftResult, QuestionSample, detect, qtype_label
from services.trigger.drift_reference import champion_version, load_or_build
from services.trigger.embeddings import embed

log = logging.getLogger(__name__)

DRIFT_KIND = "drift"
"""``medretrain.kind`` of drift report runs."""
CHAMPION_TAG = "medretrain.champion_version"


@dataclass(frozen=True)
class LiveWindow:
    sample: QuestionSample
    last_row_id: int


@dataclass(frozen=True)
class CheckOutcome:
    result: DriftResult
    champion: str
    last_row_id: int
    request: RetrainRequest | None = None
    report_run_id: str | None = None


def latest_window(engine: Engine, size: int, batch_size: int) -> LiveWindow | None:
    """The newest ``size`` stored questions, embedded; None while fewer are stored."""
    stmt = (select(QAEventRow.row_id, QAEventRow.question, QAEventRow.source, QAEventRow.qtype, QAEventRow.focus)
            .order_by(QAEventRow.row_id.desc()).limit(size))
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()[::-1]
    if len(rows) < size:
        return None
    questions = [r.question for r in rows]
    sample = QuestionSample(questions=questions, embeddings=embed(questions, batch_size),
                            sources=[r.source for r in rows], qtypes=[qtype_label(r.qtype) for r in rows],
                            topics=[r.focus for r in rows])
    return LiveWindow(sample, rows[-1].row_id)


def report_figure(reference: QuestionSample, window: QuestionSample, result: DriftResult):
    """Four panels: p-values against alpha, source and qtype shares, question lengths."""
    import matplotlib

    matplotlib.use("Agg")  # headless: services have no display
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    names = list(result.tests)
    axes[0, 0].bar(names, [max(result.tests[n].p_value, 1e-12) for n in names],
                   color=["tab:red" if result.tests[n].rejected else "tab:gray" for n in names])
    axes[0, 0].axhline(
        result.alpha / len(names), ls="--", color="k", label=f"alpha/{len(names)} (strictest Holm level)"
    )
    axes[0, 0].set(yscale="log", title="p-values (red: rejected)")
    axes[0, 0].legend()
    for ax, field in ((axes[0, 1], "sources"), (axes[1, 0], "qtypes")):
        ref, win = getattr(reference, field), getattr(window, field)
        cats = sorted(set(ref) | set(win))
        x = np.arange(len(cats))
        ax.bar(x - 0.2, [ref.count(c) / len(ref) for c in cats], 0.4, label="reference")
        ax.bar(x + 0.2, [win.count(c) / len(win) for c in cats], 0.4, label="window")
        ax.set_xticks(x, cats, rotation=45, ha="right", fontsize=8)
        ax.set(title=f"{field[:-1]} share")
        ax.legend()
    bins = np.linspace(0, max(reference.lengths.max(), window.lengths.max()), 40)
    axes[1, 1].hist(reference.lengths, bins, density=True, alpha=0.5, label="reference")
    axes[1, 1].hist(window.lengths, bins, density=True, alpha=0.5, label="window")
    axes[1, 1].set(title="question length (chars)")
    axes[1, 1].legend()
    fig.suptitle(f"drift: {result.drift} (Holm, alpha {result.alpha})")
    fig.tight_layout()
    return fig


def log_report(
    settings: Settings,
    champion: str,
    reference: QuestionSample,
    window: LiveWindow,
    result: DriftResult,
    signal: Callable[[str], RetrainRequest | None],
) -> tuple[str, RetrainRequest | None]:
    """An MLflow run holding the report; ``signal(run_id)`` runs inside it and its outcome is tagged."""
    import matplotlib.pyplot as plt

    from deploy.registry import KIND_TAG, REQUEST_TAG, mlflow_client
    from trainer.tracking import finishing, log_json, open_run

    tags = {KIND_TAG: DRIFT_KIND, CHAMPION_TAG: champion, "medretrain.window_last_row_id": str(window.last_row_id)}
    run_id = open_run(settings, tags, run_name=f"drift-v{champion}-row{window.last_row_id}")
    mlflow = mlflow_client(settings)
    with finishing(settings, run_id):
        report = result.evidence() | {"champion_version": champion, "window_last_row_id": window.last_row_id}
        log_json(settings, run_id, "drift_report.json", report)
        fig = report_figure(reference, window.sample, result)
        with tempfile.TemporaryDirectory() as tmp:
            fig.savefig(Path(tmp) / "drift_report.png", dpi=100)
            mlflow.log_artifact(run_id, str(Path(tmp) / "drift_report.png"))
        plt.close(fig)
        for name, test in result.tests.items():
            mlflow.log_metric(run_id, f"{name}_p_value", test.p_value)
            mlflow.log_metric(run_id, f"{name}_statistic", test.statistic)
        request = signal(run_id)
        mlflow.set_tag(run_id, REQUEST_TAG, request.request_id if request else "none (cooldown or retrain in flight)")
    return run_id, request


class DriftMonitor:
    """Holds the champion's reference (reloaded when the alias moves) and runs checks."""

    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.engine = engine or make_engine(settings)
        create_schema(self.engine)
        self._reference: tuple[str, QuestionSample] | None = None

    def reference(self, on_batch: Callable[[int], None] | None = None) -> tuple[str, QuestionSample]:
        champion = champion_version(self.settings)
        if self._reference is None or self._reference[0] != champion:
            if self._reference is not None:
                log.info(
                    "champion moved from version %s to %s: switching drift reference", self._reference[0], champion
                )
            self._reference = champion, load_or_build(self.settings, self.engine, champion, on_batch)
        return self._reference

    def check(self, on_batch: Callable[[int], None] | None = None) -> CheckOutcome | None:
        """One check of the latest window; None while the store holds fewer than ``drift.window_size`` rows."""
        from services.trigger.trigger import signal_drift

        champion, reference = self.reference(on_batch)
        drift = self.settings.drift
        window = latest_window(self.engine, drift.window_size, drift.embed_batch_size)
        if window is None:
            log.info("drift check waits: fewer than %d questions stored", drift.window_size)
            return None
        result = detect(reference, window.sample, drift)
        p_values = ", ".join(f"{n} p={t.p_value:.3g}" for n, t in result.tests.items())
        log.info(
            "drift check of rows up to %d vs champion %s: %s (%s)",
            window.last_row_id,
            champion,
            "DRIFT" if result.drift else "no drift",
            p_values,
        )
        if not result.drift:
            return CheckOutcome(result, champion, window.last_row_id)

        def signal(run_id: str) -> RetrainRequest | None:
            evidence = result.evidence() | {
                "champion_version": champion,
                "report_run_id": run_id,
                "window_last_row_id": window.last_row_id,
            }
            return signal_drift(self.settings, evidence, self.engine)

        run_id, request = log_report(self.settings, champion, reference, window, result, signal)
        return CheckOutcome(result, champion, window.last_row_id, request, run_id)

    def _due(self, last_row: int, last_time: float) -> bool:
        drift = self.settings.drift
        with self.engine.connect() as conn:
            newest = max_row_id(conn)
        return newest - last_row >= drift.stride and time.monotonic() - last_time >= drift.min_interval_s

    def serve(self, stop: threading.Event) -> None:
        """Check whenever ``drift.stride`` rows arrived since the last check and ``min_interval_s`` passed.

        A service that is away (database, MLflow, broker, S3) or a champion not yet bootstrapped
        is logged and retried at the next poll; the window is checked again then (a request
        recorded but not published is sent by the trigger's republish).
        """
        from kafka.errors import KafkaError
        from mlflow.exceptions import MlflowException
        from sqlalchemy.exc import OperationalError

        from services.trigger.export import SnapshotWriteError

        retryable = (LookupError, OSError, MlflowException, OperationalError, KafkaError, SnapshotWriteError)

        last_row, last_time = 0, float("-inf")
        while not stop.is_set():
            try:
                if self._due(last_row, last_time):
                    outcome = self.check()
                    if outcome is not None:
                        last_row, last_time = outcome.last_row_id, time.monotonic()
            except retryable as e:
                log.warning("drift check failed, retrying in %.0fs: %s", self.settings.drift.poll_interval_s, e)
            stop.wait(self.settings.drift.poll_interval_s)
