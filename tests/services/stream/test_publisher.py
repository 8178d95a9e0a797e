"""Publisher input parsing: bad lines reported with number and reason, deterministic ids."""

from __future__ import annotations

import io
import json

from stream_events import build_event

from services.stream.publisher import BadLine, derive_event_id, medquad_events, parse_record, read_csv, read_jsonl


def test_jsonl_reports_each_bad_line_and_keeps_the_rest():
    good = build_event(1).model_dump_json()
    lines = [good, "", "{broken", json.dumps({"question": "q?", "answer": ""}), "[1]", json.dumps({"question": "Q?",
             "answer": "A.", "source": "s"})]
    out = list(read_jsonl(lines))
    bad = [r for r in out if isinstance(r, BadLine)]
    assert [b.line for b in bad] == [3, 4, 5]
    assert "invalid JSON" in bad[0].reason and "answer" in bad[1].reason and "JSON object" in bad[2].reason
    assert len(out) - len(bad) == 2


def test_missing_event_id_is_derived_from_question_and_answer():
    a = parse_record(1, {"question": "What is flu?", "answer": "A virus.", "source": "s"})
    b = parse_record(2, {"question": " What is flu? ", "answer": "A virus.", "source": "other"})
    assert a.event_id == b.event_id == derive_event_id("What is flu?", "A virus.")
    assert derive_event_id("What is flu?", "A virus!") != a.event_id


def test_csv_rows_validate_and_empty_cells_mean_absent():
    text = (
        "question,answer,source,user_rating\nWhat is X?,X is Y.,csv,4\nWhy?,,csv,\nQ?,A.,csv,9\nQ2?,A2.,csv,1,extra\n"
    )
    out = list(read_csv(io.StringIO(text)))
    assert out[0].user_rating == 4 and out[0].qtype is None
    assert [(r.line, "answer" in r.reason or "user_rating" in r.reason or "cells" in r.reason) for r in out[1:]] == [
        (3, True),
        (4, True),
        (5, True),
    ]


def test_medquad_sample_is_seeded_and_republishing_repeats_ids():
    first = medquad_events(5, seed=7)
    again = medquad_events(5, seed=7)
    assert len(first) == 5 and [e.event_id for e in first] == [e.event_id for e in again]
    assert [e.event_id for e in medquad_events(5, seed=8)] != [e.event_id for e in first]
    assert all(e.event_id == derive_event_id(e.question, e.answer) for e in first)
