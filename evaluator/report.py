"""Evaluation report: HTML plus PNG plots, logged to the candidate's MLflow run under ``report/``.

Plots: metric bars champion vs candidate with deltas, train/validation loss curves from the
run's metric history, and answer length histograms. ``build_report`` is pure (files only);
``log_report`` adds the MLflow reads and the upload.
"""

from __future__ import annotations

import html
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and Ray workers
import matplotlib.pyplot as plt  # noqa: E402

from schemas.artifacts import Verdict  # noqa: E402
from schemas.settings import Settings  # noqa: E402

REPORT_DIR = "report"
BAR_METRICS = ("loss", "perplexity", "rougeL", "bleu", "degenerate_rate", "len_mean")
LOSS_CURVES = ("train_loss", "val_loss")
SAMPLES_SHOWN = 5


def _sets(verdict: Verdict) -> list[str]:
    return sorted({key.split(".", 1)[0] for key in verdict.metrics.get("candidate", {})})


def plot_metric_bars(verdict: Verdict, path: Path) -> Path:
    """One small panel per (set, metric): champion and candidate bars, the delta in the title."""
    sets, base, cand = _sets(verdict), verdict.metrics.get("baseline", {}), verdict.metrics.get("candidate", {})
    fig, axes = plt.subplots(len(sets), len(BAR_METRICS), figsize=(3 * len(BAR_METRICS), 3 * len(sets)), squeeze=False)
    for row, set_name in enumerate(sets):
        for col, metric in enumerate(BAR_METRICS):
            ax, key = axes[row][col], f"{set_name}.{metric}"
            b, c = base.get(key, float("nan")), cand.get(key, float("nan"))
            ax.bar(["champion", "candidate"], [b, c], color=["#7f7f7f", "#1f77b4"])
            ax.set_title(f"{key}\nΔ {c - b:+.4g}", fontsize=9)
            ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_loss_curves(history: dict[str, list[tuple[int, float]]], path: Path) -> Path:
    """Training and validation loss against the optimizer step."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in history.items():
        if points:
            steps, values = zip(*sorted(points), strict=True)
            ax.plot(steps, values, marker="." if len(points) < 50 else None, label=name)
    if any(history.values()):
        ax.legend(loc="upper right")
    else:
        ax.text(0.5, 0.5, "no loss history logged on this run", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("answer-token loss")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_answer_lengths(samples: dict[str, list[dict]], path: Path) -> Path:
    """Word counts of reference, champion and candidate answers, one panel per set."""
    fig, axes = plt.subplots(1, max(len(samples), 1), figsize=(6 * max(len(samples), 1), 4), squeeze=False)
    for ax, (set_name, rows) in zip(axes[0], sorted(samples.items()), strict=False):
        for who in ("reference", "champion", "candidate"):
            ax.hist([len(r[who].split()) for r in rows], bins=20, alpha=0.5, label=who)
        ax.set_title(f"answer length (words): {set_name}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


_STYLE = (
    "body{font-family:sans-serif;margin:2em} table{border-collapse:collapse} "
    "td,th{border:1px solid #ccc;padding:4px;vertical-align:top;max-width:30em}"
)


def _fmt(value: float | None) -> str:
    return "missing" if value is None else f"{value:.4g}"


def render_html(verdict: Verdict, samples: dict[str, list[dict]], images: list[str]) -> str:
    """The report page: verdict, rules, metrics with deltas, plots, a few answers side by side."""
    base, cand = verdict.metrics.get("baseline", {}), verdict.metrics.get("candidate", {})
    nan = float("nan")
    rules = [
        [r.name, "pass" if r.passed else "FAIL", r.metric, f"{r.op} {r.threshold:g}", _fmt(r.value), r.detail]
        for r in verdict.rules
    ]
    metrics = [[k, _fmt(base.get(k)), _fmt(cand[k]), f"{cand[k] - base.get(k, nan):+.4g}"] for k in sorted(cand)]
    rule_columns = ["rule", "verdict", "metric", "threshold", "value", "detail"]
    columns = ["question", "reference", "champion", "candidate"]
    answers = "".join(
        f"<h3>{html.escape(name)}</h3>" + _table(columns, [[r[c] for c in columns] for r in rows[:SAMPLES_SHOWN]])
        for name, rows in sorted(samples.items())
    )
    status = "PASSED" if verdict.passed else "FAILED"
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>medretrain evaluation {verdict.candidate_run_id}</title><style>{_STYLE}</style></head><body>
<h1>Candidate run {html.escape(verdict.candidate_run_id)}: gate {status}</h1>
<p>Baseline: champion version {html.escape(verdict.baseline_version or "none")};
decided {verdict.decided_at.isoformat()}</p>
<h2>Gate rules</h2>{_table(rule_columns, rules)}
<h2>Metrics</h2>{_table(["metric", "champion", "candidate", "delta"], metrics)}
<h2>Plots</h2>{"".join(f'<p><img src="{img}" alt="{img}"></p>' for img in images)}
<h2>Sample answers</h2>{answers}
</body></html>"""


def build_report(
    out_dir: Path, verdict: Verdict, samples: dict[str, list[dict]], history: dict[str, list[tuple[int, float]]]
) -> list[Path]:
    """Write the plots and ``report.html`` into ``out_dir``; returns the files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    images = [
        plot_metric_bars(verdict, out_dir / "metrics.png"),
        plot_loss_curves(history, out_dir / "loss_curves.png"),
        plot_answer_lengths(samples, out_dir / "answer_lengths.png"),
    ]
    page = out_dir / "report.html"
    page.write_text(render_html(verdict, samples, [p.name for p in images]), encoding="utf-8")
    return [*images, page]


def loss_history(client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """(step, value) points of the run's training and validation loss."""
    return {name: [(m.step, m.value) for m in client.get_metric_history(run_id, name)] for name in LOSS_CURVES}


def report_link(settings: Settings, run_id: str) -> str:
    """Where a person opens the report: the run's artifact page in the MLflow UI."""
    from deploy.registry import mlflow_client

    experiment = mlflow_client(settings).get_run(run_id).info.experiment_id
    return f"{settings.mlflow.tracking_uri}/#/experiments/{experiment}/runs/{run_id}/artifacts/{REPORT_DIR}/report.html"


def log_report(settings: Settings, verdict: Verdict, samples: dict[str, list[dict]]) -> str:
    """Build the report and log it to the candidate run; returns its link."""
    from deploy.registry import mlflow_client

    client = mlflow_client(settings)
    with tempfile.TemporaryDirectory(prefix="medretrain-report-") as tmp:
        build_report(Path(tmp), verdict, samples, loss_history(client, verdict.candidate_run_id))
        client.log_artifacts(verdict.candidate_run_id, tmp, artifact_path=REPORT_DIR)
    return report_link(settings, verdict.candidate_run_id)
