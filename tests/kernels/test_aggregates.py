"""Merge math of federated analytics against numpy over the union, on random splits."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshctl.runtime.kernels import aggregates as agg

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


def _split(values: list[float], cuts: list[int]) -> list[np.ndarray]:
    x = np.asarray(values, dtype=np.float64)
    edges = sorted({min(c, len(x)) for c in cuts})
    return np.split(x, edges)


@settings(max_examples=200, deadline=None)
@given(st.lists(finite, min_size=2, max_size=200), st.lists(st.integers(0, 200), max_size=6))
def test_merged_moments_equal_numpy_over_the_union(values, cuts):
    # Prepare
    parts = [agg.moments(p) for p in _split(values, cuts)]
    x = np.asarray(values, dtype=np.float64)
    # Execute
    m = agg.merge_moments(parts)
    # Assert
    assert m.n == len(x)
    assert m.sum == pytest.approx(x.sum(), rel=1e-9, abs=1e-6)
    assert m.mean == pytest.approx(x.mean(), rel=1e-9, abs=1e-6)
    scale = max(1.0, float(np.abs(x).max()) ** 2)
    assert agg.variance(m) == pytest.approx(np.var(x, ddof=1), rel=1e-7, abs=1e-9 * scale)
    assert agg.variance(m, ddof=0) == pytest.approx(np.var(x), rel=1e-7, abs=1e-9 * scale)


def test_variance_survives_a_large_offset_where_the_naive_formula_cancels():
    # Prepare: values around 1e9 with unit spread; Σx² - (Σx)²/n loses every digit here
    rng = np.random.default_rng(0)
    x = 1e9 + rng.standard_normal(10_000)
    parts = [agg.moments(p) for p in np.array_split(x, 7)]
    # Execute
    m = agg.merge_moments(parts)
    naive = (np.sum(x ** 2) - x.sum() ** 2 / len(x)) / (len(x) - 1)
    # Assert
    assert agg.variance(m) == pytest.approx(np.var(x, ddof=1), rel=1e-6)
    assert abs(naive - np.var(x, ddof=1)) > 0.01  # the formula we do not use


def test_empty_parts_and_degenerate_variance():
    assert agg.merge_moments([agg.moments(np.array([])), agg.moments(np.array([3.0]))]) == agg.Moments(1, 3, 0)
    assert np.isnan(agg.variance(agg.Moments(1, 3, 0)))
    assert agg.merge_moments([]) == agg.Moments(0, 0, 0)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.floats(-50, 150, allow_nan=False), min_size=1, max_size=300),
       st.lists(st.integers(0, 300), max_size=5), st.integers(1, 30))
def test_merged_histograms_equal_the_histogram_of_the_union_with_clamping(values, cuts, bins):
    # Prepare
    lo, hi = 0.0, 100.0
    x = np.asarray(values)
    # Execute
    merged = agg.merge_histograms([agg.histogram(p, bins, lo, hi) for p in _split(values, cuts)])
    # Assert: numpy's histogram of the values clipped into the range is the same thing
    want, _ = np.histogram(np.clip(x, lo, hi), bins=bins, range=(lo, hi))
    inside = (x >= lo) & (x <= hi)
    assert merged.sum() == len(x)
    assert merged[0] >= np.sum(x < lo) and merged[-1] >= np.sum(x > hi)
    # bin edges may differ from numpy's by one ulp for values exactly on an edge
    on_edge = np.isclose(((x[inside] - lo) * bins / (hi - lo)) % 1, 0) | np.isclose(
        ((x[inside] - lo) * bins / (hi - lo)) % 1, 1)
    if not on_edge.any():
        assert merged.tolist() == want.astype(float).tolist()


def test_values_on_the_edges_and_outside_go_to_the_edge_bins():
    counts = agg.histogram(np.array([-5.0, 0.0, 9.99, 10.0, 99.0, 100.0, 1e9]), 10, 0.0, 100.0)
    assert counts.tolist() == [3, 1, 0, 0, 0, 0, 0, 0, 0, 3]
    with pytest.raises(ValueError, match="empty"):
        agg.histogram(np.array([1.0]), 10, 5.0, 5.0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 100, allow_nan=False), min_size=1, max_size=400), st.integers(1, 50),
       st.floats(0.01, 0.99))
def test_quantile_from_the_histogram_is_within_one_bin_of_numpy(values, bins, q):
    # Prepare
    lo, hi = 0.0, 100.0
    x = np.asarray(values)
    # Execute
    est = agg.histogram_quantile(agg.histogram(x, bins, lo, hi), lo, hi, q)
    # Assert: the bin holding the value of rank ceil(qN) is found, so that value is within one bin
    width = (hi - lo) / bins
    assert lo <= est <= hi
    assert abs(est - np.quantile(x, q, method="inverted_cdf")) <= width + 1e-9


def test_quantile_interpolates_linearly_inside_its_bin():
    counts = [0, 10, 10, 0]  # 20 values spread over [1, 3) with bin width 1
    assert agg.histogram_quantile(counts, 0.0, 4.0, 0.5) == pytest.approx(2.0)
    assert agg.histogram_quantile(counts, 0.0, 4.0, 0.25) == pytest.approx(1.5)
    assert agg.histogram_quantile(counts, 0.0, 4.0, 0.75) == pytest.approx(2.5)
    assert np.isnan(agg.histogram_quantile([0, 0], 0.0, 1.0, 0.5))
    assert agg.histogram_quantile([-3.0, 4.0], 0.0, 2.0, 0.5) == pytest.approx(1.5)  # noise below 0 is 0


def test_laplace_noise_has_the_declared_scale_and_is_seeded():
    # Prepare
    rng = np.random.default_rng(7)
    # Execute
    noisy = agg.laplace(np.zeros(200_000), sensitivity=2.0, epsilon=0.5, rng=rng)
    # Assert: Laplace(b) has mean |x| = b; here b = 2 / 0.5 = 4
    assert np.mean(np.abs(noisy)) == pytest.approx(4.0, rel=0.02)
    again = agg.laplace(np.zeros(3), 2.0, 0.5, np.random.default_rng(7))
    assert again.tolist() == noisy[:3].tolist()


def test_sensitivities_and_epsilon_split():
    assert agg.sensitivity("count", 0, 10) == 1
    assert agg.sensitivity("hist", 0, 10) == 1
    assert agg.sensitivity("sum", -3, 10) == 10
    assert agg.sensitivity("m2", 5, 10) == 25
    assert agg.split_epsilon(1.0, 4) == 0.25
    with pytest.raises(ValueError):
        agg.sensitivity("max", 0, 1)
    with pytest.raises(ValueError):
        agg.split_epsilon(0.0, 3)
