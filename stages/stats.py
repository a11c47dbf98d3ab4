"""The statistics of a test score: confidence intervals, per-class scores, paired tests, many
comparisons, seed spreads.

McNemar's exact test comes from scipy. Written here: Holm's step-down adjustment (a sort and a running
maximum, which scipy does not offer), the summary of a group of seeds, and the two the evaluate stage
needs, the Wilson interval (a closed formula) and per-class precision/recall/F1 (counts from one
confusion matrix): importing scipy.stats or scikit-learn for them cost the stage 0.7 to 1.5 s of its
few seconds, every run. tests/test_compare.py and tests/test_report.py check them against statsmodels
and scikit-learn.
"""

from __future__ import annotations

import math
import statistics

import numpy as np


def wilson_interval(correct: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of the proportion `correct` / `total`.

    Chosen over the normal (Wald) interval because it stays inside [0, 1] and keeps its coverage
    near 100% accuracy, where image classifiers live."""
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    p, n = correct / total, total
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def per_class_scores(actual: np.ndarray, predicted: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support of each class 0..num_classes-1, from integer labels; a score
    whose denominator is 0 is NaN (undefined, as scikit-learn's zero_division=np.nan): precision of a
    class never predicted, recall of a class with no test image, F1 (2 tp / (2 tp + fp + fn)) of one
    both never predicted and absent. A 0 would read as "always wrong"."""
    confusion = np.bincount(actual * num_classes + predicted, minlength=num_classes ** 2).reshape(num_classes, -1)
    hits = np.diag(confusion).astype(np.float64)
    support, predicted_count = confusion.sum(axis=1), confusion.sum(axis=0)

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        return np.divide(num, den, out=np.full_like(num, np.nan), where=den > 0)

    return {"precision": ratio(hits, predicted_count.astype(np.float64)),
            "recall": ratio(hits, support.astype(np.float64)),
            "f1": ratio(2 * hits, (support + predicted_count).astype(np.float64)),  # 2tp / (2tp + fp + fn)
            "support": support}


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """McNemar's exact p-value (two-sided) for paired right/wrong outcomes on the same images.

    Only the discordant images count: under "A and B are equally good", each of them is equally
    likely to be right in A only or in B only, so `a_only` is Binomial(a_only + b_only, 1/2)."""
    from scipy.stats import binomtest

    if a_only + b_only == 0:
        return 1.0
    return float(binomtest(a_only, a_only + b_only, 0.5, alternative="two-sided").pvalue)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given (scipy has Benjamini-Hochberg only)."""
    m = len(p_values)
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - rank) * p_values[i]))  # never below a smaller p's adjustment
        adjusted[i] = running
    return adjusted


def spread(values: list[float]) -> dict[str, float | None]:
    """Mean, sample standard deviation (None for one value), min and max."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values)}
