"""`medretrain` commands of the drift detector.

    medretrain drift check                          # one check of the latest window, as a table
    medretrain --set drift.window_size=500 drift check
    medretrain serve drift                          # check every drift.stride new rows (Ctrl-C stops)
"""

from __future__ import annotations

import signal
import threading

import typer

from deploy.cli_context import settings_of
from services.cli import console
from services.stream.cli import serve_group


def _print_outcome(outcome) -> None:
    from rich.table import Table

    result = outcome.result
    table = Table(title=f"drift vs champion {outcome.champion} (rows up to {outcome.last_row_id}; window "
                        f"{result.window_size} questions, {result.window_topics} topics; reference "
                        f"{result.reference_size} questions, {result.reference_topics} topics)")
    for column in ("test", "statistic", "p-value", "rejected", "detail"):
        table.add_column(column)
    for name, test in result.tests.items():
        shifted = test.detail.get("top_shifted")
        detail = ", ".join(f"{s['category']} {s['reference_share']:.0%}->{s['window_share']:.0%}" for s in shifted) \
            if shifted else ", ".join(f"{k}={v:.3g}" for k, v in test.detail.items() if isinstance(v, float))
        table.add_row(name, f"{test.statistic:.4g}", f"{test.p_value:.3g}",
                      "[red]yes[/]" if test.rejected else "no", detail)
    console.print(table)
    verdict = "[red]DRIFT[/]" if result.drift else "[green]no drift[/]"
    console.print(f"{verdict} at alpha {result.alpha} (Holm over {len(result.tests)} tests)")
    if result.drift:
        console.print("questions the reference explains worst:")
        for question in result.examples:
            console.print(f"  • {question}", highlight=False)
        request = outcome.request.request_id if outcome.request else "none (cooldown or a retrain in flight)"
        console.print(f"report run {outcome.report_run_id}; retrain request: {request}")


def check(ctx: typer.Context) -> None:
    """Compare the latest production questions with the champion's reference; retrain on drift."""
    from rich.progress import Progress

    from services.trigger.drift_monitor import DriftMonitor

    settings = settings_of(ctx)
    try:
        monitor = DriftMonitor(settings)
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("embedding the reference (first check of this champion)")
            outcome = monitor.check(on_batch=lambda n: progress.advance(task, n * 100 / settings.drift.reference_size))
    except LookupError as e:
        console.print(f"[red]{e}[/]")
        raise typer.Exit(1) from e
    if outcome is None:
        console.print(f"fewer than {settings.drift.window_size} questions stored: nothing to compare yet")
        raise typer.Exit(1)
    _print_outcome(outcome)


def serve(ctx: typer.Context) -> None:
    """Check for drift every drift.stride new rows (stop with Ctrl-C or SIGTERM)."""
    from services.trigger.drift_monitor import DriftMonitor

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        DriftMonitor(settings_of(ctx)).serve(stop)
    except KeyboardInterrupt:
        stop.set()


def register(app: typer.Typer) -> None:
    """Add these commands to the root app."""
    drift = typer.Typer(help="Drift of the live questions from the champion's training data.", no_args_is_help=True)
    drift.command("check")(check)
    app.add_typer(drift, name="drift")
    serve_group(app).command("drift")(serve)
