"""Merge math of federated analytics: moments, histograms, quantiles and Laplace noise.

Pure numpy functions, no I/O and no meshctl imports. A domain summarizes each group
of its rows as *moments* `(n, sum, m2)` per column (m2 is the sum of squared
deviations about the domain's own group mean, which DuckDB computes stably) and as
histogram counts; the coordinator merges moments exactly with the pairwise formula
of Chan, Golub and LeVeque (1979), adds histograms, and reads quantiles off the
merged histogram.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Moments:
    """Count, sum and centered sum of squares of one column in one group."""

    n: float
    sum: float
    m2: float
    """Σ (x - mean)², about this part's own mean."""

    @property
    def mean(self) -> float:
        return self.sum / self.n if self.n else float("nan")


def moments(values: np.ndarray) -> Moments:
    """The moments of `values` (float64, two passes)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return Moments(0.0, 0.0, 0.0)
    mean = x.mean()
    return Moments(float(x.size), float(x.sum()), float(((x - mean) ** 2).sum()))


def merge_moments(parts: Sequence[Moments]) -> Moments:
    """Moments of the union of `parts`: Chan et al.'s pairwise update, in float64.

    m2 = Σ m2_i + Σ n_i (mean_i - mean)², which never subtracts two large sums of
    squares (the cancellation the naive Σx² - (Σx)²/n suffers).
    """
    n = float(sum(p.n for p in parts))
    s = float(sum(p.sum for p in parts))
    if n == 0:
        return Moments(0.0, 0.0, 0.0)
    mean = s / n
    m2 = sum(p.m2 + (p.n * (p.sum / p.n - mean) ** 2 if p.n else 0.0) for p in parts)
    return Moments(n, s, float(m2))


def variance(m: Moments, ddof: int = 1) -> float:
    """Variance from moments: sample variance (ddof 1, SQL's var_samp) by default; NaN if n ≤ ddof."""
    if m.n <= ddof:
        return float("nan")
    return max(m.m2, 0.0) / (m.n - ddof)


def bin_index(values: np.ndarray, bins: int, lo: float, hi: float) -> np.ndarray:
    """Bin of each value in `bins` equal bins over [lo, hi]; values outside clamp to the edge bins.

    floor((x - lo) * bins / (hi - lo)), the same arithmetic as the domains' SQL.
    """
    if not hi > lo or bins < 1:
        raise ValueError(f"histogram range [{lo}, {hi}] with {bins} bins is empty")
    x = np.asarray(values, dtype=np.float64)
    idx = np.floor((x - lo) * bins / (hi - lo))
    return np.clip(idx, 0, bins - 1).astype(np.int64)


def histogram(values: np.ndarray, bins: int, lo: float, hi: float) -> np.ndarray:
    """Counts per bin (float64) of `values`, clamping values outside [lo, hi] into the edge bins."""
    return np.bincount(bin_index(values, bins, lo, hi), minlength=bins).astype(np.float64)


def merge_histograms(parts: Sequence[Sequence[float]]) -> np.ndarray:
    """Bin-wise sum of histograms of equal length."""
    arrays = [np.asarray(p, dtype=np.float64) for p in parts]
    if not arrays:
        raise ValueError("no histograms to merge")
    if len({a.shape for a in arrays}) != 1:
        raise ValueError("histograms to merge differ in length")
    return np.sum(arrays, axis=0)


def histogram_quantile(counts: Sequence[float], lo: float, hi: float, q: float) -> float:
    """The q-quantile read off a histogram, interpolating linearly within the bin it falls in.

    The value of rank ⌈qN⌉ (numpy's `inverted_cdf` quantile) lies in the bin found, so
    the estimate is within one bin width of it for values inside [lo, hi]. Negative
    counts (DP noise) count as zero. NaN for an empty histogram.
    """
    c = np.clip(np.asarray(counts, dtype=np.float64), 0.0, None)
    total = c.sum()
    if total <= 0:
        return float("nan")
    width = (hi - lo) / len(c)
    rank = q * total
    cum = np.cumsum(c)
    k = int(np.searchsorted(cum, rank * (1 - 1e-12), side="left"))  # 0.3 * 10 is 3.0000000000000004
    k = min(k, len(c) - 1)
    before = cum[k] - c[k]
    frac = (rank - before) / c[k] if c[k] > 0 else 0.0
    return float(lo + width * (k + min(max(frac, 0.0), 1.0)))


def split_epsilon(epsilon: float, statistics: int) -> float:
    """ε of each of `statistics` releases that compose sequentially to `epsilon` in all."""
    if epsilon <= 0 or statistics < 1:
        raise ValueError("epsilon must be positive and there must be something to release")
    return epsilon / statistics


def laplace(values: np.ndarray | float, sensitivity: float, epsilon: float,
            rng: np.random.Generator) -> np.ndarray:
    """`values` plus Laplace(sensitivity / epsilon) noise, elementwise (the Laplace mechanism)."""
    x = np.asarray(values, dtype=np.float64)
    return x + rng.laplace(0.0, sensitivity / epsilon, size=x.shape)


def sensitivity(kind: str, lo: float, hi: float) -> float:
    """L1 sensitivity of one group's statistic when one row is added or removed.

    Values are clipped to [lo, hi] first. count: 1; sum: max(|lo|, |hi|);
    m2: (hi - lo)² (adding x changes m2 by n/(n+1)·(x - mean)²); hist: 1 (one bin
    changes by one).
    """
    if kind in ("count", "hist"):
        return 1.0
    if kind == "sum":
        return max(abs(lo), abs(hi))
    if kind == "m2":
        return (hi - lo) ** 2
    raise ValueError(f"no sensitivity for statistic kind {kind!r}")
