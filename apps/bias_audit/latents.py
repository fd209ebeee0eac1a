"""Latents associated with a sensitive attribute, on images and on caption pairs.

The association of latent j with a contrast (group a against group b) is a
standardised mean difference (Cohen's d)::

    d_j = (mean_a(x_j) - mean_b(x_j)) / s_j,
    s_j = sqrt(((n_a - 1) var_a(x_j) + (n_b - 1) var_b(x_j)) / (n_a + n_b - 2)),

with sample variances (ddof = 1). ``d_j`` is NaN when ``s_j = 0`` (the latent is
constant, typically silent, on both groups) or a side has fewer than 2 rows.

With two sensitive groups the contrast is ``a`` vs ``b``; with more, each group is
contrasted with the rest and a latent is ranked by its largest |d|. Rows of the group
``unknown`` take no part. Intervals are percentile bootstrap intervals: on images,
rows are resampled within each group; on caption pairs, pairs are resampled.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from apps.bias_audit.metrics import UNKNOWN_GROUP

logger = logging.getLogger(__name__)

__all__ = [
    "Association",
    "caption_association",
    "group_distribution",
    "image_association",
    "latent_columns",
    "standardized_difference",
]


def standardized_difference(x_a: np.ndarray, x_b: np.ndarray, axis: int = 0) -> np.ndarray:
    """Cohen's d of every column: (mean_a - mean_b) / pooled sd.

    Parameters
    ----------
    x_a : ndarray, shape (n_a, k)
        Activations of group a (observations along ``axis``).
    x_b : ndarray, shape (n_b, k)
        Activations of group b.
    axis : int
        Observation axis of both arrays.

    Returns
    -------
    ndarray, shape (k,)
        NaN where the pooled standard deviation is 0 or a group has fewer than 2 rows.
    """
    x_a, x_b = np.asarray(x_a, dtype=np.float64), np.asarray(x_b, dtype=np.float64)
    n_a, n_b = x_a.shape[axis], x_b.shape[axis]
    if n_a < 2 or n_b < 2:
        shape = np.delete(np.array(x_a.shape), axis)
        return np.full(tuple(shape), np.nan)
    mean_a, mean_b = x_a.mean(axis), x_b.mean(axis)
    pooled = ((n_a - 1) * x_a.var(axis, ddof=1) + (n_b - 1) * x_b.var(axis, ddof=1)) / (n_a + n_b - 2)
    sd = np.sqrt(pooled)
    with np.errstate(invalid="ignore", divide="ignore"):
        d = (mean_a - mean_b) / sd
    # Round-off can leave a tiny positive sd on constant columns; treat it as zero.
    return np.where(sd > 1e-12 * (1 + np.abs(mean_a) + np.abs(mean_b)), d, np.nan)


def _weighted_d(counts_a, x_a, counts_b, x_b) -> np.ndarray:
    """Cohen's d on bootstrap replicates given as multinomial counts, (n_boot, k)."""

    def moments(counts, x):
        n = x.shape[0]
        mean = counts @ x / n
        var = (counts @ (x * x) / n - mean**2) * n / (n - 1)
        return mean, np.clip(var, 0, None), n

    mean_a, var_a, n_a = moments(counts_a, x_a)
    mean_b, var_b, n_b = moments(counts_b, x_b)
    sd = np.sqrt(((n_a - 1) * var_a + (n_b - 1) * var_b) / (n_a + n_b - 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        d = (mean_a - mean_b) / sd
    return np.where(sd > 1e-12 * (1 + np.abs(mean_a) + np.abs(mean_b)), d, np.nan)


def _interval(samples: np.ndarray, ci: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval per column of (n_boot, k), ignoring NaN replicates."""
    alpha = (1 - ci) / 2
    if samples.shape[0] == 0:
        nan = np.full(samples.shape[1], np.nan)
        return nan, nan.copy()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns give NaN, as intended
        low, high = np.nanquantile(samples, [alpha, 1 - alpha], axis=0)
    return low, high


@dataclass
class Association:
    """Association of every latent with the sensitive contrast(s).

    Attributes
    ----------
    table : pandas.DataFrame
        One row per (latent, contrast): ``latent``, ``contrast`` (``"a vs b"``), ``group_a``,
        ``group_b``, ``d``, ``abs_d``, ``mean_a``, ``mean_b``, ``frequency`` (share of rows where the
        latent is active), ``ci_low``, ``ci_high`` (bootstrap interval, computed for the top
        ``top`` latents only; NaN elsewhere).
    top : pandas.DataFrame
        The ``top`` rows with the largest |d| (one row per latent, its strongest contrast).
    contrasts : list of (str, str)
        Contrasts that were computed.
    """

    table: pd.DataFrame
    top: pd.DataFrame
    contrasts: list[tuple[str, str]] = field(default_factory=list)


def _contrasts(groups: list[str], contrast: tuple[str, str] | None) -> list[tuple[str, str]]:
    known = sorted(g for g in set(groups) if g != UNKNOWN_GROUP)
    if contrast is not None:
        missing = [g for g in contrast if g not in known]
        if missing:
            raise ValueError(f"contrast groups {missing} are not among the sensitive groups {known}.")
        return [tuple(contrast)]
    if len(known) < 2:
        raise ValueError(f"need at least 2 known sensitive groups for an association; got {known}.")
    if len(known) == 2:
        # For gender the sign reads "more active on male"; otherwise alphabetical.
        if set(known) == {"male", "female"}:
            return [("male", "female")]
        return [(known[0], known[1])]
    return [(g, "rest") for g in known]


LatentBlocks = Callable[[], Iterable[np.ndarray]]
"""A callable that yields the latents of all rows, in row order, as (n_block, d_sae) blocks."""


def _blocks(latents: np.ndarray | LatentBlocks) -> Iterable[np.ndarray]:
    if callable(latents):
        return (np.asarray(block, dtype=np.float64) for block in latents())
    return iter([np.asarray(latents, dtype=np.float64)])


def _group_moments(latents, masks: dict[str, np.ndarray]):
    """Per group: row count, sum and sum of squares of every latent, and active counts.

    Streams over blocks so that the (n_rows, d_sae) latents never need to exist at once.
    """
    sums, squares, counts, active, offset = {}, {}, {}, None, 0
    for block in _blocks(latents):
        rows = slice(offset, offset + block.shape[0])
        offset += block.shape[0]
        active = (block > 0).sum(0) if active is None else active + (block > 0).sum(0)
        for name, mask in masks.items():
            part = block[mask[rows]]
            sums[name] = sums.get(name, 0.0) + part.sum(0)
            squares[name] = squares.get(name, 0.0) + (part * part).sum(0)
            counts[name] = counts.get(name, 0) + part.shape[0]
    return sums, squares, counts, active, offset


def latent_columns(latents: np.ndarray | LatentBlocks, columns: np.ndarray) -> np.ndarray:
    """Gather the given latent columns, (n_rows, len(columns)), block by block."""
    return np.concatenate([block[:, columns] for block in _blocks(latents)], axis=0)


def _d_from_moments(s_a, q_a, n_a, s_b, q_b, n_b) -> np.ndarray:
    """Cohen's d from sums and sums of squares (the same formula as standardized_difference)."""
    if n_a < 2 or n_b < 2:
        return np.full(np.shape(s_a), np.nan)
    mean_a, mean_b = s_a / n_a, s_b / n_b
    var_a = np.clip((q_a - n_a * mean_a**2) / (n_a - 1), 0, None)
    var_b = np.clip((q_b - n_b * mean_b**2) / (n_b - 1), 0, None)
    sd = np.sqrt(((n_a - 1) * var_a + (n_b - 1) * var_b) / (n_a + n_b - 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        d = (mean_a - mean_b) / sd
    # Cancellation in q - n mean^2 leaves a tiny sd on constant columns: treat it as zero.
    scale = np.sqrt((q_a + q_b) / (n_a + n_b)) + 1.0
    return np.where(sd > 1e-6 * scale, d, np.nan)


def image_association(
    latents: np.ndarray | LatentBlocks,
    groups: np.ndarray | list[str],
    contrast: tuple[str, str] | None = None,
    top: int = 20,
    min_active: int = 5,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> Association:
    """Standardised activation differences of every latent between sensitive groups.

    Parameters
    ----------
    latents : ndarray, shape (n_images, d_sae), or callable
        Dictionary latents of the audit images, or a callable yielding them as
        (n_block, d_sae) blocks in row order. The callable is called twice: once for the
        moments of every latent, then for the columns of the listed latents.
    groups : array of str, shape (n_images,)
        Sensitive group of each image; ``unknown`` rows are left out.
    contrast : (str, str), optional
        The two groups to contrast. By default the two groups are contrasted (``male``
        vs ``female`` for gender). With more than two groups, each is contrasted with the rest.
    top : int
        Number of latents listed (and given bootstrap intervals).
    min_active : int
        Latents active (> 0) on fewer images are not listed.
    n_boot, ci, seed
        Bootstrap settings (stratified by group).

    Returns
    -------
    Association
    """
    groups = np.asarray([str(g) for g in groups], dtype=object)
    if not callable(latents):
        latents = np.asarray(latents, dtype=np.float64)
        if latents.ndim != 2 or latents.shape[0] != len(groups):
            raise ValueError(
                f"latents must have shape (n_images, d_sae) with n_images={len(groups)}; got {latents.shape}."
            )
    pairs = _contrasts(groups.tolist(), contrast)
    masks = {}
    for a, b in pairs:
        masks[a] = groups == a
        masks[b] = (groups != a) & (groups != UNKNOWN_GROUP) if b == "rest" else groups == b
        if b == "rest":
            masks[f"rest of {a}"] = masks.pop(b)
    sums, squares, counts, active, n_rows = _group_moments(latents, masks)
    if n_rows != len(groups):
        raise ValueError(f"the latents have {n_rows} rows but groups has {len(groups)}.")
    frequency = active / max(1, n_rows)
    rows = []
    for a, b in pairs:
        key_b = f"rest of {a}" if b == "rest" else b
        d = _d_from_moments(sums[a], squares[a], counts[a], sums[key_b], squares[key_b], counts[key_b])
        rows.append(
            pd.DataFrame(
                {
                    "latent": np.arange(len(d)),
                    "contrast": f"{a} vs {b}",
                    "group_a": a,
                    "group_b": b,
                    "d": d,
                    "abs_d": np.abs(d),
                    "mean_a": sums[a] / max(1, counts[a]),
                    "mean_b": sums[key_b] / max(1, counts[key_b]),
                    "frequency": frequency,
                    "n_active": active,
                }
            )
        )
    table = pd.concat(rows, ignore_index=True)
    table["ci_low"] = np.nan
    table["ci_high"] = np.nan

    eligible = table[(table["n_active"] >= min_active) & table["abs_d"].notna()]
    chosen = eligible.sort_values("abs_d", ascending=False, kind="stable").drop_duplicates("latent").head(top)

    # Intervals for the listed latents only: the bootstrap is O(n_boot * n_images * top).
    if not chosen.empty and n_boot > 0:
        listed = np.sort(chosen["latent"].unique())
        gathered = latent_columns(latents, listed)
        position = {int(latent): i for i, latent in enumerate(listed)}
        rng = np.random.default_rng(seed)
        for a, b in pairs:
            picked = chosen[(chosen["group_a"] == a) & (chosen["group_b"] == b)]
            if picked.empty:
                continue
            key_b = f"rest of {a}" if b == "rest" else b
            columns = [position[int(latent)] for latent in picked["latent"]]
            x_a, x_b = gathered[masks[a]][:, columns], gathered[masks[key_b]][:, columns]
            counts_a = rng.multinomial(x_a.shape[0], np.full(x_a.shape[0], 1 / x_a.shape[0]), size=n_boot)
            counts_b = rng.multinomial(x_b.shape[0], np.full(x_b.shape[0], 1 / x_b.shape[0]), size=n_boot)
            low, high = _interval(_weighted_d(counts_a, x_a, counts_b, x_b), ci)
            for latent, lo, hi in zip(picked["latent"], low, high):
                where = (table["latent"] == latent) & (table["group_a"] == a) & (table["group_b"] == b)
                table.loc[where, "ci_low"] = lo
                table.loc[where, "ci_high"] = hi
    top_table = (
        table.merge(chosen[["latent", "group_a", "group_b"]], on=["latent", "group_a", "group_b"])
        .sort_values("abs_d", ascending=False, kind="stable")
        .reset_index(drop=True)
    )
    return Association(table=table, top=top_table, contrasts=pairs)


def caption_association(
    latents_a: np.ndarray,
    latents_b: np.ndarray,
    groups: tuple[str, str] = ("male", "female"),
    top: int = 20,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> Association:
    """Standardised activation differences on caption pairs.

    Parameters
    ----------
    latents_a : ndarray, shape (n_pairs, d_sae)
        Latents of the captions of ``groups[0]`` ("a man riding a bike").
    latents_b : ndarray, shape (n_pairs, d_sae)
        Latents of the matching captions of ``groups[1]``.
    groups : (str, str)
        Names of the two sides.
    top, n_boot, ci, seed
        As in :func:`image_association`; pairs are resampled together.

    Returns
    -------
    Association
        ``frequency`` is the share of captions (both sides) where the latent is active.
    """
    from mmono_features.stats import bootstrap_ci

    latents_a, latents_b = np.asarray(latents_a, np.float64), np.asarray(latents_b, np.float64)
    if latents_a.shape != latents_b.shape or latents_a.ndim != 2:
        raise ValueError(f"caption latents must both be (n_pairs, d_sae); got {latents_a.shape} and {latents_b.shape}.")
    d = standardized_difference(latents_a, latents_b)
    active = ((latents_a > 0) | (latents_b > 0)).sum(0)
    table = pd.DataFrame(
        {
            "latent": np.arange(latents_a.shape[1]),
            "contrast": f"{groups[0]} vs {groups[1]}",
            "group_a": groups[0],
            "group_b": groups[1],
            "d": d,
            "abs_d": np.abs(d),
            "mean_a": latents_a.mean(0),
            "mean_b": latents_b.mean(0),
            "frequency": ((latents_a > 0).sum(0) + (latents_b > 0).sum(0)) / (2 * latents_a.shape[0]),
            "n_active": active,
            "ci_low": np.nan,
            "ci_high": np.nan,
        }
    )
    chosen = table[table["abs_d"].notna()].sort_values("abs_d", ascending=False).head(top)
    if not chosen.empty and n_boot > 0:
        columns = chosen["latent"].to_numpy()
        stacked = np.stack([latents_a[:, columns], latents_b[:, columns]], axis=1)  # (n_pairs, 2, top)

        def paired_d(x: np.ndarray, axis: int) -> np.ndarray:
            # x: (n_block, n_pairs, 2, top) with the pairs on `axis`.
            side_a = np.take(x, 0, axis=axis + 1)
            side_b = np.take(x, 1, axis=axis + 1)
            return standardized_difference(side_a, side_b, axis=axis)

        low, high = bootstrap_ci(stacked, statistic=paired_d, n_boot=n_boot, ci=ci, seed=seed, axis=0)
        table.loc[columns, "ci_low"] = np.asarray(low)
        table.loc[columns, "ci_high"] = np.asarray(high)
    top_table = table.loc[chosen["latent"].to_numpy()].reset_index(drop=True)
    return Association(table=table, top=top_table, contrasts=[groups])


def group_distribution(latents: np.ndarray, group_of: pd.Series, all_groups: pd.Series) -> pd.DataFrame:
    """Count listed latents per modality group, next to the share of each group overall.

    Parameters
    ----------
    latents : ndarray of int
        The listed latents.
    group_of : pandas.Series
        Modality group of each latent, indexed by latent.
    all_groups : pandas.Series
        Modality group of every latent of the dictionary (the base rate).

    Returns
    -------
    pandas.DataFrame
        Columns ``group``, ``n_listed``, ``share_listed``, ``share_all``.
    """
    listed = group_of.reindex(latents).fillna("unscored")
    names = sorted(set(all_groups.dropna()) | set(listed))
    n = max(1, len(latents))
    total = max(1, len(all_groups))
    return pd.DataFrame(
        {
            "group": names,
            "n_listed": [int((listed == g).sum()) for g in names],
            "share_listed": [float((listed == g).sum()) / n for g in names],
            "share_all": [float((all_groups == g).sum()) / total for g in names],
        }
    )
