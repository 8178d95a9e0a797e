"""The ``medretrain`` command line.

    medretrain --help
    medretrain --set trigger.threshold=500 stack up

Each stage registers its own commands (``register(app)`` in ``deploy/cli.py``,
``trainer/cli.py``, ``evaluator/cli.py``, ``services/<stage>/cli.py``); heavy imports stay
inside the commands so ``--help`` is instant.
"""

from __future__ import annotations

import importlib
import logging

import typer
from rich.console import Console
from rich.logging import RichHandler

from schemas.settings import load_settings

console = Console()

COMMAND_MODULES = (
    "deploy.cli",
    "trainer.cli",
    "trainer.assets_cli",
    "evaluator.cli",
    "services.stream.cli",
    "services.loop.cli",
    "services.trigger.cli",
)


def _root(
    ctx: typer.Context,
    overrides: list[str] = typer.Option([], "--set", "-s", help="Override a setting: section.field=value"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging"),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False)],
    )
    # Client libraries narrate every connection at INFO; people want our progress, not theirs.
    for noisy in ("kafka", "aiokafka", "urllib3", "botocore", "faust", "mode"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.ERROR)
    try:
        ctx.obj = load_settings(overrides)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e


def build_app() -> typer.Typer:
    app = typer.Typer(help="Event-driven continual retraining of a medical QA model.", no_args_is_help=True)
    app.callback()(_root)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(app)
    return app


def main() -> None:
    build_app()()
