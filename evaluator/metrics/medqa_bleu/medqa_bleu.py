"""Corpus BLEU for medretrain, loaded offline by path: ``evaluate.load("evaluator/metrics/medqa_bleu")``.

Wraps ``sacrebleu.corpus_bleu`` with its default tokenizer (13a) and one reference per
prediction, so the value equals sacrebleu's own (0-100 scale).
"""

import datasets
import evaluate
import sacrebleu

_DESCRIPTION = "Corpus BLEU (sacrebleu defaults, one reference per prediction), 0-100."

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated answers.
    references: list of reference answers, one per prediction.
Returns:
    bleu: corpus BLEU score in [0, 100]; 0.0 for an empty list.
"""


class MedqaBleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Post, A Call for Clarity in Reporting BLEU Scores, 2018",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        if not predictions:
            return {"bleu": 0.0}
        return {"bleu": sacrebleu.corpus_bleu(list(predictions), [list(references)]).score}
