"""ROUGE-L for medretrain, loaded offline by path: ``evaluate.load("evaluator/metrics/medqa_rouge")``.

The hub copy of ``rouge`` cannot be fetched here, and its bootstrap aggregation makes the
value differ from a plain mean; this module reports the mean per-pair F-measure exactly as
``rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)`` computes it.
"""

import datasets
import evaluate
from rouge_score import rouge_scorer

_DESCRIPTION = "Mean ROUGE-L F-measure (rouge_score, Porter stemmer) over prediction/reference pairs."

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated answers.
    references: list of reference answers, one per prediction.
Returns:
    rougeL: mean F-measure in [0, 1]; 0.0 for an empty list.
"""


class MedqaRouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Lin, ROUGE: A Package for Automatic Evaluation of Summaries, 2004",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
        return {"rougeL": sum(scores) / len(scores) if scores else 0.0}
