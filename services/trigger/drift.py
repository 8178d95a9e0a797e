"""Drift statistics: is a window of live questions drawn from the champion's training distribution?

    result = detect(reference, window, settings.drift)    # both are QuestionSample
    if result.drift:
        signal_drift(settings, result.evidence())

Four tests, one decision:

- ``embedding``: MMD² (unbiased, RBF kernel, median-heuristic bandwidth) between sentence embeddings;
- ``source`` and ``qtype``: chi-squared statistic of the reference-vs-window table (categories
  rare in both pooled into one);
- ``length``: Kolmogorov-Smirnov statistic of question lengths in characters.

Every p-value comes from one set of permutations of *topics* (the events' ``focus``), not of
questions. Questions about one topic come in bunches (a MedQuAD document asks 5-20, all from one
source, their lengths tied to the topic's name), so questions are not independent draws: tests
that assume they are (chi-squared and KS tables, a question-level permutation) fired on 7% of
in-distribution windows at alpha 0.05 (bench/drift_calibration.py). Moving whole topics between
the two sides keeps that dependence in the null distribution. Questions without a topic are
their own topic, which is the plain permutation test.

Drift is declared when Holm's step-down procedure rejects any test at ``alpha``, which keeps
the family-wise false-alarm rate of one check at ``alpha`` whatever the tests' dependence.
The live loop and MLflow reports are in :mod:`services.trigger.drift_monitor`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

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
    """Topics of each side: the units the permutations move."""
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


def topic_groups(reference: QuestionSample, window: QuestionSample) -> np.ndarray:
    """A group id per pooled row (reference rows first): one group per topic and side, untopical rows alone."""
    ids: dict[tuple[int, str], int] = {}
    groups = []
    for side, sample in ((0, reference), (1, window)):
        for i, topic in enumerate(sample.topics or [None] * len(sample)):
            key = (side, (topic or "").strip().lower() or f"#{side}:{i}")
            groups.append(ids.setdefault(key, len(ids)))
    return np.array(groups, dtype=np.int64)


def permutation_labels(groups: np.ndarray, window_rows: int, permutations: int, rng: np.random.Generator) -> np.ndarray:
    """0/1 matrix (rows, permutations + 1): column 0 marks the observed window (the last ``window_rows`` rows),
    each other column as many whole groups as the window has, drawn at random."""
    n_groups = int(groups.max()) + 1
    window_groups = len(np.unique(groups[len(groups) - window_rows:]))
    chosen = np.zeros((n_groups, permutations + 1), dtype=np.float32)
    chosen[np.unique(groups[len(groups) - window_rows:]), 0] = 1.0
    for b in range(1, permutations + 1):
        chosen[rng.choice(n_groups, size=window_groups, replace=False), b] = 1.0
    return chosen[groups]


def _p_value(statistics: np.ndarray) -> float:
    """Share of labellings (the observed one included) whose statistic reaches the observed one."""
    return float(np.sum(statistics >= statistics[0] - 1e-12)) / len(statistics)


def rbf_kernel(pooled: np.ndarray, rng: np.random.Generator, median_rows: int = 1000) -> tuple[np.ndarray, float]:
    """Float32 RBF kernel over the rows; bandwidth = median pairwise distance of at most ``median_rows`` rows."""
    pooled = pooled.astype(np.float32)
    sq = np.einsum("ij,ij->i", pooled, pooled)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (pooled @ pooled.T), 0.0)
    rows = rng.choice(len(pooled), size=min(median_rows, len(pooled)), replace=False)
    upper = np.triu_indices(len(rows), k=1)
    sigma2 = float(np.median(d2[np.ix_(rows, rows)][upper])) or 1.0  # identical points only: MMD is 0 anyway
    return np.exp(-d2 / np.float32(2.0 * sigma2)), float(np.sqrt(sigma2))


def mmd_test(pooled: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> tuple[TestResult, np.ndarray]:
    """Unbiased MMD² for every labelling (rows of ``pooled``: reference then window); also the window's witness.

    Every MMD² term is a sum over K[w, w] or over the row sums of w, so one matrix product
    K @ labels scores all permutations at once.
    """
    kernel, sigma = rbf_kernel(pooled, rng)
    w = labels.astype(np.float64)
    m = w.sum(axis=0)
    n = len(pooled) - m
    if m.min() < 2 or n.min() < 2:
        raise ValueError("MMD needs at least 2 reference and 2 window rows in every labelling")
    row_sums = kernel.sum(axis=1, dtype=np.float64)
    total = float(row_sums.sum())
    cross = np.einsum("ib,ib->b", w, (kernel @ labels).astype(np.float64))
    window_rows = row_sums @ w
    yy = cross - m  # an RBF kernel is 1 on the diagonal
    xy = window_rows - cross
    xx = total - 2.0 * window_rows + cross - n
    mmd2 = xx / (n * (n - 1)) + yy / (m * (m - 1)) - 2.0 * xy / (n * m)
    observed = labels[:, 0] > 0
    witness = kernel[np.ix_(observed, observed)].mean(axis=1) - kernel[np.ix_(observed, ~observed)].mean(axis=1)
    detail = {"bandwidth": sigma, "null_mean": float(mmd2[1:].mean())}
    return TestResult(statistic=float(mmd2[0]), p_value=_p_value(mmd2), detail=detail), witness


def _kept_categories(reference: Counter, window: Counter, window_size: int, min_expected: float) -> list[str]:
    """Categories kept apart; the rest go to :data:`OTHER`."""
    ref_total = sum(reference.values())
    return [c for c in sorted(set(reference) | set(window))
            if (ref_total and window_size * reference[c] / ref_total >= min_expected) or window[c] >= min_expected]


def _chi2(window_counts: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """Chi-squared of the 2 x k tables [totals - window_counts; window_counts], one per row of window_counts."""
    m = window_counts.sum(axis=1, keepdims=True)
    n = totals.sum() - m
    share = totals / totals.sum()
    ref_counts = totals - window_counts
    return (((window_counts - m * share) ** 2 / (m * share)).sum(axis=1)
            + ((ref_counts - n * share) ** 2 / (n * share)).sum(axis=1))


def categorical_test(
    labels_of_rows: Sequence[str], labels: np.ndarray, min_expected: float, top: int = 3
) -> TestResult:
    """Chi-squared statistic of reference vs window categories; the ``top`` categories that shifted most."""
    observed = labels[:, 0] > 0
    values = np.array(labels_of_rows, dtype=object)
    ref_counts, win_counts = Counter(values[~observed]), Counter(values[observed])
    kept = _kept_categories(ref_counts, win_counts, int(observed.sum()), min_expected)
    column = {c: i for i, c in enumerate(kept)}
    codes = np.array([column.get(v, len(kept)) for v in values])
    names = [*kept, OTHER]
    one_hot = np.zeros((len(values), len(names)), dtype=np.float32)
    one_hot[np.arange(len(values)), codes] = 1.0
    totals = one_hot.sum(axis=0).astype(np.float64)
    present = totals > 0
    if present.sum() < 2:
        return TestResult(statistic=0.0, p_value=1.0, detail={"top_shifted": []})
    window_counts = (labels.T @ one_hot).astype(np.float64)[:, present]
    names, totals = [c for c, keep in zip(names, present, strict=True) if keep], totals[present]
    chi2 = _chi2(window_counts, totals)
    win, ref = window_counts[0], totals - window_counts[0]
    expected = win.sum() * totals / totals.sum()
    order = np.argsort(-((win - expected) ** 2 / expected))[:top]
    top_shifted = [
        {
            "category": str(names[i]),
            "reference_share": round(float(ref[i] / ref.sum()), 4),
            "window_share": round(float(win[i] / win.sum()), 4),
        }
        for i in order
    ]
    return TestResult(statistic=float(chi2[0]), p_value=_p_value(chi2), detail={"top_shifted": top_shifted})


def length_test(lengths: np.ndarray, labels: np.ndarray) -> TestResult:
    """Kolmogorov-Smirnov statistic of reference vs window question lengths, for every labelling."""
    order = np.argsort(lengths, kind="stable")
    sorted_lengths = lengths[order]
    # The empirical CDFs may only be compared after the last of equal lengths.
    block_ends = np.flatnonzero(np.append(sorted_lengths[1:] != sorted_lengths[:-1], True))
    w = labels[order].astype(np.float64)
    window_cdf = np.cumsum(w, axis=0)[block_ends] / w.sum(axis=0)
    reference_cdf = np.cumsum(1.0 - w, axis=0)[block_ends] / (1.0 - w).sum(axis=0)
    ks = np.abs(window_cdf - reference_cdf).max(axis=0)
    observed = labels[:, 0] > 0
    detail = {
        "reference_median": float(np.median(lengths[~observed])),
        "window_median": float(np.median(lengths[observed])),
    }
    return TestResult(statistic=float(ks[0]), p_value=_p_value(ks), detail=detail)


def holm(p_values: dict[str, float], alpha: float) -> dict[str, bool]:
    """Holm's step-down rejections: the k-th smallest p must be <= alpha / (tests - k) and all before it too."""
    rejected = dict.fromkeys(p_values, False)
    for k, (name, p) in enumerate(sorted(p_values.items(), key=lambda item: item[1])):
        if p > alpha / (len(p_values) - k):
            break
        rejected[name] = True
    return rejected


def detect(
    reference: QuestionSample, window: QuestionSample, settings: DriftSettings, examples: int = 5
) -> DriftResult:
    """Run the four tests on shared topic permutations and Holm's correction; seeded by ``settings.seed``."""
    if len(reference) < 2 or len(window) < 2:
        raise ValueError(
            f"drift needs at least 2 reference and 2 window questions, got {len(reference)} and {len(window)}"
        )
    rng = np.random.default_rng(settings.seed)
    groups = topic_groups(reference, window)
    labels = permutation_labels(groups, len(window), settings.permutations, rng)
    embedding, witness = mmd_test(np.concatenate([reference.embeddings, window.embeddings]), labels, rng)
    tests = {
        "embedding": embedding,
        "source": categorical_test(reference.sources + window.sources, labels, settings.min_expected),
        "qtype": categorical_test(reference.qtypes + window.qtypes, labels, settings.min_expected),
        "length": length_test(np.concatenate([reference.lengths, window.lengths]), labels),
    }
    rejected = holm({name: t.p_value for name, t in tests.items()}, settings.alpha)
    tests = {
        name: TestResult(t.statistic, t.p_value, rejected[name], t.detail | {"permutations": settings.permutations})
        for name, t in tests.items()
    }
    n_ref_groups = len(np.unique(groups[: len(reference)]))
    return DriftResult(
        drift=any(rejected.values()),
        alpha=settings.alpha,
        tests=tests,
        examples=[window.questions[i] for i in np.argsort(-witness)[:examples]],
        reference_size=len(reference),
        window_size=len(window),
        reference_topics=n_ref_groups,
        window_topics=int(groups.max()) + 1 - n_ref_groups,
    )


def qtype_label(qtype: str | None) -> str:
    return qtype or NONE_LABEL
