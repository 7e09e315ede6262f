"""Proportions and counts: intervals, binomial tails, and a fraction corrected for a classifier.

Written out rather than taken from ``scipy.stats`` or ``scipy.special``: either import alone is
slower than the rest of a one-field screen's start-up. Tests hold each to SciPy's figures.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["wilson_interval", "binomial_tail", "rogan_gladen"]


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> list[float]:
    """Wilson score interval for a proportion (``[nan, nan]`` when there are no trials).

    Parameters
    ----------
    successes, trials : int
        The count and the number it is out of.
    confidence : float
        Two-sided coverage, 0.95 for a 95% interval.

    Returns
    -------
    list of float
        ``[low, high]``; exactly 0 (1) when no (every) trial succeeded.
    """
    if trials == 0:
        return [float("nan"), float("nan")]
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    n, p = int(trials), int(successes) / int(trials)
    centre, spread = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    scale = 1 + z * z / n
    low = 0.0 if successes == 0 else max(0.0, (centre - spread) / scale)  # exact ends, not float residue
    high = 1.0 if successes == trials else min(1.0, (centre + spread) / scale)
    return [low, high]


def binomial_tail(successes: int, trials: int, rate: float) -> float:
    """``P(X >= successes)`` for ``X ~ Binomial(trials, rate)``, summed in log space.

    The screening call asks it of a sample's Parasitized count: how likely is that many (or
    more) from false alarms alone, at the classifier's false-positive ``rate``?
    """
    k, n = int(successes), int(trials)
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if rate <= 0 or rate >= 1:
        return float(rate >= 1)
    i = np.arange(k, n + 1, dtype=np.float64)
    steps = np.log(np.arange(n, 0, -1, dtype=np.float64)) - np.log(np.arange(1, n + 1, dtype=np.float64))
    log_choose = np.concatenate([[0.0], np.cumsum(steps)])[k:]
    terms = log_choose + i * math.log(rate) + (n - i) * math.log1p(-rate)
    top = terms.max()
    return float(min(1.0, math.exp(top) * np.exp(terms - top).sum()))


def rogan_gladen(fraction: float, sensitivity: float, specificity: float) -> float | None:
    """The true fraction behind an observed one, given the classifier's sensitivity and
    specificity (Rogan and Gladen, 1978), clipped to [0, 1].

    ``None`` where the classifier is no better than chance (``sensitivity + specificity <= 1``),
    as the correction is then undefined.
    """
    youden = sensitivity + specificity - 1
    if youden <= 0:
        return None
    return float(min(1.0, max(0.0, (fraction + specificity - 1) / youden)))
