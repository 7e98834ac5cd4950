"""Student-t intervals over seeds, for `opo report`: the quantile, a mean's 95% half-width,
and the band of a curve across seeds. Plain Python (no scipy, which is not a dependency).

    mean_ci95([0.2, 0.4, 0.9])   # (0.5, t_{0.975,2} * s / sqrt(3)) = (0.5, 0.8957)

The t quantile is exact for the integer degrees of freedom an interval over n seeds has
(n - 1): the two-sided CDF of Student's t has a finite closed form for integer df
(Abramowitz & Stegun 26.7.3), P(|T| <= t) = A(theta) with theta = atan(t / sqrt(df)),
increasing in theta, and bisection on theta solves A(theta) = 2p - 1 to float precision.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def t_two_sided(theta: float, df: int) -> float:
    """P(|T| <= sqrt(df) tan(theta)) for Student's t with integer `df` >= 1 (A&S 26.7.3).

    df odd:  (2/pi) [theta + sin(theta) (c + (2/3) c^3 + (2*4)/(3*5) c^5 + ... up to c^(df-2))]
    df even: sin(theta) [1 + (1/2) c^2 + (1*3)/(2*4) c^4 + ... up to c^(df-2)],  c = cos(theta)
    """
    c, s = math.cos(theta), math.sin(theta)
    if df % 2:
        term, total = c, 0.0  # the c^1 term; df = 1 has no series
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c * c * (2 * k) / (2 * k + 1)
        return 2 / math.pi * (theta + s * total)
    term, total = 1.0, 0.0
    for k in range(1, df // 2 + 1):
        total += term
        term *= c * c * (2 * k - 1) / (2 * k)
    return s * total


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with integer `df` >= 1, e.g. t_quantile(0.975, 2) = 4.3027."""
    if not (0 < p < 1 and df >= 1 and df == int(df)):
        raise ValueError(f"t_quantile needs 0 < p < 1 and an integer df >= 1; got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    lo, hi = 0.0, math.pi / 2
    for _ in range(200):  # the interval halves each time; stops once it cannot shrink
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if t_two_sided(mid, int(df)) < 2 * p - 1 else (lo, mid)
    return math.sqrt(df) * math.tan((lo + hi) / 2)


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% Student-t interval of the mean) over the finite values:
    t_{0.975, n-1} * s / sqrt(n), s the sample standard deviation. NaN half-width when n < 2
    (one seed says nothing about the spread); (NaN, NaN) when there are no values."""
    xs = [float(v) for v in values if math.isfinite(v)]
    if not xs:
        return math.nan, math.nan
    mean = statistics.fmean(xs)
    if len(xs) < 2:
        return mean, math.nan
    return mean, t_quantile(0.975, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))


def seed_band(
    curves: Sequence[tuple[Sequence[float], Sequence[float]]],
) -> tuple[list[float], list[float], list[float]]:
    """(steps, mean, half-width) of several seeds' (steps, values) curves at the steps every
    curve has; the half-width is `mean_ci95`'s at each step (NaN with one curve)."""
    if not curves:
        return [], [], []
    common = set(curves[0][0]).intersection(*(set(s) for s, _ in curves[1:]))
    by_step = [dict(zip(s, v, strict=True)) for s, v in curves]
    steps = sorted(common)
    stats = [mean_ci95([d[step] for d in by_step]) for step in steps]
    return steps, [m for m, _ in stats], [h for _, h in stats]
