"""`medretrain stack up|down|status`: the embedded stack of real services on 127.0.0.1.

    medretrain stack up
    medretrain stack status
    medretrain stack add-node          # one more Ray node on this machine, joined to the head
    medretrain --set stack.home=/tmp/other stack down
"""

from __future__ import annotations

import logging

import typer

from deploy import process

stack_app = typer.Typer(
    help="The embedded stack: S3 (SeaweedFS), Kafka protocol (Tansu), MLflow, Ray head.", no_args_is_help=True
)


@stack_app.command("up")
def up_command(ctx: typer.Context) -> None:
    """Start every service that is not running yet and wait until all are healthy."""
    from rich.console import Console

    from deploy import stack
    from deploy.cli_context import settings_of
    from deploy.process import ServiceError

    settings = settings_of(ctx)
    console = Console()
    # kafka-python logs every connection at INFO; the progress lines say what matters here.
    logging.getLogger("kafka").setLevel(logging.WARNING)
    with console.status("starting the stack") as spinner:

        def progress(message: str) -> None:
            spinner.update(message)
            if not message.endswith("starting"):
                console.print(f"[green]✓[/] {message}")

        try:
            stack.up(settings, progress=progress)
        except (ServiceError, RuntimeError, FileNotFoundError) as e:
            console.print(f"[red]✗ {e}[/]")
            raise typer.Exit(1) from e
    console.print(f"stack home: {settings.stack.home}")
    _print_status(console, stack.status(settings))


@stack_app.command("down")
def down_command(
    ctx: typer.Context,
    purge: bool = typer.Option(False, "--purge", help="Also delete the stack home and drop its PostgreSQL databases"),
) -> None:
    """Stop the services this stack started (state under the stack home is kept unless --purge)."""
    import shutil

    from rich.console import Console

    from deploy import stack
    from deploy.cli_context import settings_of
    from deploy.embedded.postgres import drop_databases

    settings, console = settings_of(ctx), Console()
    if purge:
        _purge_caches(settings, console)
    for name in stack.APP_SERVICES:
        process.stop(settings.stack.home, name)
    stopped = stack.down(settings, progress=lambda m: console.print(f"[green]✓[/] {m}"))
    if not stopped:
        console.print("nothing was running")
    if purge:
        try:
            dropped = drop_databases(settings)  # first: a refusal (databases still in use) keeps the home
        except RuntimeError as e:
            console.print(f"[red]✗[/] {e}")
            raise typer.Exit(1) from e
        shutil.rmtree(settings.stack.home, ignore_errors=True)
        console.print(f"[green]✓[/] removed {settings.stack.home}; dropped databases {dropped}")


@stack_app.command("add-node")
def add_node_command(ctx: typer.Context) -> None:
    """Start one more Ray node on this machine, joined to the head (custom resource medretrain_node_N)."""
    from rich.console import Console

    from deploy import ray_nodes
    from deploy.cli_context import settings_of
    from deploy.process import ServiceError

    console = Console()
    try:
        name, node_id = ray_nodes.add_node(settings_of(ctx))
    except ServiceError as e:
        console.print(f"[red]✗ {e}[/]")
        raise typer.Exit(1) from e
    console.print(f"[green]✓[/] {name} joined the Ray head as node {node_id}; `medretrain stack down` stops it")


def _purge_caches(settings, console) -> None:
    """The retrains' caches go while S3 still runs: an external S3 (compose, cloud) keeps them past the stack home."""
    from botocore.exceptions import BotoCoreError, ClientError

    from deploy.cache import purge

    try:
        console.print(f"[green]✓[/] removed {purge(settings)} cache entries under {settings.s3.cache_prefix}/")
    except (BotoCoreError, ClientError, RuntimeError) as e:  # S3 down or never set up: nothing reachable to remove
        console.print(f"[yellow]![/] caches not purged from S3 ({e}); the stack home's own S3 data goes with it")


@stack_app.command("status")
def status_command(ctx: typer.Context) -> None:
    """A table of service, URL, healthy, pid; exits 1 if any service is unhealthy."""
    from rich.console import Console

    from deploy import stack
    from deploy.cli_context import settings_of

    statuses = stack.status(settings_of(ctx))
    _print_status(Console(), statuses)
    if not all(s.healthy for s in statuses):
        raise typer.Exit(1)


@stack_app.command("check")
def check_command(ctx: typer.Context) -> None:
    """Probe every configured endpoint (Kafka, S3, MLflow, Ray, database), wherever it runs; exits 1 on failure."""
    from rich.console import Console
    from rich.table import Table

    from deploy.cli_context import settings_of
    from deploy.probe import check

    logging.getLogger("kafka").setLevel(logging.WARNING)
    results = check(settings_of(ctx))
    table = Table("endpoint", "URL", "reachable", "detail")
    for r in results:
        table.add_row(r.name, r.url, "[green]yes[/]" if r.ok else "[red]no[/]", r.detail)
    Console().print(table)
    if not all(r.ok for r in results):
        raise typer.Exit(1)


@stack_app.command("topics")
def topics_command(ctx: typer.Context) -> None:
    """Create medretrain's Kafka topics with the configured partitions (idempotent)."""
    from rich.console import Console

    from deploy.cli_context import settings_of
    from deploy.clients import ensure_topics, topic_names

    settings = settings_of(ctx)
    logging.getLogger("kafka").setLevel(logging.WARNING)
    created = ensure_topics(settings)
    Console().print(f"topics {', '.join(topic_names(settings))}: created {created or 'none (all existed)'}")


def _print_status(console, statuses) -> None:
    from rich.table import Table

    table = Table("service", "URL", "healthy", "pid")
    for s in statuses:
        table.add_row(s.name, s.url, "[green]yes[/]" if s.healthy else "[red]no[/]", str(s.pid or "-"))
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the root app."""
    app.add_typer(stack_app, name="stack")
