"""`medretrain tune`: the trainer's search from the command line, against the stack's Ray head.

    medretrain tune --samples 8 --out .medretrain/tuned/best_train.json

``medretrain train`` lives in ``services/loop/cli.py``: it resolves stored request ids from the service store.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from deploy.cli_context import settings_of

console = Console()


def tune_command(
    ctx: typer.Context,
    samples: int | None = typer.Option(None, "--samples", min=1, help="Trials (default tune.num_samples)"),
    snapshot: str | None = typer.Option(None, "--snapshot", help="Tune on this snapshot plus replay"),
    out: Path | None = typer.Option(
        None, "--out", help="Best train overrides JSON (default <stack home>/tuned/best_train.json)"
    ),
) -> None:
    """ASHA search over lr, LoRA r/alpha and batch size; writes the best config for train.tuned_config."""
    from schemas.settings import with_overrides
    from trainer.tune import run_tune

    settings = settings_of(ctx)
    if samples is not None:
        settings = with_overrides(settings, {"tune": {"num_samples": samples}})
    out = out or settings.stack.home / "tuned" / "best_train.json"
    console.print_json(data=run_tune(settings, snapshot, out)["train"])
    console.print(
        f"use it: [bold]medretrain --set train.tuned_config={out} train ...[/bold] "
        f"or MEDRETRAIN_TRAIN__TUNED_CONFIG={out}"
    )


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the root app."""
    app.command("tune")(tune_command)
