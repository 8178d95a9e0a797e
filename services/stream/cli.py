"""`medretrain` commands of the stream: publish events, run the accumulator, request a retrain.

    medretrain publish events.jsonl
    medretrain publish --medquad-sample 500 --seed 7 --rate 100
    medretrain serve accumulator
    medretrain retrain --reason "new cardiology guideline" --override train.lr=1e-4
"""

from __future__ import annotations

import getpass
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, TextIO

import typer

from deploy.cli_context import settings_of
from services.cli import console


def serve_group(app: typer.Typer) -> typer.Typer:
    """The shared ``serve`` sub-command group (other modules add their long-running services to it)."""
    for group in app.registered_groups:
        if group.name == "serve":
            return group.typer_instance
    serve = typer.Typer(help="Run a long-lived service.", no_args_is_help=True)
    app.add_typer(serve, name="serve")
    return serve


@contextmanager
def _clear_errors(settings) -> Iterator[None]:
    """Broker and S3 trouble ends the command with one line naming the endpoint, not a traceback."""
    from botocore.exceptions import BotoCoreError
    from kafka.errors import KafkaError

    from services.trigger.export import SnapshotWriteError

    try:
        yield
    except KafkaError as e:
        console.print(f"[red]broker {settings.kafka.bootstrap} failed[/]: {e}")
        raise typer.Exit(2) from e
    except (SnapshotWriteError, BotoCoreError) as e:
        console.print(f"[red]S3 {settings.s3.endpoint} failed[/]: {e}")
        raise typer.Exit(2) from e


def _records(file: TextIO | None, fmt: str | None, medquad_sample: int | None, seed: int):
    """The records to publish and how many there are when known (for the progress bar)."""
    from services.stream import publisher

    if medquad_sample is not None:
        if file is not None:
            raise typer.BadParameter("give a FILE or --medquad-sample, not both")
        events = publisher.medquad_events(medquad_sample, seed)
        return events, len(events)
    if file is None:
        raise typer.BadParameter("give a FILE (or - for stdin) or --medquad-sample N")
    fmt = fmt or ("csv" if str(file.name).lower().endswith(".csv") else "jsonl")
    return (publisher.read_csv(file) if fmt == "csv" else publisher.read_jsonl(file)), None


def publish(
    ctx: typer.Context,
    file: typer.FileText | None = typer.Argument(None, help="JSONL or CSV file of QA events; - reads stdin"),
    fmt: Literal["jsonl", "csv"] | None = typer.Option(None, "--format", help="Default: from the file extension"),
    medquad_sample: int | None = typer.Option(
        None, "--medquad-sample", min=1, help="Publish N MedQuAD production pairs"
    ),
    seed: int = typer.Option(0, "--seed", help="Sampling seed for --medquad-sample"),
    rate: float | None = typer.Option(None, "--rate", min=0.001, help="Events per second at most"),
) -> None:
    """Validate QA events and publish them to the events topic."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from deploy.clients import ensure_topics
    from services.stream import publisher

    settings = settings_of(ctx)
    logging.getLogger("kafka").setLevel(logging.WARNING)  # its INFO lines would drown the progress bar
    records, total = _records(file, fmt, medquad_sample, seed)
    columns = (TextColumn("publishing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with _clear_errors(settings), Progress(*columns, console=console, transient=True) as progress:
        ensure_topics(settings)
        task = progress.add_task("publish", total=total)
        summary = publisher.publish(
            settings,
            records,
            rate=rate,
            on_bad=lambda bad: console.print(f"[yellow]line {bad.line}[/]: {bad.reason}", highlight=False),
            on_sent=lambda: progress.advance(task),
        )
    console.print(
        f"sent [bold]{summary.sent}[/], rejected [bold]{summary.rejected}[/], failed [bold]{summary.failed}[/]"
        f" in {summary.seconds:.1f}s ({summary.per_second:.0f} events/s) -> {settings.kafka.events_topic}"
    )
    for error in summary.errors[:5]:
        console.print(f"[red]delivery failed[/]: {error}")
    if summary.failed:
        raise typer.Exit(1)


def accumulator(
    ctx: typer.Context,
    loglevel: str = typer.Option("info", "--loglevel", help="crit, error, warn, info or debug"),
) -> None:
    """Consume QA events into the store (faust worker; stop with Ctrl-C)."""
    from services.stream.accumulator import run

    run(settings_of(ctx), loglevel=loglevel)


def retrain(
    ctx: typer.Context,
    reason: str = typer.Option(..., "--reason", help="Why; recorded with the request"),
    override: list[str] = typer.Option([], "--override", help="Setting for this retrain only: section.field=value"),
) -> None:
    """Publish a manual RetrainRequest over the rows stored so far."""
    from deploy.clients import ensure_topics
    from schemas.settings import parse_overrides
    from services.store import create_schema, make_engine
    from services.trigger.trigger import emit_manual

    settings = settings_of(ctx)
    try:
        overrides = parse_overrides(override)
        engine = make_engine(settings)
        create_schema(engine)
        with _clear_errors(settings):
            ensure_topics(settings)
            request = emit_manual(settings, reason, overrides, getpass.getuser(), engine=engine)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    console.print(
        f"retrain request [bold]{request.request_id}[/] (watermark {request.watermark}, "
        f"snapshot {request.snapshot_id}) -> {settings.kafka.requests_topic}"
    )


def register(app: typer.Typer) -> None:
    """Add these commands to the root app."""
    app.command()(publish)
    app.command()(retrain)
    serve_group(app).command("accumulator")(accumulator)
