"""Report files and decision tags from a fixed verdict (no services needed)."""

from __future__ import annotations

from evaluator.decision import decision_tags
from evaluator.report import build_report
from schemas.artifacts import RuleResult, Verdict

VERDICT = Verdict(
    candidate_run_id="run123",
    baseline_version="4",
    passed=False,
    rules=[
        RuleResult(
            name="production_loss_improves",
            metric="delta(production.loss)",
            op="<=",
            threshold=-0.01,
            value=0.2,
            passed=False,
            detail="0.2 <= -0.01: FAIL",
        ),
        RuleResult(
            name="guard",
            metric="relative_delta(medquad.perplexity)",
            op="<=",
            threshold=0.05,
            value=None,
            passed=True,
            detail="missing; on_missing=pass",
        ),
    ],
    metrics={
        "candidate": {"medquad.loss": 2.0, "medquad.perplexity": 7.4, "production.loss": 2.4},
        "baseline": {"medquad.loss": 2.1, "medquad.perplexity": 8.2, "production.loss": 2.2},
    },
)
SAMPLES = {
    "medquad": [
        {"question": "What is <gout>?", "reference": "Arthritis.", "champion": "", "candidate": "A joint disease."}
    ]
}


def test_report_files_are_written_and_escaped(tmp_path):
    history = {"train_loss": [(1, 3.0), (2, 2.5)], "val_loss": [(2, 2.7)]}
    files = build_report(tmp_path, VERDICT, SAMPLES, history)
    assert sorted(f.name for f in files) == ["answer_lengths.png", "loss_curves.png", "metrics.png", "report.html"]
    for f in files:
        assert f.stat().st_size > 500, f.name
    for png in files[:3]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "report.html").read_text()
    assert "gate FAILED" in page and "production_loss_improves" in page and "+0.2" in page
    assert "What is &lt;gout&gt;?" in page and 'src="metrics.png"' in page


def test_report_without_loss_history(tmp_path):
    build_report(tmp_path, VERDICT, SAMPLES, {"train_loss": [], "val_loss": []})
    assert (tmp_path / "loss_curves.png").stat().st_size > 500


def test_decision_tags_hold_every_rule():
    tags = decision_tags(VERDICT)
    assert tags["medretrain.gate.passed"] == "false"
    assert tags["medretrain.gate.baseline_version"] == "4"
    assert tags["medretrain.gate.rule.production_loss_improves"] == "FAIL delta(production.loss)=0.2 <= -0.01"
    assert tags["medretrain.gate.rule.guard"] == "pass relative_delta(medquad.perplexity)=missing <= 0.05"
    assert (
        "production_loss_improves" in tags["medretrain.gate.reasons"] and "guard" not in tags["medretrain.gate.reasons"]
    )
