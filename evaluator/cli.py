"""`medretrain` commands of the evaluator stage.

medretrain evaluate --run <run_id>                 # score vs champion, gate, report, register/promote
medretrain registry review [--version V]           # champion vs challenger, sample answers, report link
medretrain registry promote V [--force --reason ...]
medretrain registry reject V --reason ...
medretrain registry rollback [--reason ...]
medretrain registry history
"""

from __future__ import annotations

import getpass

import typer
from rich.console import Console
from rich.table import Table

console = Console()

registry_app = typer.Typer(help="Review and move the challenger/champion aliases (every action is recorded).")

ActorOption = typer.Option(None, "--actor", help="Who acts (default: the login name)")


def _settings(ctx: typer.Context):
    from deploy.cli_context import settings_of

    return settings_of(ctx)


def _fail(error: Exception) -> typer.Exit:
    console.print(f"[red]{error}[/red]")
    return typer.Exit(1)


def _act(action, *args):
    """Run a registry action; refusals (failed gate, missing reason, no earlier champion) exit 1 with the reason."""
    from evaluator.promotion import RegistryError

    try:
        return action(*args)
    except (RegistryError, ValueError) as e:
        raise _fail(e) from e


def evaluate_command(
    ctx: typer.Context, run_id: str = typer.Option(..., "--run", help="MLflow run id of a training run")
) -> None:
    """Evaluate a trained adapter against the champion, record the decision and register it."""
    import evaluator
    from evaluator.evaluate import candidate_from_run
    from evaluator.report import report_link

    settings = _settings(ctx)
    try:
        verdict = evaluator.run(settings, candidate_from_run(settings, run_id))
    except (LookupError, ValueError, RuntimeError) as e:
        raise _fail(e) from e
    _print_rules(verdict)
    colour = "green" if verdict.passed else "red"
    console.print(
        f"[{colour}]gate {'passed' if verdict.passed else 'failed'}[/{colour}]; report: {report_link(settings, run_id)}"
    )


def _print_rules(verdict) -> None:
    table = Table(title="Gate rules")
    for column in ("rule", "verdict", "metric", "value", "threshold"):
        table.add_column(column)
    for r in verdict.rules:
        value = "missing" if r.value is None else f"{r.value:.4g}"
        shown = "[green]pass[/green]" if r.passed else "[red]FAIL[/red]"
        table.add_row(r.name, shown, r.metric, value, f"{r.op} {r.threshold:g}")
    console.print(table)


def _print_metrics(verdict, champion: str | None, challenger: str) -> None:
    base, cand = verdict.metrics["baseline"], verdict.metrics["candidate"]
    table = Table(title=f"champion v{verdict.baseline_version} (at evaluation) vs challenger v{challenger}")
    for column in ("metric", "champion", "challenger", "delta"):
        table.add_column(column, justify="right" if column != "metric" else "left")
    for key in sorted(cand):
        b = base.get(key)
        delta = "" if b is None else f"{cand[key] - b:+.4g}"
        table.add_row(key, "missing" if b is None else f"{b:.4g}", f"{cand[key]:.4g}", delta)
    console.print(table)
    if champion != verdict.baseline_version:
        judged = verdict.baseline_version
        console.print(
            f"[yellow]note: the champion is now v{champion}, not the v{judged} it was judged against[/yellow]"
        )


def _print_samples(samples: dict, shown: int) -> None:
    for set_name, rows in sorted(samples.items()):
        table = Table(title=f"sample answers: {set_name}", show_lines=True)
        for column in ("question", "champion", "challenger"):
            table.add_column(column, overflow="fold", ratio=1)
        for row in rows[:shown]:
            table.add_row(
                row["question"], row["champion"] or "[dim](empty)[/dim]", row["candidate"] or "[dim](empty)[/dim]"
            )
        console.print(table)


@registry_app.command("review")
def review_command(
    ctx: typer.Context,
    version: str = typer.Option(None, "--version", help="Version to review (default: the challenger)"),
    samples_shown: int = typer.Option(3, "--samples", help="Sample answers shown per set"),
) -> None:
    """Champion vs challenger: metrics, deltas, rule verdicts, sample answers, report link."""
    from deploy.registry import CHALLENGER, CHAMPION, alias_version, open_registry
    from evaluator.decision import read_decision
    from evaluator.report import report_link

    settings = _settings(ctx)
    client, name = open_registry(settings)
    version = version or alias_version(client, name, CHALLENGER)
    if version is None:
        raise _fail(LookupError(f"{name} has no challenger to review"))
    try:
        run_id = client.get_model_version(name, version).run_id
        verdict, samples = read_decision(settings, run_id)
    except Exception as e:
        raise _fail(LookupError(f"{name} version {version} has no readable decision record: {e}")) from e
    _print_metrics(verdict, alias_version(client, name, CHAMPION), version)
    _print_rules(verdict)
    _print_samples(samples, samples_shown)
    console.print(f"report: {report_link(settings, run_id)}")


@registry_app.command("promote")
def promote_command(
    ctx: typer.Context,
    version: str = typer.Argument(..., help="Model version to make champion"),
    force: bool = typer.Option(False, "--force", help="Override a failed gate or a rejection (needs --reason)"),
    reason: str = typer.Option("", "--reason", help="Why (required with --force)"),
    actor: str = ActorOption,
) -> None:
    """Make a version the champion."""
    from evaluator import promotion

    action = _act(promotion.promote, _settings(ctx), version, actor or getpass.getuser(), reason, force)
    console.print(f"[green]version {version} is champion[/green] ({action.action} by {action.actor})")


@registry_app.command("reject")
def reject_command(
    ctx: typer.Context,
    version: str = typer.Argument(..., help="Model version to reject"),
    reason: str = typer.Option(..., "--reason", help="Why it is rejected"),
    actor: str = ActorOption,
) -> None:
    """Reject a version: it loses the challenger alias and needs --force to be promoted later."""
    from evaluator import promotion

    _act(promotion.reject, _settings(ctx), version, actor or getpass.getuser(), reason)
    console.print(f"version {version} rejected")


@registry_app.command("rollback")
def rollback_command(
    ctx: typer.Context,
    reason: str = typer.Option("", "--reason", help="Why"),
    actor: str = ActorOption,
) -> None:
    """Give the champion alias back to the previous champion."""
    from evaluator import promotion

    action = _act(promotion.rollback, _settings(ctx), actor or getpass.getuser(), reason)
    console.print(f"[yellow]champion is version {action.version} again[/yellow]")


@registry_app.command("history")
def history_command(ctx: typer.Context) -> None:
    """Every recorded registry action, oldest first."""
    from deploy.registry import open_registry
    from evaluator import promotion

    settings = _settings(ctx)
    client, name = open_registry(settings)
    table = Table(title=f"{name}: champion history {promotion.champion_history(client, name)}")
    for column in ("at (UTC)", "version", "action", "actor", "reason"):
        table.add_column(column, overflow="fold")
    for a in promotion.history(settings):
        table.add_row(a.at.strftime("%Y-%m-%d %H:%M:%S"), a.version, a.action, a.actor, a.reason)
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the root app."""
    app.command("evaluate")(evaluate_command)
    app.add_typer(registry_app, name="registry")
