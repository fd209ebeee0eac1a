"""Percentile bootstrap intervals and set overlap.

Every interval here is a percentile bootstrap. Rows (the first axis, or ``axis``) are
resampled with replacement ``n_boot`` times with a seeded :class:`numpy.random.Generator`
and the statistic is computed on each resample. The interval is the pair of
``(1 - ci) / 2`` and ``(1 + ci) / 2`` quantiles of those replicates (linear
interpolation). Resampled indices are drawn once per replicate and shared by every
column, so one call handles many columns at the cost of a single draw.

Edge cases, the same in every function:

- ``n = 0`` rows: the statistic is undefined and the interval is ``(nan, nan)``.
- ``n = 1`` row: every resample repeats that row, so the interval collapses to the
  point estimate, ``(x, x)``. Such an interval measures no uncertainty, so callers that
  need a real interval must require more rows.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import numpy as np

__all__ = ["bootstrap_ci", "bootstrap_ci_columns", "bootstrap_mean_ci", "jaccard"]

# Maximum number of elements in one resampled block, so that a block takes about
# 128 MiB of float64 whatever n_boot and the data size are.
_BLOCK_ELEMENTS = 1 << 24


def _check_options(n_boot: int, ci: float) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer; got {n_boot!r}.")
    if not isinstance(ci, (float, int, np.floating)) or not 0.0 < float(ci) < 1.0:
        raise ValueError(f"ci must be a coverage level strictly between 0 and 1, e.g. 0.95; got {ci!r}.")


def _quantile_levels(ci: float) -> tuple[float, float]:
    alpha = (1.0 - float(ci)) / 2.0
    return alpha, 1.0 - alpha


def _nanquantiles(replicates: np.ndarray, ci: float, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the two percentile bounds of ``replicates`` along ``axis``, ignoring NaN."""
    low_q, high_q = _quantile_levels(ci)
    with warnings.catch_warnings():
        # Columns whose replicates are all NaN (no data) give NaN bounds without a warning.
        warnings.simplefilter("ignore", RuntimeWarning)
        bounds = np.nanquantile(replicates, [low_q, high_q], axis=axis)
    return bounds[0], bounds[1]


def _scalar_or_array(x: np.ndarray) -> float | np.ndarray:
    x = np.asarray(x)
    return float(x) if x.ndim == 0 else x


def bootstrap_ci(
    values: Iterable[float] | np.ndarray,
    statistic: Callable[..., np.ndarray] = np.mean,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    axis: int = 0,
) -> tuple[float | np.ndarray, float | np.ndarray]:
    """Percentile bootstrap interval of ``statistic`` over the entries along ``axis``.

    Parameters
    ----------
    values : array_like, shape (n,) or (..., n, ...)
        Observations; the ``n`` entries along ``axis`` are resampled together (one
        index draw per replicate, applied to every other coordinate).
    statistic : callable
        ``statistic(x, axis=...)`` reducing one axis, such as ``np.mean``,
        ``np.median`` or ``np.nanmean``. It is called on blocks of shape
        ``(..., n_block, n, ...)`` with the reduced axis after the replicate axis.
    n_boot : int
        Number of bootstrap replicates.
    ci : float
        Coverage of the interval, in (0, 1).
    seed : int
        Seed of the :class:`numpy.random.Generator` drawing the indices.
    axis : int
        Axis of ``values`` holding the observations.

    Returns
    -------
    low, high : float or ndarray
        Floats for 1-D ``values``; otherwise arrays of the statistic's output shape.
        ``(nan, nan)`` when ``n = 0``; ``(x, x)`` when ``n = 1`` (see module notes).
        Replicates where the statistic is NaN are ignored.
    """
    _check_options(n_boot, ci)
    data = np.asarray(values, dtype=np.float64)
    if data.ndim == 0:
        raise ValueError("invalid values: expected an array with at least one dimension, got a scalar.")
    axis = axis % data.ndim
    n = data.shape[axis]
    out_shape = data.shape[:axis] + data.shape[axis + 1 :]
    if n == 0:
        nan = np.full(out_shape, np.nan)
        return _scalar_or_array(nan), _scalar_or_array(nan.copy())

    rng = np.random.default_rng(seed)
    per_replicate = max(1, data.size)
    block = max(1, min(n_boot, _BLOCK_ELEMENTS // per_replicate))
    replicates = []
    for start in range(0, n_boot, block):
        size = min(block, n_boot - start)
        idx = rng.integers(0, n, size=(size, n))
        # take() puts (size, n) where the observation axis was, so the statistic
        # reduces the n axis, which is now right after the replicate axis.
        resampled = np.take(data, idx, axis=axis)
        replicates.append(np.asarray(statistic(resampled, axis=axis + 1), dtype=np.float64))
    stacked = np.concatenate(replicates, axis=axis)
    low, high = _nanquantiles(stacked, ci, axis=axis)
    return _scalar_or_array(low), _scalar_or_array(high)


def bootstrap_ci_columns(
    matrix: np.ndarray,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap intervals of the NaN-aware mean of every column at once.

    Rows are resampled with replacement; each replicate's column mean is taken over the
    drawn rows where that column is not NaN. The draw is turned into per-row counts,
    so a block of replicates costs one matrix product,
    ``means = (counts @ values) / (counts @ present)``, instead of materialising the
    resampled data.

    Parameters
    ----------
    matrix : array_like, shape (n, m)
        ``n`` observations of ``m`` columns; NaN marks a missing value.
    n_boot, ci, seed
        As in :func:`bootstrap_ci`. With the same seed and a NaN-free matrix the
        intervals equal ``bootstrap_ci(matrix, np.mean, ...)``.

    Returns
    -------
    low, high : ndarray, shape (m,)
        NaN for columns with no non-NaN value; ``(x, x)`` for a column with one.
        Replicates that drew no non-NaN row of a column are left out of its quantiles.
    """
    _check_options(n_boot, ci)
    data = np.asarray(matrix, dtype=np.float64)
    if data.ndim != 2:
        raise ValueError(f"matrix must have shape (n, m); got shape {data.shape}.")
    n, m = data.shape
    if n == 0:
        return np.full(m, np.nan), np.full(m, np.nan)
    present = ~np.isnan(data)
    filled = np.where(present, data, 0.0)
    present = present.astype(np.float64)

    rng = np.random.default_rng(seed)
    block = max(1, min(n_boot, _BLOCK_ELEMENTS // max(n, m)))
    replicates = np.empty((n_boot, m))
    for start in range(0, n_boot, block):
        size = min(block, n_boot - start)
        idx = rng.integers(0, n, size=(size, n))
        # Counts of each row in each replicate via one bincount over offset indices.
        offsets = idx + (np.arange(size) * n)[:, None]
        counts = np.bincount(offsets.ravel(), minlength=size * n).reshape(size, n).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            replicates[start : start + size] = (counts @ filled) / (counts @ present)
    return _nanquantiles(replicates, ci, axis=0)


def bootstrap_mean_ci(
    values: Iterable[float] | np.ndarray,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> tuple[float | np.ndarray, float | np.ndarray, float | np.ndarray]:
    """Mean and percentile bootstrap interval, ignoring NaN.

    Parameters
    ----------
    values : array_like, shape (n,) or (n, m)
        Observations (rows); NaN entries are ignored.
    n_boot, ci, seed
        As in :func:`bootstrap_ci`.

    Returns
    -------
    mean, low, high : float, or ndarray of shape (m,) for 2-D input
        ``(nan, nan, nan)`` when there is no non-NaN value; ``(x, x, x)`` for one.
    """
    data = np.asarray(values, dtype=np.float64)
    if data.ndim not in (1, 2):
        raise ValueError(f"values must have shape (n,) or (n, m); got shape {data.shape}.")
    matrix = data[:, None] if data.ndim == 1 else data
    counts = (~np.isnan(matrix)).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nansum(matrix, axis=0) / counts
    low, high = bootstrap_ci_columns(matrix, n_boot=n_boot, ci=ci, seed=seed)
    if data.ndim == 1:
        return float(mean[0]), float(low[0]), float(high[0])
    return mean, low, high


def jaccard(a: Iterable, b: Iterable) -> float:
    """Jaccard index ``|a & b| / |a | b|`` of two collections taken as sets.

    Two empty sets are identical, so their index is 1.0 (not NaN).
    """
    set_a, set_b = set(a), set(b)
    union = len(set_a | set_b)
    if union == 0:
        return 1.0
    return len(set_a & set_b) / union

