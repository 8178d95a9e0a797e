"""`medretrain status` on the real stack: rows against the threshold, the aliases, the answer service's feedback.

    .venv/bin/pytest tests/services/loop/test_status_cli.py -q
"""

from __future__ import annotations

import re
import uuid

import pytest
from stream_events import build_event
from stream_stack import close_env, open_env
from typer.testing import CliRunner

from schemas.serving import AnswerEvent, FeedbackRequest
from services.answers.records import record_answer, record_feedback
from services.cli import build_app
from services.store import insert_events
from services.stream.ingest import SourceRecord, event_row
from trainer.model import build_tiny_llama
from trainer.registry import bootstrap

pytestmark = pytest.mark.integration


@pytest.fixture
def env(stack):
    opened = open_env(stack, {"trigger.threshold": 50, "mlflow.registered_model": f"status-{uuid.uuid4().hex[:10]}"})
    yield opened
    close_env(opened)


def row(pattern: str, output: str) -> bool:
    """A table row whose cells match ``pattern``'s cells (``|`` between them), whatever the padding."""
    cells = r"\s*│\s*".join(re.escape(c) for c in pattern.split("|"))
    return re.search(cells, output) is not None


def test_status_shows_rows_to_the_threshold_the_champion_and_feedback_per_version(env, tmp_path):
    bootstrap(env.settings, from_path=build_tiny_llama(tmp_path / "tiny"))
    engine = env.engine()
    with engine.begin() as conn:
        insert_events(conn, [event_row(build_event(i), SourceRecord("t", 0, i, b"")) for i in range(3)])
    for i, feedback in enumerate([(1, None), (1, None), (-1, "The right answer."), None]):
        answer = AnswerEvent(answer_id=uuid.uuid4(), question=f"Q{i}?", answer="A.", model_version="1",
                             alias="champion")
        record_answer(engine, answer)
        if feedback is not None:
            record_feedback(engine, env.settings, FeedbackRequest(answer_id=answer.answer_id, rating=feedback[0],
                                                                  corrected_answer=feedback[1]))
    engine.dispose()

    args = [x for pair in env.overrides for x in ("--set", pair)]
    result = CliRunner().invoke(build_app(), [*args, "status"], env={"COLUMNS": "200"})

    assert result.exit_code == 0, result.output
    assert row("rows since last snapshot|3 / 50", result.output)
    assert row("next trigger|after 47 more rows", result.output)
    assert row("champion / challenger|v1 / none", result.output)
    assert row("answer outbox (not on Kafka yet)|7", result.output)  # 4 answers, 3 verified pairs
    assert row("v1|4|3|67%|33%", result.output)
    assert "unavailable" not in result.output
