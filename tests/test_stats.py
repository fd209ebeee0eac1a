"""Known-answer, edge-case and coverage tests of the bootstrap helpers."""

import math

import numpy as np
import pytest

from mmono_features.stats import bootstrap_ci, bootstrap_ci_columns, bootstrap_mean_ci, jaccard


def test_two_point_known_answer():
    # Resampling (0, 1) twice gives means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4.
    # The 2.5% and 97.5% quantiles are therefore 0 and 1; the 30% and 70% ones are 0.5.
    low, high = bootstrap_ci([0.0, 1.0], n_boot=4000, ci=0.95, seed=1)
    assert (low, high) == (0.0, 1.0)
    low, high = bootstrap_ci([0.0, 1.0], n_boot=4000, ci=0.4, seed=1)
    assert (low, high) == (0.5, 0.5)


def test_constant_values_give_a_point_interval():
    assert bootstrap_ci(np.full(17, 3.25), n_boot=200) == (3.25, 3.25)
    assert bootstrap_mean_ci(np.full(5, -2.0), n_boot=50) == (-2.0, -2.0, -2.0)


def test_empty_and_single_value():
    low, high = bootstrap_ci([], n_boot=10)
    assert math.isnan(low)
    assert math.isnan(high)
    assert bootstrap_ci([0.7], n_boot=10) == (0.7, 0.7)
    mean, low, high = bootstrap_mean_ci([], n_boot=10)
    assert all(math.isnan(x) for x in (mean, low, high))
    assert bootstrap_mean_ci([np.nan, 4.0, np.nan], n_boot=10) == (4.0, 4.0, 4.0)


def test_seeded_and_deterministic():
    values = np.random.default_rng(3).normal(size=40)
    assert bootstrap_ci(values, seed=5) == bootstrap_ci(values, seed=5)
    assert bootstrap_ci(values, seed=5) != bootstrap_ci(values, seed=6)


def test_interval_contains_point_estimate():
    values = np.random.default_rng(0).exponential(size=60)
    low, high = bootstrap_ci(values, statistic=np.median, n_boot=500)
    assert low <= np.median(values) <= high
    mean, low, high = bootstrap_mean_ci(values, n_boot=500)
    assert mean == pytest.approx(values.mean())
    assert low < mean < high


def test_columns_match_the_generic_bootstrap_without_nan():
    matrix = np.random.default_rng(1).normal(size=(30, 7))
    low_c, high_c = bootstrap_ci_columns(matrix, n_boot=300, seed=4)
    low_g, high_g = bootstrap_ci(matrix, np.mean, n_boot=300, seed=4, axis=0)
    np.testing.assert_allclose(low_c, low_g, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(high_c, high_g, rtol=1e-12, atol=1e-12)
    # The same along axis=1 of the transpose.
    low_t, high_t = bootstrap_ci(matrix.T, np.mean, n_boot=300, seed=4, axis=1)
    np.testing.assert_allclose(low_t, low_g, rtol=1e-12)
    np.testing.assert_allclose(high_t, high_g, rtol=1e-12)


def test_columns_ignore_nan():
    rng = np.random.default_rng(2)
    column = rng.normal(size=50)
    matrix = np.stack([column, np.where(np.arange(50) % 2 == 0, column, np.nan), np.full(50, np.nan)], axis=1)
    low, high = bootstrap_ci_columns(matrix, n_boot=400, seed=0)
    assert np.isnan(low[2])
    assert np.isnan(high[2])
    # The half-missing column rests on 25 values: its interval is wider than the full one.
    assert high[1] - low[1] > high[0] - low[0]
    mean, low, high = bootstrap_mean_ci(matrix, n_boot=400)
    assert mean[1] == pytest.approx(column[::2].mean())
    assert low[1] <= mean[1] <= high[1]


def test_coverage_of_the_mean():
    # 200 independent samples of n=40 from N(1.5, 2^2), one per column. The percentile
    # interval of the mean should contain 1.5 in about 95% of them (slightly less at
    # this n); >= 85% is a loose bound.
    rng = np.random.default_rng(11)
    matrix = rng.normal(1.5, 2.0, size=(40, 200))
    low, high = bootstrap_ci_columns(matrix, n_boot=1000, ci=0.95, seed=0)
    coverage = np.mean((low <= 1.5) & (1.5 <= high))
    assert coverage >= 0.85


@pytest.mark.parametrize("bad", [{"n_boot": 0}, {"n_boot": 2.5}, {"ci": 1.0}, {"ci": 0}, {"ci": 95}])
def test_bad_options_are_rejected(bad):
    with pytest.raises(ValueError):
        bootstrap_ci([1.0, 2.0], **bad)
    with pytest.raises(ValueError):
        bootstrap_ci_columns(np.ones((3, 2)), **bad)


def test_columns_need_a_matrix():
    with pytest.raises(ValueError, match="shape"):
        bootstrap_ci_columns(np.ones(4))


def test_jaccard():
    assert jaccard({1, 2, 3}, [2, 3, 4]) == pytest.approx(0.5)
    assert jaccard([], set()) == 1.0
    assert jaccard([1], [2]) == 0.0
    assert jaccard([1, 1, 2], (2, 1)) == 1.0
