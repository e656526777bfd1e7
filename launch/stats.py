"""Seed statistics for the comparisons (launch/compare.py, benchmarks/skip_layer.py): mean ± std and a stated test.

Every claimed difference between two arms is reported with Welch's unequal-variance t-test (two-sided) and a
percentile bootstrap interval of the difference of means, over per-seed final values (plain Python: the t
distribution's tail comes from the regularized incomplete beta function, checked against scipy in the tests).
With 3 seeds per arm the test has little power: "not significant" there means "not shown", not "equal".
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Comparison", "bootstrap_ci", "compare", "format_comparison", "mean_std", "student_t_two_sided_p",
           "welch_t"]


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def student_t_two_sided_p(t: float, df: float) -> float:
    """``P(|T| >= |t|)`` for Student's t with ``df`` (real, > 0) degrees of freedom: ``I_{df/(df+t^2)}(df/2, 1/2)``."""
    if not df > 0:
        raise ValueError(f"df must be > 0, got {df!r}")
    if math.isinf(t):
        return 0.0
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


def _values(values: Sequence[float], name: str, minimum: int) -> list[float]:
    vals = [float(v) for v in values]
    if len(vals) < minimum:
        raise ValueError(f"{name} needs at least {minimum} values, got {len(vals)}")
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"{name} has non-finite values: {vals}")
    return vals


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (N-1; 0 for one value)."""
    vals = _values(values, "values", 1)
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def welch_t(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Welch's t-test of mean(a) - mean(b): ``(t, degrees of freedom, two-sided p)``.

    Identical constant samples give ``t = ±inf, p = 0`` when the means differ and ``t = 0, p = 1`` when not.
    """
    a, b = _values(a, "a", 2), _values(b, "b", 2)
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    va, vb = sa * sa / len(a), sb * sb / len(b)
    if va + vb == 0.0:
        if ma == mb:
            return 0.0, float(len(a) + len(b) - 2), 1.0
        return math.copysign(math.inf, ma - mb), float(len(a) + len(b) - 2), 0.0
    t = (ma - mb) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / ((va * va / (len(a) - 1) if va else 0.0) + (vb * vb / (len(b) - 1) if vb else 0.0))
    return t, df, student_t_two_sided_p(t, df)


def bootstrap_ci(a: Sequence[float], b: Sequence[float], *, level: float = 0.95, resamples: int = 10000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(a) - mean(b), resampling each arm's seeds with replacement."""
    a, b = _values(a, "a", 1), _values(b, "b", 1)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if resamples < 100:
        raise ValueError(f"resamples must be >= 100, got {resamples!r}")
    rng = random.Random(seed)
    diffs = sorted(sum(rng.choices(a, k=len(a))) / len(a) - sum(rng.choices(b, k=len(b))) / len(b)
                   for _ in range(resamples))
    lo = diffs[int(math.floor((1 - level) / 2 * (resamples - 1)))]
    hi = diffs[int(math.ceil((1 + level) / 2 * (resamples - 1)))]
    return lo, hi


@dataclass(frozen=True)
class Comparison:
    """``a`` vs ``b`` over seeds: difference of means, Welch t / df / p, and a 95% bootstrap interval."""

    a: str
    b: str
    diff: float
    t: float
    df: float
    p: float
    ci_low: float
    ci_high: float
    n_a: int
    n_b: int

    @property
    def significant(self) -> bool:
        """p < 0.05 and the bootstrap interval excludes 0 (both, to be conservative)."""
        return self.p < 0.05 and (self.ci_low > 0 or self.ci_high < 0)


def compare(name_a: str, a: Sequence[float], name_b: str, b: Sequence[float]) -> Comparison:
    """Welch t-test and bootstrap interval of mean(a) - mean(b)."""
    t, df, p = welch_t(a, b)
    lo, hi = bootstrap_ci(a, b)
    return Comparison(name_a, name_b, mean_std(a)[0] - mean_std(b)[0], t, df, p, lo, hi, len(a), len(b))


def format_comparison(c: Comparison, unit: str = "") -> str:
    """One Markdown table row: ``| a - b | diff | 95% CI | Welch t (df) | p | verdict |``."""
    verdict = "significant (p < 0.05, CI excludes 0)" if c.significant else "not significant"
    return (f"| {c.a} − {c.b} | {c.diff:+.4f}{unit} | [{c.ci_low:+.4f}, {c.ci_high:+.4f}] | "
            f"{c.t:+.2f} ({c.df:.1f}) | {c.p:.3g} | {verdict} (n = {c.n_a}, {c.n_b}) |")
