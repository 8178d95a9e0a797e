"""Generation metrics through the project-local `evaluate` modules equal the libraries called directly."""

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from evaluator import scoring

PREDICTIONS = [
    "Glaucoma is a group of eye diseases that damage the optic nerve.",
    "Take the medicine twice daily with food.",
    "",
    "Diabetes is a disease in which blood glucose levels are too high.",
]
REFERENCES = [
    "Glaucoma is a group of diseases that can damage the eye's optic nerve and result in vision loss.",
    "The medication should be taken two times a day with meals.",
    "Anemia is a condition in which the blood lacks healthy red blood cells.",
    "Diabetes is a disease that occurs when your blood glucose, also called blood sugar, is too high.",
]


def test_rouge_l_matches_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    pairs = zip(PREDICTIONS, REFERENCES, strict=True)
    expected = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in pairs) / len(PREDICTIONS)
    assert expected > 0.1
    assert scoring.overlap_scores(PREDICTIONS, REFERENCES)["rougeL"] == pytest.approx(expected, abs=1e-12)


def test_bleu_matches_sacrebleu():
    expected = sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score
    assert expected > 1.0
    assert scoring.overlap_scores(PREDICTIONS, REFERENCES)["bleu"] == pytest.approx(expected, abs=1e-9)


def test_identical_answers_score_perfectly():
    assert scoring.overlap_scores(REFERENCES, REFERENCES) == pytest.approx({"rougeL": 1.0, "bleu": 100.0})
    assert scoring.overlap_scores([], []) == {"rougeL": 0.0, "bleu": 0.0}


@pytest.mark.parametrize(
    ("text", "degenerate"),
    [
        ("", True),
        ("   \n", True),
        ("Yes.", False),
        ("Glaucoma damages the optic nerve and can lead to blindness if untreated.", False),
        ("the the the the the the the the the the", True),
        ("blood pressure is high blood pressure is high blood pressure is high blood pressure", True),
        ("ennialennialennialennialennialennialennialennial", True),
        ("Rim Rim Rim Rim", True),
        ("Take 1000 mg daily.", False),
        ("Symptoms include fever, cough, and fatigue; see a doctor if they last more than 3 days.", False),
    ],
)
def test_is_degenerate(text, degenerate):
    assert scoring.is_degenerate(text) is degenerate


def test_score_answers_rates_and_lengths():
    scores = scoring.score_answers(PREDICTIONS, REFERENCES)
    assert scores["empty_rate"] == pytest.approx(0.25)
    assert scores["degenerate_rate"] == pytest.approx(0.25)
    lengths = [len(p.split()) for p in PREDICTIONS]
    assert scores["len_mean"] == pytest.approx(sum(lengths) / 4)
    assert scores["len_median"] == pytest.approx(sorted(lengths)[1] / 2 + sorted(lengths)[2] / 2)
    assert set(scores) == set(scoring.GENERATION_METRICS)


def test_score_answers_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="3 predictions for 4 references"):
        scoring.score_answers(PREDICTIONS[:3], REFERENCES)
