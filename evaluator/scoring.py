"""Text metrics of generated answers: ROUGE-L and BLEU through ``evaluate``, degeneracy, lengths.

ROUGE-L and BLEU come from the project-local metric module ``evaluator/metrics/medqa_text``,
loaded by path because the Hugging Face hub is unreachable (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import re
import statistics
from functools import cache
from pathlib import Path

TEXT_METRIC_MODULE = Path(__file__).parent / "metrics" / "medqa_text"

SET_NAMES = ("medquad", "production")
"""Evaluation sets: the MedQuAD test split (forgetting) and the snapshot's production slice (new data)."""
LOSS_METRICS = ("loss", "perplexity", "tokens")
GENERATION_METRICS = ("rougeL", "bleu", "empty_rate", "degenerate_rate", "len_mean", "len_median", "len_p90")
METRIC_NAMES = LOSS_METRICS + GENERATION_METRICS

_REPEATED_UNIT = re.compile(r"(.{1,20}?)\1{2,}", re.DOTALL)
"""A unit of up to 20 characters said three or more times in a row ("ennialennialennialennial")."""
REPEATED_SPAN_SHARE = 0.5
"""Answers of which such runs cover at least this share are loops, even without spaces between words."""
REPETITION_MIN_WORDS = 8
"""Shorter answers are too short to call repetitive."""
REPETITION_MIN_DISTINCT = 0.5
"""Below this share of distinct word trigrams an answer loops ("the the the ..."): a typical bad-adapter collapse."""


@cache
def _text_metric():
    import evaluate

    return evaluate.load(str(TEXT_METRIC_MODULE))


def overlap_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """``rougeL`` (mean F-measure, 0-1) and ``bleu`` (sacrebleu corpus BLEU, 0-100)."""
    scores = _text_metric().compute(predictions=predictions, references=references)
    return {"rougeL": float(scores["rougeL"]), "bleu": float(scores["bleu"])}


def is_degenerate(text: str) -> bool:
    """Empty, made mostly of a short unit repeated, or with fewer than half of its word trigrams distinct."""
    words = text.split()
    if not words:
        return True
    looped = sum(m.end() - m.start() for m in _REPEATED_UNIT.finditer(text))
    if looped >= REPEATED_SPAN_SHARE * len(text):
        return True
    if len(words) < REPETITION_MIN_WORDS:
        return False
    trigrams = list(zip(words, words[1:], words[2:], strict=False))
    return len(set(trigrams)) / len(trigrams) < REPETITION_MIN_DISTINCT


def length_stats(texts: list[str]) -> dict[str, float]:
    """Answer length in words: mean, median and 90th percentile."""
    lengths = [len(t.split()) for t in texts] or [0]
    p90 = statistics.quantiles(lengths, n=10, method="inclusive")[-1] if len(lengths) > 1 else float(lengths[0])
    return {
        "len_mean": statistics.fmean(lengths),
        "len_median": float(statistics.median(lengths)),
        "len_p90": float(p90),
    }


def score_answers(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Every generation metric of one model on one set."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    n = max(len(predictions), 1)
    return {
        **overlap_scores(predictions, references),
        "empty_rate": sum(not p.strip() for p in predictions) / n,
        "degenerate_rate": sum(is_degenerate(p) for p in predictions) / n,
        **length_stats(predictions),
    }
