"""ROUGE-L and BLEU for medretrain, loaded offline by path: ``evaluate.load("evaluator/metrics/medqa_text")``.

The hub copies of ``rouge`` and ``sacrebleu`` cannot be fetched here, and the hub ``rouge``
aggregates by bootstrap, so its value differs from a plain mean. This module reports:

- ``rougeL``: the mean per-pair F-measure of ``rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)``;
- ``bleu``: ``sacrebleu.corpus_bleu`` with its defaults (13a tokenizer), one reference per prediction, 0-100.
"""

import datasets
import evaluate
import sacrebleu
from rouge_score import rouge_scorer

_DESCRIPTION = "Mean ROUGE-L F-measure (rouge_score, Porter stemmer) and corpus BLEU (sacrebleu) of generated answers."

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated answers.
    references: list of reference answers, one per prediction.
Returns:
    rougeL: mean F-measure in [0, 1]; 0.0 for an empty list.
    bleu: corpus BLEU in [0, 100]; 0.0 for an empty list.
"""

_CITATION = """Lin, ROUGE: A Package for Automatic Evaluation of Summaries, 2004.
Post, A Call for Clarity in Reporting BLEU Scores, 2018."""


class MedqaText(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        if not predictions:
            return {"rougeL": 0.0, "bleu": 0.0}
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        rouge = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]
        bleu = sacrebleu.corpus_bleu(list(predictions), [list(references)]).score
        return {"rougeL": sum(rouge) / len(rouge), "bleu": bleu}
