"""The MedQuAD converter: answerless pairs dropped, whitespace normalised, whole documents per split."""

import gzip
import os
from collections import defaultdict
from pathlib import Path

import pytest

from schemas.events import MAX_ANSWER_CHARS
from trainer.medquad import SHIPPED_PATH, build_medquad, find_documents, load_medquad, normalize_answer, split_of

REPO = Path(__file__).resolve().parents[2]
RAW = REPO.parent / "shared" / "data" / "MedQuAD"
"""The raw XML as CI lays it out: ``../shared`` beside the repository (a worktree's parent holds it too)."""


def _document(doc_id: str, source: str, pairs: list[tuple[str, str, str]]) -> str:
    body = "".join(
        f'<QAPair pid="{i}"><Question qid="{doc_id}-{i}" qtype="{qtype}">{q}</Question><Answer>{a}</Answer></QAPair>'
        for i, (qtype, q, a) in enumerate(pairs, 1)
    )
    return (
        f'<?xml version="1.0" encoding="UTF-8"?><Document id="{doc_id}" source="{source}" url="http://x">'
        f"<Focus> Gout\n</Focus><QAPairs>{body}</QAPairs></Document>"
    )


@pytest.fixture
def tiny_medquad(tmp_path: Path) -> Path:
    src = tmp_path / "MedQuAD"
    (src / "1_CancerGov_QA").mkdir(parents=True)
    (src / "10_MPlus_ADAM_QA").mkdir()
    (src / "1_CancerGov_QA" / "0000001_1.xml").write_text(
        _document(
            "0000001_1",
            "CancerGov",
            [
                ("information", "What is  gout ?", "Gout is\n   a form of   arthritis.\n\n\n  It hurts.\t"),
                ("treatment", "How to treat gout ?", "   \n  "),
                ("symptoms", "What are the symptoms of gout ?", "Pain."),
            ],
        )
    )
    (src / "10_MPlus_ADAM_QA" / "0000001.xml").write_text(
        _document("0000001", "ADAM", [("information", "What is gout ?", "")])
    )
    return src


def test_converter_keeps_answered_pairs_with_normalised_text(tiny_medquad: Path, tmp_path: Path) -> None:
    path, rows = build_medquad(tiny_medquad, tmp_path / "out")
    pairs = load_medquad(path=path)
    assert rows == len(pairs) == 2
    first = pairs[0]
    assert (first.question, first.answer) == ("What is gout ?", "Gout is\na form of arthritis.\nIt hurts.")
    expected = ("information", "Gout", "CancerGov", "0000001_1")
    assert (first.qtype, first.focus, first.source, first.document_id) == expected
    assert {p.split for p in pairs} == {split_of("CancerGov", "0000001_1")}
    assert load_medquad("train" if first.split != "train" else "test", path=path) == []


def test_conversion_is_byte_reproducible(tiny_medquad: Path, tmp_path: Path) -> None:
    first, _ = build_medquad(tiny_medquad, tmp_path / "a")
    second, _ = build_medquad(tiny_medquad, tmp_path / "b")
    assert first.read_bytes() == second.read_bytes()


def test_split_depends_on_the_document_and_covers_all_splits() -> None:
    splits = [split_of("GARD", f"{i:07d}") for i in range(2000)]
    assert splits == [split_of("GARD", f"{i:07d}") for i in range(2000)]
    share = {s: splits.count(s) / len(splits) for s in set(splits)}
    assert share["train"] == pytest.approx(0.70, abs=0.04)
    assert share["validation"] == pytest.approx(0.05, abs=0.02)
    assert share["test"] == pytest.approx(0.10, abs=0.03)
    assert share["production"] == pytest.approx(0.15, abs=0.03)


def test_overlong_answer_is_cut_at_a_paragraph_break() -> None:
    paragraph = "word " * 999 + "end."
    answer = normalize_answer("\n".join([paragraph] * 10))
    assert len(answer) <= MAX_ANSWER_CHARS
    assert answer.endswith("end.")


def test_wrong_source_gives_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a directory"):
        find_documents(tmp_path / "missing")
    with pytest.raises(ValueError, match="no MedQuAD XML"):
        find_documents(tmp_path)


def test_broken_xml_names_the_file_and_keeps_previous_output(tiny_medquad: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    path, _ = build_medquad(tiny_medquad, out)
    before = path.read_bytes()
    broken = tiny_medquad / "1_CancerGov_QA" / "0000002_1.xml"
    broken.write_text("<Document id='x' source='CancerGov'><QAPairs>")
    with pytest.raises(ValueError, match="0000002_1.xml"):
        build_medquad(tiny_medquad, out)
    assert path.read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == [path.name]


@pytest.fixture(scope="module")
def real_conversion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not RAW.is_dir():
        if os.environ.get("CI"):  # the provenance check must not pass in CI by skipping
            pytest.fail(f"raw MedQuAD not at {RAW}: CI puts shared/data/MedQuAD beside the repository")
        pytest.skip(f"raw MedQuAD not at {RAW}")
    path, _ = build_medquad(RAW, tmp_path_factory.mktemp("medquad"))
    return path


def test_real_medquad_has_16407_pairs_and_no_document_crosses_splits(real_conversion: Path) -> None:
    pairs = load_medquad(path=real_conversion)
    assert len(pairs) == 16_407
    splits_of_document = defaultdict(set)
    for pair in pairs:
        splits_of_document[(pair.source, pair.document_id)].add(pair.split)
    assert all(len(splits) == 1 for splits in splits_of_document.values())
    assert set().union(*splits_of_document.values()) == {"train", "validation", "test", "production"}


def test_shipped_file_equals_a_fresh_conversion(real_conversion: Path) -> None:
    assert SHIPPED_PATH.read_bytes() == real_conversion.read_bytes()
    with gzip.open(SHIPPED_PATH, "rt") as rows:
        assert sum(1 for _ in rows) == len(load_medquad()) == 16_407


def test_cli_builds_and_reports_splits(tiny_medquad: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from services.cli import build_app

    def run(*args: str):
        return CliRunner().invoke(build_app(), ["data", "build-medquad", *args], env={"COLUMNS": "300"})

    out = tmp_path / "out"
    result = run("--src", str(tiny_medquad), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert len(load_medquad(path=out / SHIPPED_PATH.name)) == 2
    assert "all" in result.output and split_of("CancerGov", "0000001_1") in result.output

    wrong = run("--src", str(tmp_path / "nope"))
    assert wrong.exit_code == 2 and "not a directory" in wrong.output
