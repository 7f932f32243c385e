"""The statistics of a sweep's report: a mean's t-interval over seeds, and a point paired with the
reference by seed (t-test and sign test)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Estimate", "Paired", "estimate", "paired"]


@dataclass(frozen=True)
class Estimate:
    """Mean of ``n`` values with their sample standard deviation and a t-interval for the mean."""

    mean: float
    std: float  # sample standard deviation (n - 1); 0 for one value
    n: int
    low: float  # the confidence interval; nan for fewer than 2 values
    high: float


def estimate(values: Sequence[float], level: float = 0.95) -> Estimate:
    """Mean, standard deviation and the ``level`` t-interval (Student's t, n - 1 degrees of freedom)."""
    from scipy import stats

    n = len(values)
    if n == 0:
        return Estimate(math.nan, math.nan, 0, math.nan, math.nan)
    mean = statistics.fmean(values)
    if n == 1:
        return Estimate(mean, 0.0, 1, math.nan, math.nan)
    std = statistics.stdev(values)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return Estimate(mean, std, n, mean - half, mean + half)


@dataclass(frozen=True)
class Paired:
    """A point against the reference over the seeds both finished: differences point - reference."""

    diff: Estimate  # mean difference and its t-interval
    t_p: float  # two-sided paired t-test p-value; nan for fewer than 2 pairs
    better: int  # seeds where the point beat the reference
    worse: int
    tied: int
    sign_p: float  # two-sided exact sign test p-value over the untied pairs


def paired(values: Sequence[float], reference: Sequence[float], level: float = 0.95) -> Paired:
    """Paired comparison of ``values`` with ``reference`` (the same seeds, in the same order):
    the mean difference with its t-interval, the paired t-test and the sign test, which assumes
    nothing about the differences' distribution (with 5 pairs its smallest p is 2/32 = 0.0625)."""
    from scipy import stats

    diffs = [v - r for v, r in zip(values, reference, strict=True)]
    diff = estimate(diffs, level)
    if diff.n < 2:
        t_p = math.nan
    elif diff.std == 0:  # every seed moved by the same amount: t is infinite, or 0/0 when nothing moved
        t_p = 1.0 if diff.mean == 0 else 0.0
    else:
        t = diff.mean / (diff.std / math.sqrt(diff.n))
        t_p = float(2 * stats.t.sf(abs(t), diff.n - 1))
    better, worse = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    sign_p = float(stats.binomtest(better, better + worse).pvalue) if better + worse else 1.0
    return Paired(diff, t_p, better, worse, len(diffs) - better - worse, sign_p)
