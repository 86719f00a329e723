"""Uncertainty of the reported numbers: standard errors over documents and intervals for recoveries.

Every score is a mean over documents, so its standard error is the sample standard deviation over documents
divided by sqrt(n). A recovery (student / teacher) pairs the two models on the same documents, so its interval
comes from a paired bootstrap over documents (fixed seed, so reports are reproducible). Two scores are "within
noise" when their difference is inside 1.96 paired standard errors.
"""

from __future__ import annotations

import math
import random

Z95 = 1.96
BOOTSTRAP_SAMPLES = 1000


def mean_se(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and its standard error (None for fewer than two values; both None for none)."""
    n = len(values)
    if n == 0:
        return None, None
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def ratio_ci(
    student: list[float], teacher: list[float], chance: float = 0.0, seed: int = 0, samples: int = BOOTSTRAP_SAMPLES
) -> tuple[float | None, float | None]:
    """95% paired-bootstrap interval of (mean(student) - chance) / (mean(teacher) - chance) over documents.

    Resamples whose teacher mean is not above chance are dropped (the ratio is undefined there); None when fewer
    than half of the resamples are usable or there are fewer than two documents.
    """
    n = len(student)
    if n < 2 or len(teacher) != n:
        return None, None
    rng = random.Random(seed)
    ratios = []
    for _ in range(samples):
        idx = [rng.randrange(n) for _ in range(n)]
        t = sum(teacher[i] for i in idx) / n - chance
        if t <= 0:
            continue
        ratios.append((sum(student[i] for i in idx) / n - chance) / t)
    if len(ratios) < samples // 2:
        return None, None
    ratios.sort()
    return ratios[int(0.025 * len(ratios))], ratios[min(len(ratios) - 1, int(0.975 * len(ratios)))]


def paired_diff(student: list[float], teacher: list[float]) -> tuple[float, float | None]:
    """Mean of student - teacher over the same documents and its standard error."""
    return mean_se([s - t for s, t in zip(student, teacher, strict=True)])


def within_noise(student: list[float], teacher: list[float]) -> bool | None:
    """True when the paired difference is inside 1.96 standard errors (None when it cannot be told)."""
    diff, se = paired_diff(student, teacher)
    if se is None:
        return None
    return abs(diff) <= Z95 * se


def weighted_nll(doc_nll: list[float], doc_tokens: list[int]) -> tuple[float, float | None]:
    """Token-weighted mean NLL over documents and its standard error (ratio estimator, documents as units)."""
    total, count, n = sum(doc_nll), sum(doc_tokens), len(doc_nll)
    mean = total / count
    if n < 2:
        return mean, None
    nbar = count / n
    var = sum((s - mean * c) ** 2 for s, c in zip(doc_nll, doc_tokens, strict=True)) / (n - 1)
    return mean, math.sqrt(var / n) / nbar


def ppl_ratio_ci(
    student_nll: list[float], teacher_nll: list[float], tokens: list[int]
) -> tuple[float, float | None, float | None]:
    """Perplexity ratio student / teacher on the same tokens, with a 95% interval (delta method on log ppl)."""
    diffs = [s - t for s, t in zip(student_nll, teacher_nll, strict=True)]
    mean, se = weighted_nll(diffs, tokens)
    if se is None:
        return math.exp(mean), None, None
    return math.exp(mean), math.exp(mean - Z95 * se), math.exp(mean + Z95 * se)
