"""`medretrain train` and `medretrain tune`: the trainer stage from the command line, against the stack's Ray head.

    medretrain train --request rr-threshold-1200-ab12cd34ef567890     # a request the trigger stored
    medretrain train --reason manual --snapshot snap-000123             # an ad-hoc request
    medretrain --set train.max_steps=20 train --reason manual           # no snapshot: MedQuAD replay only
    medretrain tune --samples 8 --out .medretrain/tuned/best_train.json
"""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console

from services.cli import settings_of

console = Console()


def _manual_request(reason: str, snapshot: str | None):
    from schemas.events import RetrainRequest

    # A manual request is new each time (salted by the clock); resubmit with --request <id> to resume one.
    salt = f"{snapshot or ''}:{time.time_ns()}"
    return RetrainRequest(
        request_id=RetrainRequest.derive_id(reason, 0, salt),
        reason=reason,
        watermark=0,
        snapshot_id=snapshot,
        requested_by="cli",
        evidence={"operator": "medretrain train"},
    )


def train_command(
    ctx: typer.Context,
    request: str | None = typer.Option(None, "--request", help="RetrainRequest JSON or the id of a stored request"),
    reason: str = typer.Option("manual", "--reason", help="Reason of an ad-hoc request (without --request)"),
    snapshot: str | None = typer.Option(None, "--snapshot", help="Snapshot id for an ad-hoc request"),
) -> None:
    """Retrain LoRA from the champion with Ray Train (resumes a request trained before)."""
    from trainer.retrain import parse_request, run

    settings = settings_of(ctx)
    if request is not None and snapshot is not None:
        raise typer.BadParameter("--snapshot belongs to an ad-hoc request; a stored request names its own snapshot")
    if reason not in ("threshold", "drift", "manual"):
        raise typer.BadParameter(f"--reason must be threshold, drift or manual, not {reason!r}")
    try:
        retrain_request = parse_request(settings, request) if request else _manual_request(reason, snapshot)
    except (KeyError, ValueError) as e:
        raise typer.BadParameter(str(e)) from e
    console.print(f"training request [bold]{retrain_request.request_id}[/bold]")
    adapter = run(settings, retrain_request)
    console.print_json(adapter.model_dump_json())


def tune_command(
    ctx: typer.Context,
    samples: int | None = typer.Option(None, "--samples", min=1, help="Trials (default tune.num_samples)"),
    snapshot: str | None = typer.Option(None, "--snapshot", help="Tune on this snapshot plus replay"),
    out: Path | None = typer.Option(None, "--out", help="Best train overrides JSON (default <stack home>/tuned/best_train.json)"),
) -> None:
    """ASHA search over lr, LoRA r/alpha and batch size; writes the best config for train.tuned_config."""
    from schemas.settings import with_overrides
    from trainer.tune import run_tune

    settings = settings_of(ctx)
    if samples is not None:
        settings = with_overrides(settings, {"tune": {"num_samples": samples}})
    out = out or settings.stack.home / "tuned" / "best_train.json"
    console.print_json(data=run_tune(settings, snapshot, out)["train"])
    console.print(f"use it: [bold]medretrain --set train.tuned_config={out} train ...[/bold] or MEDRETRAIN_TRAIN__TUNED_CONFIG={out}")


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the root app."""
    app.command("train")(train_command)
    app.command("tune")(tune_command)
