"""`medretrain` commands that run and show the whole loop.

    medretrain serve orchestrator
    medretrain train --request rr-threshold-1200-ab12cd34ef567890     # a stored request (or its JSON)
    medretrain --set train.max_steps=20 train --reason manual           # an ad-hoc request, MedQuAD replay only
    medretrain demo
    medretrain ask "What are the symptoms of glaucoma?"
    medretrain status
"""

from __future__ import annotations

import time

import typer
from rich.table import Table

from deploy.cli_context import settings_of
from services.cli import console
from services.stream.cli import serve_group


def orchestrator(ctx: typer.Context) -> None:
    """Consume retrain requests, run them as Ray jobs, gate and promote the results."""
    from services.loop.orchestrator import serve

    serve(settings_of(ctx))


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


def _given_request(settings, value: str):
    """A RetrainRequest given as JSON, or the id of one stored by the trigger (resolved here, before Ray)."""
    from schemas.events import RetrainRequest
    from services.store import load_request

    if value.lstrip().startswith("{"):
        return RetrainRequest.model_validate_json(value)
    return load_request(settings, value)


def train(
    ctx: typer.Context,
    request: str | None = typer.Option(None, "--request", help="RetrainRequest JSON or the id of a stored request"),
    reason: str = typer.Option("manual", "--reason", help="Reason of an ad-hoc request (without --request)"),
    snapshot: str | None = typer.Option(None, "--snapshot", help="Snapshot id for an ad-hoc request"),
) -> None:
    """Retrain LoRA from the champion with Ray Train (resumes a request trained before)."""
    from trainer import run

    settings = settings_of(ctx)
    if request is not None and snapshot is not None:
        raise typer.BadParameter("--snapshot belongs to an ad-hoc request; a stored request names its own snapshot")
    if reason not in ("threshold", "drift", "manual"):
        raise typer.BadParameter(f"--reason must be threshold, drift or manual, not {reason!r}")
    try:
        retrain_request = _given_request(settings, request) if request else _manual_request(reason, snapshot)
    except (KeyError, ValueError) as e:
        raise typer.BadParameter(str(e)) from e
    console.print(f"training request [bold]{retrain_request.request_id}[/bold]")
    adapter = run(settings, retrain_request)
    console.print_json(adapter.model_dump_json())


def demo(
    ctx: typer.Context,
    events: int = typer.Option(400, help="Production QA events to publish (threshold: 300)"),
    seed: int = typer.Option(7, help="Seed of the event sample"),
    timeout_s: float = typer.Option(1200, help="Give up waiting for the retrain after this long"),
) -> None:
    """From nothing: stack, base model, services, events, threshold, Ray training, gate, promotion."""
    from services.loop.demo import demo_settings, run_demo

    settings = demo_settings(settings_of(ctx))
    try:
        result = run_demo(settings, events, seed, timeout_s, console)
    except TimeoutError as e:
        console.print(f"[red]demo did not finish[/]: {e}")
        raise typer.Exit(1) from e
    _print_demo(settings, result)
    if result.final.phase != "promoted":
        raise typer.Exit(1)


def _print_demo(settings, result) -> None:
    from evaluator.decision import read_decision

    final = result.final
    console.rule("demo summary")
    console.print(f"retrain {result.request_id}: [bold]{final.phase}[/] ({final.detail})")
    console.print(f"champion: v{result.champion_before} -> v{result.champion_after}; run {final.run_id}")
    if final.run_id:
        verdict, _ = read_decision(settings, final.run_id)
        table = Table("metric", "champion", "candidate", "delta")
        for key, value in sorted(verdict.metrics["candidate"].items()):
            base = verdict.metrics["baseline"].get(key)
            delta = "" if base is None else f"{value - base:+.4f}"
            table.add_row(key, "" if base is None else f"{base:.4f}", f"{value:.4f}", delta)
        console.print(table)
    timing = Table("demo stage", "seconds")
    for name, seconds in result.stages.items():
        timing.add_row(name, f"{seconds:.1f}")
    console.print(timing)
    if result.timeline is not None:
        console.print(_timeline_table(result.timeline))
    console.print(f"MLflow UI: {settings.mlflow.tracking_uri}   services keep running: `medretrain status`")


def _timeline_table(timeline) -> Table:
    """The retrain's stages, then the figures issue 7 sets goals for."""
    table = Table("retrain stage (read back from the store, Ray and MLflow)", "seconds")
    for name, seconds in timeline.stages:
        table.add_row(name, f"{seconds:.1f}")
    table.add_section()
    for label, value in (("threshold -> promotion", timeline.total_s),
                         ("trigger latency (threshold -> Ray job submitted)", timeline.trigger_latency_s),
                         ("Ray job, start to end", timeline.ray_job_s),
                         ("training itself (first step to last validation)", timeline.training_s),
                         ("overhead outside the Ray job (snapshot, submit, evaluate, register)",
                          timeline.outside_ray_job_s),
                         ("overhead outside training itself", timeline.outside_training_s)):
        table.add_row(label, f"{value:.1f}")
    return table


def ask(
    ctx: typer.Context,
    question: str = typer.Argument(..., help="A medical question"),
    version: str = typer.Option("champion", help="Registered version or alias to answer with"),
    max_new_tokens: int = typer.Option(200, help="Answer length limit in tokens"),
) -> None:
    """Answer a question with the current champion (or another version)."""
    from evaluator.inference import generate_answers
    from trainer.registry import load_resolved, resolve

    settings = settings_of(ctx)
    if not question.strip():
        raise typer.BadParameter("the question is empty")
    with console.status(f"loading {settings.mlflow.registered_model}@{version}…"):
        resolved = resolve(settings, version)
        model, tokenizer = load_resolved(resolved)
    answer = generate_answers(
        model.eval(), tokenizer, [question], max_new_tokens, 1, "answer", settings.evaluate.no_repeat_ngram_size
    )[0]
    console.print(f"[dim]{resolved.name} v{resolved.version}[/]")
    console.print(answer or "[yellow](empty answer)[/]")


def status(ctx: typer.Context) -> None:
    """Broker lag, rows since the last snapshot, next trigger, running job, aliases, last decisions."""
    from services.loop.status import collect

    settings = settings_of(ctx)
    s = collect(settings)
    overview = Table(show_header=False)
    overview.add_row("rows since last snapshot", f"{s.rows_since_snapshot} / {s.threshold}")
    left = max(0, s.threshold - s.rows_since_snapshot)
    cooldown = f", cooldown {s.cooldown_left_s:.0f}s left" if s.cooldown_left_s else ""
    overview.add_row("next trigger", f"after {left} more rows{cooldown}")
    lag = ", ".join(f"{k}={v}" for k, v in sorted(s.consumer_lag.items())) or "n/a"
    overview.add_row("accumulator lag (approx.)", lag)
    running = s.in_flight
    overview.add_row("running", "none" if running is None else
                     f"{running['request']} ({running['state']}, "
                     f"job {running.get('ray_job')} {running.get('ray_status', '')})")
    overview.add_row("champion / challenger", f"v{s.champion} / {'v' + s.challenger if s.challenger else 'none'}")
    console.print(overview)
    recent = Table("request", "reason", "state", "version", "attempts", "detail", title="last retrains")
    for r in s.recent:
        recent.add_row(r["request"], r["reason"], r["state"], r["version"] or "", str(r["attempts"]), r["detail"][:80])
    console.print(recent)
    for problem in s.problems:
        console.print(f"[yellow]unavailable[/] {problem}")


def register(app: typer.Typer) -> None:
    """Add these commands to the root app."""
    serve_group(app).command("orchestrator")(orchestrator)
    app.command()(train)
    app.command()(demo)
    app.command()(ask)
    app.command()(status)
