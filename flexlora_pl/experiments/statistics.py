"""Statistics over seeds: a summary of one method's scores, and a method's seed-paired difference from a reference.

For the values ``x_1 … x_n`` of one cell (one per seed), :func:`summarize` gives::

    mean      x̄ = Σ x_i / n
    std       s = sqrt(Σ (x_i − x̄)² / (n − 1))            (the sample standard deviation, ddof = 1)
    interval  x̄ ± t_{(1 + c)/2, n − 1} · s / √n           (Student's t with n − 1 degrees of freedom, level c)

For a method and a reference scored on the same seeds, :func:`paired_difference` takes ``d_i = method_i −
reference_i`` over the seeds both have and gives ``d̄``, ``s_d`` and the interval above, the paired t statistic
``t = d̄ / (s_d / √n)`` and its two-sided p value ``2 · P(T_{n − 1} ≥ |t|)``. The difference is *measurable* when
its interval excludes 0 (the same as ``p < 1 − c``); where it holds 0 there is "no measurable difference".
Seeds only one side has are left out of the pairing and reported, never dropped silently.

Below two values (two common seeds) there is no std, interval, t or p: they are ``None``, never 0.
See docs/statistics.md.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = ["NO_MEASURABLE_DIFFERENCE", "PairedDifference", "Summary", "paired_difference", "summarize"]

NO_MEASURABLE_DIFFERENCE = "no measurable difference"
"""The words for a difference whose interval holds 0."""


@dataclass(frozen=True)
class Summary:
    """The values of one cell, summarized.

    Args:
        n: how many values.
        mean: their mean (``None`` without values).
        std: their sample standard deviation, ddof 1 (``None`` below two values).
        low: the lower end of the interval of the mean (``None`` below two values).
        high: its upper end.
        confidence: the interval's level, e.g. 0.95.
    """

    n: int
    mean: float | None
    std: float | None
    low: float | None
    high: float | None
    confidence: float

    @property
    def interval(self) -> tuple[float, float] | None:
        """``(low, high)``, or ``None`` where it is undefined."""
        return None if self.low is None or self.high is None else (self.low, self.high)


@dataclass(frozen=True)
class PairedDifference:
    """A method's scores against a reference's, paired by seed: the mean of ``method − reference``.

    Args:
        n: how many seeds both have (the pairs).
        mean: the mean paired difference (``None`` without a pair).
        std: the pairs' sample standard deviation, ddof 1 (``None`` below two pairs).
        low: the lower end of the mean difference's interval (``None`` below two pairs).
        high: its upper end.
        t: the paired t statistic (``None`` below two pairs, or when every difference is 0).
        p: its two-sided p value (``None`` where ``t`` is).
        confidence: the interval's level, e.g. 0.95.
        method_only: the seeds only the method has, left out of the pairing.
        reference_only: the seeds only the reference has, left out of the pairing.
    """

    n: int
    mean: float | None
    std: float | None
    low: float | None
    high: float | None
    t: float | None
    p: float | None
    confidence: float
    method_only: tuple[Hashable, ...] = ()
    reference_only: tuple[Hashable, ...] = ()

    @property
    def unpaired(self) -> int:
        """How many seeds were left out because only one side has them."""
        return len(self.method_only) + len(self.reference_only)

    @property
    def measurable(self) -> bool | None:
        """Whether the interval excludes 0 (``None`` where there is no interval: below two pairs)."""
        if self.low is None or self.high is None:
            return None
        return not self.low <= 0.0 <= self.high

    @property
    def verdict(self) -> str:
        """The difference in words: measurable, no measurable difference, or why it is undefined."""
        if self.measurable is None:
            return f"undefined: {self.n} common seed{'s' if self.n != 1 else ''}, a paired interval needs 2"
        return "measurable difference" if self.measurable else NO_MEASURABLE_DIFFERENCE


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence!r}: the interval's level must lie strictly between 0 and 1, "
                         "e.g. 0.95")


def summarize(values: Iterable[float], confidence: float = 0.95) -> Summary:
    """The n, mean, sample std (ddof 1) and Student's t interval of the mean of ``values``.

    Args:
        values: one value per seed.
        confidence: the interval's level (0.95: the 95 % interval).
    """
    _check_confidence(confidence)
    x = np.asarray(list(values), dtype=float)  # (n,)
    n = len(x)
    if n == 0:
        return Summary(0, None, None, None, None, confidence)
    mean = float(x.mean())
    if n == 1:
        return Summary(1, mean, None, None, None, confidence)
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf((1.0 + confidence) / 2.0, n - 1)) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half, confidence)


def paired_difference(method_scores: Mapping[Hashable, float], reference_scores: Mapping[Hashable, float],
                      confidence: float = 0.95) -> PairedDifference:
    """The seed-paired difference ``method − reference`` over the seeds both have, and the paired t-test.

    Args:
        method_scores: seed → the method's score.
        reference_scores: seed → the reference's score on the same task.
        confidence: the interval's level (0.95: the 95 % interval).
    """
    common = [seed for seed in method_scores if seed in reference_scores]
    summary = summarize([method_scores[seed] - reference_scores[seed] for seed in common], confidence)
    t = None
    if summary.std is not None and summary.std > 0.0:
        t = summary.mean / (summary.std / math.sqrt(summary.n))
    elif summary.std is not None and summary.mean != 0.0:  # every difference equal and not 0: the limit s_d → 0
        t = math.copysign(math.inf, summary.mean)
    p = None if t is None else float(2.0 * stats.t.sf(abs(t), summary.n - 1))  # all differences 0: no test
    return PairedDifference(summary.n, summary.mean, summary.std, summary.low, summary.high, t, p, confidence,
                            method_only=tuple(s for s in method_scores if s not in reference_scores),
                            reference_only=tuple(s for s in reference_scores if s not in method_scores))
