"""launch/stats.py: mean ± std, Welch's t-test and the bootstrap interval against independent references."""

from __future__ import annotations

import math
import statistics

import pytest

from launch.stats import bootstrap_ci, compare, format_comparison, mean_std, student_t_two_sided_p, welch_t


def test_mean_std_is_the_sample_std() -> None:
    vals = [1.8244, 1.8150, 1.8338]
    m, s = mean_std(vals)
    assert m == pytest.approx(statistics.mean(vals)) and s == pytest.approx(statistics.stdev(vals))
    assert mean_std([2.0]) == (2.0, 0.0)
    with pytest.raises(ValueError, match="values needs at least 1"):
        mean_std([])
    with pytest.raises(ValueError, match="non-finite"):
        mean_std([1.0, math.nan])


def test_welch_matches_scipy_and_a_hand_computation() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    a, b = [1.70, 1.71, 1.695], [1.82, 1.835, 1.81, 1.83]
    t, df, p = welch_t(a, b)
    ref = scipy_stats.ttest_ind(a, b, equal_var=False)
    assert t == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)
    va, vb = statistics.variance(a) / 3, statistics.variance(b) / 4
    assert t == pytest.approx((statistics.mean(a) - statistics.mean(b)) / math.sqrt(va + vb))
    assert df == pytest.approx((va + vb) ** 2 / (va**2 / 2 + vb**2 / 3))
    assert p < 1e-3
    # the same samples: no difference
    t0, _, p0 = welch_t(a, list(a))
    assert t0 == 0.0 and p0 == pytest.approx(1.0)
    # constant samples
    assert welch_t([1.0, 1.0], [1.0, 1.0])[2] == 1.0
    assert welch_t([2.0, 2.0], [1.0, 1.0])[:1] == (math.inf,) and welch_t([2.0, 2.0], [1.0, 1.0])[2] == 0.0
    with pytest.raises(ValueError, match="a needs at least 2"):
        welch_t([1.0], [1.0, 2.0])


def test_student_t_p_values() -> None:
    # exact cases: df = 1 is Cauchy, p = 1 - 2 atan(|t|) / pi; df = 2: p = 1 - |t| / sqrt(2 + t^2)
    for t in (0.0, 0.3, 1.0, 2.5, 12.0):
        assert student_t_two_sided_p(t, 1.0) == pytest.approx(1 - 2 * math.atan(t) / math.pi, rel=1e-10, abs=1e-14)
        assert student_t_two_sided_p(-t, 2.0) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-10, abs=1e-14)
    assert student_t_two_sided_p(1.959963984540054, 1e7) == pytest.approx(0.05, rel=1e-5)  # -> normal
    assert student_t_two_sided_p(math.inf, 3.0) == 0.0
    with pytest.raises(ValueError, match="df must be > 0"):
        student_t_two_sided_p(1.0, 0.0)
    scipy_stats = pytest.importorskip("scipy.stats")
    for t, df in ((0.5, 2.3), (3.1, 3.7), (-8.0, 4.0), (1.2, 30.5)):
        assert student_t_two_sided_p(t, df) == pytest.approx(2 * scipy_stats.t.sf(abs(t), df), rel=1e-9)


def test_bootstrap_interval_contains_the_difference_and_is_seeded() -> None:
    a, b = [1.70, 1.71, 1.695], [1.82, 1.835, 1.81]
    lo, hi = bootstrap_ci(a, b)
    diff = statistics.mean(a) - statistics.mean(b)
    assert lo <= diff <= hi < 0
    assert bootstrap_ci(a, b) == (lo, hi)  # deterministic for a seed
    # the extremes of the resampled means bound the interval
    assert lo >= min(a) - max(b) and hi <= max(a) - min(b)
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(a, b, level=1.0)


def test_compare_and_its_verdict() -> None:
    clear = compare("budget", [1.70, 1.71, 1.695], "baseline", [1.82, 1.835, 1.81])
    assert clear.significant and clear.diff == pytest.approx(-0.12, abs=0.01)
    row = format_comparison(clear)
    assert row.startswith("| budget − baseline | -0.1200") and "significant (p < 0.05" in row
    noise = compare("a", [1.80, 1.85, 1.75], "b", [1.81, 1.76, 1.84])
    assert not noise.significant and "not significant" in format_comparison(noise)
