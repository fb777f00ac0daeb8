"""The study's statistics against hand-computed numbers (the arithmetic is in the comments)."""

import math

import pytest

from nbjax.study import statistics as st

T_2 = 4.302652729749462  # Student t_{0.975} with 2 degrees of freedom (tables: 4.303)
T_1 = 12.706204736174694  # ... with 1 degree of freedom (tables: 12.706)
Z = 1.959963984540054  # normal 0.975 quantile


def test_mean_ci_three_values():
    # [1, 2, 3]: mean 2; s² = (1 + 0 + 1) / 2 = 1; half-width = t_{.975,2} · 1 / √3
    est = st.mean_ci([1.0, 2.0, 3.0])
    assert est.n == 3
    assert est.mean == pytest.approx(2.0)
    assert est.half_width == pytest.approx(T_2 / math.sqrt(3)) == pytest.approx(2.4841377)
    assert est.interval == pytest.approx((2 - 2.4841377, 2 + 2.4841377))
    assert est.text(2) == "2.00 ± 2.48 (n=3)"


def test_mean_ci_drops_missing_values_and_has_no_ci_for_one():
    # [1, None, NaN, 3] -> [1, 3]: mean 2; s = √2; half-width = t_{.975,1} · √2 / √2 = 12.706
    est = st.mean_ci([1.0, None, float("nan"), 3.0])
    assert (est.n, est.mean) == (2, 2.0)
    assert est.half_width == pytest.approx(T_1)
    one = st.mean_ci([5.0])
    assert (one.mean, one.half_width, one.n) == (5.0, None, 1)
    assert one.text(2) == "5.00 (n=1, no CI)"
    assert one.interval is None
    assert st.mean_ci([]).text() == "–"


def test_paired_differences_match_by_seed():
    # Seeds in both: 0, 1, 2 -> differences 3-1=2, 5-2=3, 10-5=5 (seeds 3 and 4 unmatched).
    # mean 10/3 = 3.3333; s² = ((2-10/3)² + (3-10/3)² + (5-10/3)²) / 2 = (16/9+1/9+25/9)/2 = 7/3
    # half-width = t_{.975,2} · √(7/3) / √3 = 4.30265 · 1.52753 / 1.73205 = 3.79458
    diff = st.paired_differences({0: 3.0, 1: 5.0, 2: 10.0, 3: 7.0},
                                 {0: 1.0, 1: 2.0, 2: 5.0, 4: 0.0})
    assert diff.n == 3
    assert diff.mean == pytest.approx(10 / 3)
    assert diff.half_width == pytest.approx(3.79458303)
    # CI [-0.46, 7.13] holds 0: inconclusive either way.
    assert st.verdict(diff, +1) == st.INCONCLUSIVE == "inconclusive"
    assert st.verdict(diff, -1) == st.INCONCLUSIVE


def test_slope_is_least_squares():
    # x = 0, 0.5, 1; y = 1, 2, 4: x̄ = 0.5, ȳ = 7/3
    # Σ(x-x̄)(y-ȳ) = (-0.5)(-4/3) + 0 + (0.5)(5/3) = 3/2; Σ(x-x̄)² = 0.5 -> slope 3
    assert st.slope([0.0, 0.5, 1.0], [1.0, 2.0, 4.0]) == pytest.approx(3.0)


def _lines(slopes, sparsities=(0.0, 0.5, 1.0)):
    return [(seed, x, 10.0 + k * x) for seed, k in enumerate(slopes) for x in sparsities]


def test_trend_and_its_verdicts():
    # Per-seed slopes -2, -3, -4: mean -3, s = 1, half-width 2.48414: CI [-5.48, -0.52].
    falling = st.trend(_lines((-2.0, -3.0, -4.0)))
    assert falling.sparsities == 3
    assert falling.slope.mean == pytest.approx(-3.0)
    assert falling.slope.half_width == pytest.approx(T_2 / math.sqrt(3))
    assert st.trend_verdict(falling, -1) == st.SUPPORTED == "supported"
    assert st.trend_verdict(falling, +1) == st.CONTRADICTED == "contradicted"
    # Slopes -1, -2, -3: mean -2, CI [-4.48, 0.48] holds 0.
    assert st.trend_verdict(st.trend(_lines((-1.0, -2.0, -3.0))), -1) == "inconclusive"


def test_trend_without_enough_sparsities_or_seeds():
    two = st.trend(_lines((-2.0, -3.0, -4.0), sparsities=(0.5, 0.9)))
    assert two.sparsities == 2 and two.slope.n == 0
    assert st.trend_verdict(two, -1) == "no verdict (<3 sparsities)"
    one_seed = st.trend(_lines((-2.0,)))
    assert one_seed.slope.n == 1 and one_seed.slope.mean == pytest.approx(-2.0)
    assert st.trend_verdict(one_seed, -1) == "no verdict (n<2)"
    # A seed with only two of the three sparsities gives no slope; the others still count.
    partial = _lines((-2.0, -3.0)) + [(7, 0.0, 1.0), (7, 0.5, 0.0)]
    assert st.trend(partial).slope.n == 2


def test_partial_correlation_by_hand():
    # Level A (sparsity 0.5): x 1, 2, 3 -> residuals -1, 0, 1; y 2, 4, 7 (mean 13/3) ->
    # -7/3, -1/3, 8/3. Level B (0.9): x 10, 11, 12 -> -1, 0, 1; y 0, 1, 5 (mean 2) -> -2, -1, 3.
    # Σxy = 7/3 + 8/3 + 2 + 3 = 10; Σx² = 4; Σy² = (49 + 1 + 64)/9 + 4 + 1 + 9 = 80/3
    # r = 10 / √(4 · 80/3) = √(15/16) = 0.968246
    # n = 6, k = 1: se = 1/√(6-3-1) = 1/√2; z = atanh(r) = 2.063437;
    # z ± 1.959964/√2 = 0.677533, 3.449341 -> tanh: 0.589913, 0.997984
    r = st.partial_correlation([1, 2, 3, 10, 11, 12], [2, 4, 7, 0, 1, 5],
                               [0.5, 0.5, 0.5, 0.9, 0.9, 0.9])
    assert r.r == pytest.approx(math.sqrt(15) / 4)
    assert (r.n, r.levels) == (6, 2)
    assert r.low == pytest.approx(0.5899134, abs=1e-6)
    assert r.high == pytest.approx(0.9979838, abs=1e-6)
    assert math.atanh(r.r) - math.atanh(r.low) == pytest.approx(Z / math.sqrt(2))
    assert st.correlation_verdict(r, +1) == "supported"
    assert st.correlation_verdict(r, -1) == "contradicted"


def test_partial_correlation_needs_degrees_of_freedom():
    # n = 4 with 2 levels: n - 3 - k = 4 - 3 - 1 = 0 < 1, no value.
    r = st.partial_correlation([1, 2, 3, 4], [1, 3, 2, 4], [0.5, 0.5, 0.9, 0.9])
    assert r.r is None
    assert st.correlation_verdict(r, +1) == "no verdict (n-3-k<1)"
    assert r.text() == "– (n=4, 2 sparsities)"
    one_level = st.partial_correlation([1, 2, 3], [1, 3, 2], [0.5, 0.5, 0.5])
    assert one_level.text() == "– (n=3, 1 sparsity)"  # n - 3 - 0 = 0


def test_verdicts_from_intervals():
    assert st.verdict(st.Estimate(2.0, 1.0, 3), +1) == "supported"  # CI [1, 3]
    assert st.verdict(st.Estimate(2.0, 1.0, 3), -1) == "contradicted"
    assert st.verdict(st.Estimate(0.5, 1.0, 3), +1) == "inconclusive"  # CI [-0.5, 1.5]
    assert st.verdict(st.Estimate(-0.5, 1.0, 3), -1) == "inconclusive"
    assert st.verdict(st.Estimate(2.0, None, 1), +1) == "no verdict (n<2)"
    assert st.verdict(st.Estimate(None, None, 0), +1) == "no verdict (n<2)"


def test_contains_verdict():
    # [0.98, 1.0, 1.02]: mean 1, s = 0.02, half-width 4.30265 · 0.02 / √3 = 0.049683
    est = st.mean_ci([0.98, 1.0, 1.02])
    assert est.half_width == pytest.approx(0.0496828, abs=1e-6)
    assert st.contains_verdict(est, 1.0) == "CI contains 1"
    assert st.contains_verdict(est, 1.1) == "CI excludes 1.1"
    assert st.contains_verdict(st.mean_ci([1.0]), 1.0) == "no verdict (n<2)"
