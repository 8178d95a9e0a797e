"""Drift statistics: is a window of live questions drawn from the champion's training distribution?

    result = detect(reference, window, settings.drift)    # both are QuestionSample
    if result.drift:
        signal_drift(settings, result.evidence())

Four tests, one decision, all on one question per topic (``focus``) of each side. Questions
about one topic come in bunches (a MedQuAD document asks 5-20 of them, all from one source, their
lengths tied to the topic's name), so pairs are not independent draws: tests that assume they
are fired on 7% of in-distribution windows at alpha 0.05 (bench/drift_calibration.py). Topics
are the independent units; questions without a topic each count as their own.

- ``embedding``: MMD² (unbiased, RBF kernel, median-heuristic bandwidth) between sentence
  embeddings, p-value from label permutations;
- ``source`` and ``qtype``: chi-squared on the reference-vs-window contingency table
  (categories rare in both pooled, so the approximation holds);
- ``length``: two-sample Kolmogorov-Smirnov on question length in characters.

Drift is declared when Holm's step-down procedure rejects any test at ``alpha``, which keeps
the family-wise false-alarm rate of one check at ``alpha`` whatever the tests' dependence.
The live loop and MLflow reports are in :mod:`services.drift_monitor`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from schemas.settings import DriftSettings

OTHER = "(other)"
"""Pooled bin of categories too rare in the window for chi-squared."""
NONE_LABEL = "(none)"


@dataclass(frozen=True)
class QuestionSample:
    """Questions with their embeddings and categories: a reference or a live window."""

    questions: list[str]
    embeddings: np.ndarray
    """(n, d) unit-length float32 rows, aligned with ``questions``."""
    sources: list[str]
    qtypes: list[str]
    topics: list[str | None] | None = None
    """What each question is about (the event's ``focus``); None or missing: every question its own topic."""

    def __post_init__(self) -> None:
        sizes = {len(self.questions), len(self.embeddings), len(self.sources), len(self.qtypes)}
        if self.topics is not None:
            sizes.add(len(self.topics))
        if len(sizes) != 1:
            raise ValueError(f"a question sample needs one embedding, source and qtype per question, got sizes {sizes}")

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(q) for q in self.questions), dtype=np.int64, count=len(self.questions))

    def __len__(self) -> int:
        return len(self.questions)

    def take(self, index: Sequence[int] | np.ndarray) -> QuestionSample:
        """The rows at ``index``, in that order."""
        def pick(values: list) -> list:
            return [values[i] for i in index]

        return QuestionSample(pick(self.questions), self.embeddings[np.asarray(index, dtype=np.int64)],
                              pick(self.sources), pick(self.qtypes),
                              None if self.topics is None else pick(self.topics))


@dataclass(frozen=True)
class TestResult:
    statistic: float
    p_value: float
    rejected: bool = False
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DriftResult:
    drift: bool
    alpha: float
    tests: dict[str, TestResult]
    examples: list[str]
    """Window questions the reference explains worst (largest MMD witness), for people to read."""
    reference_size: int
    window_size: int
    reference_topics: int
    """Questions left after one per topic: the units the tests count."""
    window_topics: int

    def evidence(self) -> dict[str, Any]:
        """JSON-ready statistics, p-values, top shifted categories and example questions."""
        return {
            "drift": self.drift,
            "alpha": self.alpha,
            "correction": "holm",
            "reference_size": self.reference_size,
            "window_size": self.window_size,
            "reference_topics": self.reference_topics,
            "window_topics": self.window_topics,
            "tests": {name: {"statistic": t.statistic, "p_value": t.p_value, "rejected": t.rejected} | t.detail
                      for name, t in self.tests.items()},
            "examples": self.examples,
        }


def rbf_kernel(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, median_rows: int = 1000) -> tuple[np.ndarray, float]:
    """Float32 RBF kernel over the pooled rows of x and y; bandwidth = median pairwise distance; (K, sigma).

    The median is taken over the pairs of at most ``median_rows`` random pooled rows: the same
    bandwidth within noise, a hundredth of the sorting.
    """
    pooled = np.concatenate([x, y]).astype(np.float32)
    sq = np.einsum("ij,ij->i", pooled, pooled)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (pooled @ pooled.T), 0.0)
    rows = rng.choice(len(pooled), size=min(median_rows, len(pooled)), replace=False)
    upper = np.triu_indices(len(rows), k=1)
    sigma2 = float(np.median(d2[np.ix_(rows, rows)][upper])) or 1.0  # identical points only: MMD is 0 anyway
    return np.exp(-d2 / np.float32(2.0 * sigma2)), float(np.sqrt(sigma2))


def mmd_test(x: np.ndarray, y: np.ndarray, permutations: int, rng: np.random.Generator) -> tuple[TestResult, np.ndarray]:
    """Unbiased MMD² of x (reference) vs y (window), permutation p-value; also each y row's witness value.

    Column b of the 0/1 matrix W marks the window rows of labelling b (column 0: the observed
    one). Every MMD² term is a sum over K[w, w] or over the row sums of w, so one matrix product
    K @ W scores all permutations at once.
    """
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise ValueError(f"MMD needs at least 2 reference and 2 window rows, got {n} and {m}")
    kernel, sigma = rbf_kernel(x, y, rng)
    labels = np.zeros((n + m, permutations + 1), dtype=np.float32)
    labels[n:, 0] = 1.0
    for b in range(1, permutations + 1):
        labels[rng.choice(n + m, size=m, replace=False), b] = 1.0
    row_sums = kernel.sum(axis=1, dtype=np.float64)
    total, trace = float(row_sums.sum()), float(np.trace(kernel))
    cross = np.einsum("ib,ib->b", labels.astype(np.float64), (kernel @ labels).astype(np.float64))
    window_rows = row_sums @ labels.astype(np.float64)
    yy = cross - m  # an RBF kernel is 1 on the diagonal
    xy = window_rows - cross
    xx = total - 2.0 * window_rows + cross - (trace - m)
    mmd2 = xx / (n * (n - 1)) + yy / (m * (m - 1)) - 2.0 * xy / (n * m)
    observed, null = float(mmd2[0]), mmd2[1:]
    p_value = (1.0 + float(np.sum(null >= observed))) / (permutations + 1.0)
    witness = kernel[n:, n:].mean(axis=1) - kernel[n:, :n].mean(axis=1)
    detail = {"bandwidth": sigma, "permutations": permutations, "null_mean": float(null.mean())}
    return TestResult(statistic=observed, p_value=p_value, detail=detail), witness


def _pooled(reference: Counter, window: Counter, window_size: int, min_expected: float) -> list[str]:
    """Categories kept apart; the rest go to :data:`OTHER`."""
    ref_total = sum(reference.values())
    kept = []
    for category in sorted(set(reference) | set(window)):
        expected = window_size * reference[category] / ref_total if ref_total else 0.0
        if expected >= min_expected or window[category] >= min_expected:
            kept.append(category)
    return kept


def categorical_test(reference: Sequence[str], window: Sequence[str], min_expected: float, top: int = 3) -> TestResult:
    """Chi-squared on the 2 x k table reference vs window; the ``top`` categories that shifted most."""
    ref_counts, win_counts = Counter(reference), Counter(window)
    kept = _pooled(ref_counts, win_counts, len(window), min_expected)
    rows = [[ref_counts[c] for c in kept], [win_counts[c] for c in kept]]
    pooled_ref = len(reference) - sum(rows[0])
    pooled_win = len(window) - sum(rows[1])
    if pooled_ref or pooled_win:
        rows[0].append(pooled_ref)
        rows[1].append(pooled_win)
        kept = [*kept, OTHER]
    table = np.array(rows, dtype=np.float64)
    if table.shape[1] < 2:
        return TestResult(statistic=0.0, p_value=1.0, detail={"dof": 0, "top_shifted": []})
    chi2, p_value, dof, expected = stats.chi2_contingency(table, correction=False)
    contributions = ((table[1] - expected[1]) ** 2 / expected[1]).tolist()
    shifted = sorted(zip(kept, contributions, strict=True), key=lambda kc: -kc[1])[:top]
    top_shifted = [
        {"category": c, "reference_share": round(float(table[0, kept.index(c)] / table[0].sum()), 4),
         "window_share": round(float(table[1, kept.index(c)] / table[1].sum()), 4)}
        for c, _ in shifted
    ]
    return TestResult(statistic=float(chi2), p_value=float(p_value), detail={"dof": int(dof), "top_shifted": top_shifted})


def length_test(reference: np.ndarray, window: np.ndarray) -> TestResult:
    """Kolmogorov-Smirnov on question lengths (ties make it conservative, never anti-conservative)."""
    ks = stats.ks_2samp(reference, window)
    detail = {"reference_median": float(np.median(reference)), "window_median": float(np.median(window))}
    return TestResult(statistic=float(ks.statistic), p_value=float(ks.pvalue), detail=detail)


def one_per_topic(sample: QuestionSample, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices keeping one random question per topic; questions without a topic are all kept."""
    if sample.topics is None:
        return np.arange(len(sample))
    seen: set[str] = set()
    keep = []
    for i in rng.permutation(len(sample)):
        topic = (sample.topics[i] or "").strip().lower()
        if not topic:
            keep.append(i)
        elif topic not in seen:
            keep.append(i)
            seen.add(topic)
    return np.sort(np.array(keep, dtype=np.int64))


def holm(p_values: dict[str, float], alpha: float) -> dict[str, bool]:
    """Holm's step-down rejections: the k-th smallest p must be <= alpha / (tests - k) and all before it too."""
    rejected = dict.fromkeys(p_values, False)
    for k, (name, p) in enumerate(sorted(p_values.items(), key=lambda item: item[1])):
        if p > alpha / (len(p_values) - k):
            break
        rejected[name] = True
    return rejected


def detect(reference: QuestionSample, window: QuestionSample, settings: DriftSettings, examples: int = 5) -> DriftResult:
    """Run the four tests and Holm's correction; seeded by ``settings.seed`` so a check is reproducible."""
    rng = np.random.default_rng(settings.seed)
    ref, win = reference.take(one_per_topic(reference, rng)), window.take(one_per_topic(window, rng))
    embedding, witness = mmd_test(ref.embeddings, win.embeddings, settings.permutations, rng)
    tests = {
        "embedding": embedding,
        "source": categorical_test(ref.sources, win.sources, settings.min_expected),
        "qtype": categorical_test(ref.qtypes, win.qtypes, settings.min_expected),
        "length": length_test(ref.lengths, win.lengths),
    }
    rejected = holm({name: t.p_value for name, t in tests.items()}, settings.alpha)
    tests = {name: TestResult(t.statistic, t.p_value, rejected[name], t.detail) for name, t in tests.items()}
    return DriftResult(drift=any(rejected.values()), alpha=settings.alpha, tests=tests,
                       examples=[win.questions[i] for i in np.argsort(-witness)[:examples]],
                       reference_size=len(reference), window_size=len(window),
                       reference_topics=len(ref), window_topics=len(win))


def qtype_label(qtype: str | None) -> str:
    return qtype or NONE_LABEL
