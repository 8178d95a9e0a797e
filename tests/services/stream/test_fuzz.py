"""Property-based fuzzing of event decoding, validation, dead letters and storage (hypothesis, SQLite).

    .venv/bin/pytest tests/services/stream/test_fuzz.py -q

Derandomized, so CI runs the same cases every time. The example budgets (``BUDGET``) add up to
10,000 cases; docs/reliability.md reports the figure.
"""

from __future__ import annotations

import base64
import json
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, select

from schemas.events import DeadLetter, QAEvent
from schemas.settings import load_settings
from services.store import QAEventRow, create_schema, make_engine
from services.stream.ingest import Rejection, SourceRecord, dead_letter, split_batch, store_batch, validate_record

MAX_BYTES, MAX_TEXT = 6_000, 1_500
CONFIG = load_settings([f"kafka.max_message_bytes={MAX_BYTES}", f"stream.max_text_chars={MAX_TEXT}",
                        "database.url=sqlite://"])
BUDGET = {"bytes": 5000, "objects": 2500, "batches": 2500}
CATEGORIES = {"empty_record", "oversize", "undecodable", "invalid_json", "unsupported_version", "empty_field",
              "too_long", "schema", "nul_character"}
INJECTIONS = ["'; DROP TABLE qa_events; --", "\" OR 1=1 --", "$1); DELETE FROM snapshots; --", "%s %(x)s :name ?",
              "Robert'); DROP TABLE students;--", "\\x00\\'", "<script>alert(1)</script>", "${jndi:ldap://x/a}",
              "{{7*7}}", "E'\\\\'", "$$; SELECT pg_sleep(10); $$", "\\"]


def fuzz(budget: str):
    """Hypothesis settings of one property: its share of the case budget, same cases on every run."""
    return settings(max_examples=BUDGET[budget], derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# No whitespace or control characters at the ends: QAEvent strips them, and the round trip compares verbatim.
WORD = st.one_of(st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp")), min_size=1, max_size=10),
                 st.sampled_from(INJECTIONS))
# Strategies are built once: building them per draw costs more than the test itself.
TEXTS = {n: st.lists(WORD, min_size=1, max_size=n).map(" ".join) for n in (1, 3, 12)}
OPTIONAL = {"qtype": TEXTS[3], "focus": TEXTS[3], "model_version": TEXTS[1], "user_rating": st.integers(1, 5)}


@st.composite
def good_events(draw) -> dict:
    """A valid event as the JSON object a producer sends, with text fields as they must be stored."""
    event = {"event_id": str(draw(st.uuids())), "question": draw(TEXTS[3]), "answer": draw(TEXTS[12]),
             "source": draw(TEXTS[1])}
    for name in draw(st.sets(st.sampled_from(sorted(OPTIONAL)))):
        event[name] = draw(OPTIONAL[name])
    return event


def _dump(event: dict, **changes) -> bytes:
    return json.dumps(event | changes).encode()


BREAKERS = {
    # kind: (parameter strategy, how it breaks a valid event); the kind is the rejection category it must get.
    "undecodable": (st.binary(min_size=1, max_size=50), lambda e, b: _dump(e) + b"\xff" + b),
    "invalid_json": (st.floats(0, 0.99), lambda e, f: _dump(e)[: int(f * len(_dump(e)))]),
    "unsupported_version": (st.one_of(st.integers(), st.text(max_size=5), st.none()).filter(lambda v: v != 1),
                            lambda e, v: _dump(e, schema_version=v)),
    "empty_field": (st.tuples(st.sampled_from(["question", "answer"]), st.sampled_from(["", " ", "\t\n"])),
                    lambda e, kv: _dump(e, **{kv[0]: kv[1]})),
    "schema": (st.text(min_size=1, max_size=10).filter(lambda k: k not in QAEvent.model_fields),
               lambda e, k: _dump(e, **{k: 1})),
    "nul_character": (st.sampled_from(["question", "answer", "source"]), lambda e, k: _dump(e, **{k: e[k] + "\x00x"})),
    "too_long": (st.integers(MAX_TEXT + 1, MAX_TEXT + 400), lambda e, n: _dump(e, question="q" * n)),
    "oversize": (st.integers(MAX_BYTES + 1, MAX_BYTES + 2000), lambda e, n: _dump(e, answer="a" * n)),
}
KINDS = st.sampled_from(["good", "good", "junk", *BREAKERS])
JUNK = st.one_of(st.none(), st.binary(max_size=200))


@st.composite
def records(draw) -> tuple[bytes | None, str | None, dict | None]:
    """(value bytes, expected rejection category: None if good, "" if any, the good event or None)."""
    event, kind = draw(good_events()), draw(KINDS)
    if kind == "good":
        return _dump(event), None, event
    if kind == "junk":
        return draw(JUNK), "", None
    parameter, breaks = BREAKERS[kind]
    return breaks(event, draw(parameter)), kind, None


def _check_rejection(raw: bytes | None, rejection: Rejection) -> None:
    """A rejection names a known category and a detail, and its dead letter keeps the original bytes."""
    assert rejection.category in CATEGORIES and rejection.detail
    letter = DeadLetter.model_validate_json(dead_letter(SourceRecord("t", 0, 7, raw), rejection).model_dump_json())
    assert letter.reason.startswith(rejection.category + ": ") and letter.offset == 7
    assert base64.b64decode(letter.original) == (raw or b"")


@fuzz("bytes")
@given(raw=st.one_of(st.none(), st.binary(max_size=MAX_BYTES + 100)))
def test_arbitrary_bytes_never_raise(raw):
    outcome = validate_record(raw, MAX_BYTES, MAX_TEXT)
    if isinstance(outcome, Rejection):
        _check_rejection(raw, outcome)
    else:
        assert isinstance(outcome, QAEvent)


JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30)
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
FIELD_CHANGES = st.dictionaries(st.sampled_from([*QAEvent.model_fields, "extra"]), JSON_VALUES, max_size=4)


@fuzz("objects")
@given(base=good_events(), changes=FIELD_CHANGES)
def test_arbitrary_field_values_never_raise(base, changes):
    """Any JSON in any field: a stored-ready event, or a rejection with a reason."""
    raw = json.dumps(base | changes).encode()
    outcome = validate_record(raw, MAX_BYTES, MAX_TEXT)
    if isinstance(outcome, Rejection):
        _check_rejection(raw, outcome)
    else:
        assert "\x00" not in outcome.question + outcome.answer + outcome.source
        assert 0 < len(outcome.question) <= MAX_TEXT and 0 < len(outcome.answer) <= MAX_TEXT


@pytest.fixture(scope="module")
def engine():
    engine = make_engine(CONFIG)
    create_schema(engine)
    yield engine
    engine.dispose()


@fuzz("batches")
@given(batch=st.lists(records(), min_size=1, max_size=6))
def test_mixed_batches_store_every_good_record_verbatim_and_reject_every_bad_one(engine, batch):
    """The real split + store path: bad records get their category, good ones round-trip exactly once."""
    with engine.begin() as conn:
        conn.execute(delete(QAEventRow))
    source = [SourceRecord("qa.events", i % 2, i, raw) for i, (raw, _, _) in enumerate(batch)]
    split = split_batch(source, CONFIG)
    result, refused = store_batch(engine, split.rows)

    assert refused == []
    expected = {record.offset: category for record, (_, category, _) in zip(source, batch, strict=True)}
    rejected = {record.offset: rejection for record, rejection in split.rejected}
    assert {offset for offset, category in expected.items() if category is not None} == set(rejected)
    for offset, rejection in rejected.items():
        assert expected[offset] in ("", rejection.category), (batch[offset][0], rejection.reason)
        _check_rejection(batch[offset][0], rejection)

    good = {}
    for _, _, event in batch:
        if event is not None:
            good.setdefault(uuid.UUID(event["event_id"]), event)  # a repeated id is a duplicate: first one wins
    assert (result.new, result.duplicates) == (len(good), len(split.rows) - len(good))
    with engine.connect() as conn:
        stored = {uuid.UUID(row.event_id): row for row in conn.execute(select(QAEventRow))}
    assert set(stored) == set(good)
    for event_id, event in good.items():
        row = stored[event_id]
        for name in ("question", "answer", "source", "qtype", "focus", "model_version", "user_rating"):
            assert getattr(row, name) == event.get(name), name
