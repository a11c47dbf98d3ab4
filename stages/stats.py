"""The statistics of a test score: confidence intervals, paired tests, many comparisons, seed spreads.

Distributions come from scipy; only Holm's step-down adjustment (a sort and a running maximum, which
scipy does not offer) and the summary of a group of seeds are written here.
"""

from __future__ import annotations

import statistics


def wilson_interval(correct: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of the proportion `correct` / `total`.

    Chosen over the normal (Wald) interval because it stays inside [0, 1] and keeps its coverage
    near 100% accuracy, where image classifiers live."""
    from scipy.stats import binomtest

    ci = binomtest(correct, total).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


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
