"""MedQuAD: convert the raw NIH XML collections into the one shipped gzip JSONL, and read it back.

Build (once, output committed to the repo)::

    medretrain data build-medquad --src ../shared/data/MedQuAD

Read at runtime (no raw data needed)::

    from trainer.medquad import load_medquad
    train = load_medquad("train")

Each row is a :class:`schemas.data.MedQuADPair`. Documents, not pairs, are split: the
split is a hash of ``<source>/<document_id>`` (document ids repeat across collections),
so every pair of one document lands in the same split on every machine.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

from schemas.data import MedQuADPair, Split
from schemas.events import MAX_ANSWER_CHARS

logger = logging.getLogger(__name__)

SHIPPED_PATH = Path(__file__).resolve().parent.parent / "data" / "medquad" / "medquad.jsonl.gz"

SPLIT_PERCENT: tuple[tuple[Split, int], ...] = (("train", 70), ("validation", 5), ("test", 10), ("production", 15))
"""Share of documents per split, in percent; "production" documents play the live stream."""

_SPACES = re.compile(r"[ \t\r\f\v\u00a0]+")


def split_of(source: str, document_id: str) -> Split:
    """The split of a document: stable across machines and Python versions (sha256, not ``hash``)."""
    digest = hashlib.sha256(f"{source}/{document_id}".encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") % 100
    for split, percent in SPLIT_PERCENT:
        if bucket < percent:
            return split
        bucket -= percent
    raise AssertionError("SPLIT_PERCENT must sum to 100")


def normalize_answer(text: str) -> str:
    """Collapse runs of spaces inside lines and drop blank lines; paragraph breaks stay as single newlines.

    The few answers longer than the contract allows are cut at the last line break that fits,
    so a cut never ends mid-sentence where a paragraph end is available.
    """
    lines = (_SPACES.sub(" ", line).strip() for line in text.splitlines())
    answer = "\n".join(line for line in lines if line)
    if len(answer) <= MAX_ANSWER_CHARS:
        return answer
    head = answer[:MAX_ANSWER_CHARS]
    cut = head.rfind("\n")
    return head[:cut] if cut > 0 else head


def find_documents(src: Path) -> list[Path]:
    """The collection XML files under ``src`` (``<n>_<Collection>_QA/*.xml``), in a fixed order."""
    if not src.is_dir():
        raise FileNotFoundError(f"MedQuAD source {src} is not a directory (expected the unpacked MedQuAD repository)")
    files = sorted(src.glob("*/*.xml"), key=lambda p: (p.parent.name, p.name))
    if not files:
        raise ValueError(f"no MedQuAD XML under {src}: expected folders like {src}/1_CancerGov_QA/*.xml")
    return files


def parse_document(path: Path) -> Iterator[MedQuADPair]:
    """Pairs of one MedQuAD XML document that have an answer (3 MedlinePlus collections ship none)."""
    try:
        doc = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{path} is not valid MedQuAD XML: {e}") from e
    if doc.tag == "doc":
        # Four NINDS files use an older lower-case schema; the reference count of 16,407 pairs leaves them out.
        logger.warning("skipping %s: legacy <doc> schema", path)
        return
    # One CDC file is a <DiseaseFile fid=...>; every other one is a <Document id=...>.
    source, document_id = doc.get("source"), doc.get("id") or doc.get("fid")
    if doc.tag not in ("Document", "DiseaseFile") or not source or not document_id:
        raise ValueError(f"{path}: expected <Document id=... source=...> as the root element")
    focus = " ".join((doc.findtext("Focus") or "").split()) or None
    split = split_of(source, document_id)
    for pair in doc.iter("QAPair"):
        question, answer = pair.find("Question"), normalize_answer(pair.findtext("Answer") or "")
        if question is None or not answer or not (question.text or "").strip():
            continue
        yield MedQuADPair(
            question=" ".join(question.text.split()),
            answer=answer,
            qtype=question.get("qtype") or None,
            focus=focus,
            source=source,
            document_id=document_id,
            split=split,
        )


def build_medquad(src: Path, out: Path, on_file: Callable[[Path], None] | None = None) -> tuple[Path, int]:
    """Convert every collection under ``src`` into ``out/medquad.jsonl.gz``; returns (path, rows written).

    The gzip header carries no time stamp, so the same input always gives the same bytes.
    Written to a temporary file first: a failed run leaves any previous output untouched.
    """
    files = find_documents(src)
    out.mkdir(parents=True, exist_ok=True)
    target = out / SHIPPED_PATH.name
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    rows = 0
    try:
        with partial.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
            for path in files:
                for pair in parse_document(path):
                    line = json.dumps(pair.model_dump(mode="json", exclude_none=True), ensure_ascii=False)
                    gz.write(line.encode() + b"\n")
                    rows += 1
                if on_file:
                    on_file(path)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target, rows


def load_medquad(split: Split | None = None, path: Path | None = None) -> list[MedQuADPair]:
    """Rows of the shipped MedQuAD file (or ``path``), optionally of one split only."""
    path = path or SHIPPED_PATH
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: rebuild it with `medretrain data build-medquad --src <MedQuAD dir>`")
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        pairs = (MedQuADPair.model_validate_json(line) for line in lines)
        return [pair for pair in pairs if split is None or pair.split == split]
