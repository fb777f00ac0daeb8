"""The statistics of a study report: means with 95 % confidence intervals, paired per-seed
differences, trends over sparsity, partial correlations, and the verdict each one supports.

Pure numpy/scipy; ``docs/statistics.md`` states every formula. A claim is "supported" only
when its confidence interval excludes zero in the claimed direction.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
SUPPORTED = "supported"
CONTRADICTED = "contradicted"
INCONCLUSIVE = "inconclusive"
NO_VERDICT_N = "no verdict (n<2)"
NO_VERDICT_SPARSITIES = "no verdict (<3 sparsities)"
NO_VERDICT_DOF = "no verdict (n-3-k<1)"
NO_VERDICT_FLAT = "no verdict (no variation)"
NO_VERDICT_METHODS = "no verdict (<2 methods at one sparsity)"
MIN_TREND_SPARSITIES = 3


def sparsities(count: int) -> str:
    """``1 sparsity``, ``3 sparsities``."""
    return f"{count} sparsit{'y' if count == 1 else 'ies'}"


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A mean with the half-width of its confidence interval (None for n < 2) and n."""

    mean: float | None
    half_width: float | None
    n: int

    @property
    def interval(self) -> tuple[float, float] | None:
        """(low, high) of the interval, or None without one."""
        if self.mean is None or self.half_width is None:
            return None
        return self.mean - self.half_width, self.mean + self.half_width

    def text(self, digits: int = 2, signed: bool = False) -> str:
        """``mean ± hw (n=N)``; ``mean (n=1, no CI)``; ``–`` with no value."""
        if self.mean is None:
            return "–"
        sign = "+" if signed else ""
        mean = f"{self.mean:{sign}.{digits}f}"
        if self.half_width is None:
            return f"{mean} (n={self.n}, no CI)"
        return f"{mean} ± {self.half_width:.{digits}f} (n={self.n})"


@dataclasses.dataclass(frozen=True)
class Correlation:
    """A (partial) correlation with its Fisher-z interval; ``r`` None when undefined."""

    r: float | None
    low: float | None
    high: float | None
    n: int
    levels: int

    def text(self, digits: int = 2) -> str:
        """``r [low, high] (n=N)`` or why there is no value."""
        if self.r is None:
            return f"– (n={self.n}, {sparsities(self.levels)})"
        return f"{self.r:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}] " \
               f"(n={self.n})"


def _clean(values: Iterable[float | None]) -> np.ndarray:
    """The finite values as float64 (None and NaN dropped)."""
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return np.asarray(kept, np.float64)


def t_quantile(n: int, confidence: float = CONFIDENCE) -> float:
    """Student's t quantile t_{(1+confidence)/2, n-1} (n >= 2)."""
    return float(stats.t.ppf(0.5 + confidence / 2, n - 1))


def mean_ci(values: Iterable[float | None], confidence: float = CONFIDENCE) -> Estimate:
    """Mean ± t_{0.975,n-1}·s/√n (s: sample standard deviation); no interval for n = 1."""
    x = _clean(values)
    n = len(x)
    if n == 0:
        return Estimate(None, None, 0)
    if n == 1:
        return Estimate(float(x[0]), None, 1)
    s = float(np.std(x, ddof=1))
    return Estimate(float(np.mean(x)), t_quantile(n, confidence) * s / math.sqrt(n), n)


def paired_differences(treated: Mapping[int, float | None],
                       control: Mapping[int, float | None]) -> Estimate:
    """Mean ± CI of ``treated[seed] - control[seed]`` over the seeds both have a value for."""
    diffs = [treated[s] - control[s] for s in sorted(set(treated) & set(control))
             if treated[s] is not None and control[s] is not None]
    return mean_ci(diffs)


def slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of y on x: Σ(x-x̄)(y-ȳ) / Σ(x-x̄)²."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    dx = x - x.mean()
    return float(np.sum(dx * (y - y.mean())) / np.sum(dx * dx))


@dataclasses.dataclass(frozen=True)
class Trend:
    """Mean per-seed slope over sparsity, and how many distinct sparsities the data has."""

    slope: Estimate
    sparsities: int


def trend(points: Iterable[tuple[int, float, float | None]]) -> Trend:
    """Per seed, the slope of the value against sparsity (seeds with ≥ 3 distinct sparsities
    only; a repeated sparsity is averaged first); then mean slope ± CI over those seeds."""
    by_seed: dict[int, dict[float, list[float]]] = {}
    for seed, sparsity, value in points:
        if value is not None and math.isfinite(value):
            by_seed.setdefault(seed, {}).setdefault(float(sparsity), []).append(float(value))
    all_sparsities = {s for levels in by_seed.values() for s in levels}
    slopes = []
    for levels in by_seed.values():
        if len(levels) >= MIN_TREND_SPARSITIES:
            xs = sorted(levels)
            slopes.append(slope(xs, [float(np.mean(levels[s])) for s in xs]))
    return Trend(mean_ci(slopes), len(all_sparsities))


def partial_correlation(x: Sequence[float], y: Sequence[float], levels: Sequence[float],
                        confidence: float = CONFIDENCE) -> Correlation:
    """Pearson r of x and y after subtracting each sparsity level's mean from both, with the
    Fisher-z interval tanh(atanh r ± z·1/√(n-3-k)), k = levels - 1; no value when n-3-k < 1."""
    xs, ys, ls = (np.asarray(v, np.float64) for v in (x, y, levels))
    n = len(xs)
    unique = np.unique(ls)
    k = len(unique) - 1
    if n - 3 - k < 1:
        return Correlation(None, None, None, n, len(unique))
    rx, ry = xs.copy(), ys.copy()
    for level in unique:
        at = ls == level
        rx[at] -= rx[at].mean()
        ry[at] -= ry[at].mean()
    denom = math.sqrt(float(np.sum(rx * rx) * np.sum(ry * ry)))
    if denom == 0.0:
        return Correlation(None, None, None, n, len(unique))
    r = float(np.sum(rx * ry) / denom)
    z = math.atanh(min(max(r, -0.999999999), 0.999999999))  # |r| = 1 has no finite z
    half = float(stats.norm.ppf(0.5 + confidence / 2)) / math.sqrt(n - 3 - k)
    return Correlation(r, math.tanh(z - half), math.tanh(z + half), n, len(unique))


def interval_verdict(interval: tuple[float, float] | None, direction: int) -> str:
    """``direction`` +1 claims a positive effect, -1 a negative one; None: no interval."""
    if interval is None:
        return NO_VERDICT_N
    low, high = interval
    if (direction > 0 and low > 0) or (direction < 0 and high < 0):
        return SUPPORTED
    if (direction > 0 and high < 0) or (direction < 0 and low > 0):
        return CONTRADICTED
    return INCONCLUSIVE


def verdict(estimate: Estimate, direction: int) -> str:
    """The verdict on "the mean has the sign of ``direction``" (n < 2: no verdict)."""
    return interval_verdict(estimate.interval if estimate.n >= 2 else None, direction)


def trend_verdict(result: Trend, direction: int) -> str:
    """The verdict on a trend: fewer than 3 sparsities or 2 seeds give none."""
    if result.sparsities < MIN_TREND_SPARSITIES:
        return NO_VERDICT_SPARSITIES
    return verdict(result.slope, direction)


def correlation_verdict(result: Correlation, direction: int) -> str:
    """The verdict on the sign of a correlation from its Fisher-z interval."""
    if result.r is None:
        return NO_VERDICT_DOF if result.n - 3 - (result.levels - 1) < 1 else NO_VERDICT_FLAT
    return interval_verdict((result.low, result.high), direction)


def contains_verdict(estimate: Estimate, value: float) -> str:
    """Whether the interval contains ``value`` (a description, not an equivalence test)."""
    interval = estimate.interval if estimate.n >= 2 else None
    if interval is None:
        return NO_VERDICT_N
    low, high = interval
    return f"CI contains {value:g}" if low <= value <= high else f"CI excludes {value:g}"
