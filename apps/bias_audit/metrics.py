"""Group fairness metrics of one-vs-rest predictions, with bootstrap intervals.

Point estimates come from fairlearn's :class:`~fairlearn.metrics.MetricFrame`, one row
per sensitive group. Intervals come from a stratified bootstrap: rows are resampled
within each group (group sizes stay fixed) and every metric is recomputed on the same
replicates, so that a baseline and its ablations are compared on identical resamples.

Definitions, for a positive label ``pos`` and the rows of one group:

- accuracy = mean of ``[y_true == pos] == [y_pred == pos]`` over rows whose truth is known;
- selection rate = mean of ``[y_pred == pos]`` over all rows;
- true positive rate = P(y_pred == pos | y_true == pos);
- false positive rate = P(y_pred == pos | y_true != pos);
- count = number of rows.

A rate whose denominator is empty (no positive rows for the TPR, no rows with known
truth for the accuracy, ...) is NaN, never 0, and a warning names the group and the
metric. Between-group figures use the groups other than ``unknown``:

- demographic parity difference = max_g SR_g - min_g SR_g;
- demographic parity ratio = min_g SR_g / max_g SR_g;
- equalized odds difference = max(TPR range, FPR range), where a range is max_g - min_g.

A group whose rate is NaN is left out of that range. A range over fewer than two groups
is NaN, so the equalized odds difference is NaN unless both of its ranges are defined.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

__all__ = [
    "DISPARITIES",
    "GROUP_METRICS",
    "UNKNOWN_GROUP",
    "GroupMetrics",
    "bootstrap_replicates",
    "compute_group_metrics",
]

UNKNOWN_GROUP = "unknown"
"""Name of the sensitive group that collects rows with a missing or unknown value."""

GROUP_METRICS = ("accuracy", "selection_rate", "true_positive_rate", "false_positive_rate", "count")
"""Metrics reported per sensitive group (and overall)."""

DISPARITIES = ("demographic_parity_difference", "demographic_parity_ratio", "equalized_odds_difference")
"""Between-group figures, computed over the groups other than ``unknown``."""

_REASONS = {
    "accuracy": "no rows with a known label",
    "selection_rate": "no rows",
    "true_positive_rate": "no positive examples",
    "false_positive_rate": "no negative examples",
}


@dataclass
class GroupMetrics:
    """Fairness metrics of one set of predictions.

    Attributes
    ----------
    positive_label : str
        The label treated as positive (one-vs-rest).
    by_group : pandas.DataFrame
        Index: sensitive group; columns ``<metric>``, ``<metric>_low``, ``<metric>_high``
        for each metric of :data:`GROUP_METRICS`.
    overall : dict of str to float
        The same metrics over all rows (keys ``<metric>``, ``<metric>_low``, ``<metric>_high``).
    disparities : dict of str to float
        Each figure of :data:`DISPARITIES` with ``_low`` and ``_high`` keys.
    undefined : list of (group, metric)
        Pairs whose value is NaN because the rate has an empty denominator.
    samples : dict of (str, str) to ndarray, shape (n_boot,)
        Bootstrap values keyed by (group, metric), ("all", metric) and
        ("between_groups", disparity). The audit pools them over random-ablation draws.
    """

    positive_label: str
    by_group: pd.DataFrame
    overall: dict[str, float]
    disparities: dict[str, float]
    undefined: list[tuple[str, str]] = field(default_factory=list)
    samples: dict[tuple[str, str], np.ndarray] = field(default_factory=dict, repr=False)

    def to_frame(self, **extra: str) -> pd.DataFrame:
        """Return a long table: scope, group, metric, value, ci_low, ci_high (+ ``extra`` columns)."""
        records = []
        for group, row in self.by_group.iterrows():
            for metric in GROUP_METRICS:
                records.append(("group", str(group), metric, row[metric], row[f"{metric}_low"], row[f"{metric}_high"]))
        for metric in GROUP_METRICS:
            o = self.overall
            records.append(("overall", "all", metric, o[metric], o[f"{metric}_low"], o[f"{metric}_high"]))
        for name in DISPARITIES:
            d = self.disparities
            records.append(("disparity", "between_groups", name, d[name], d[f"{name}_low"], d[f"{name}_high"]))
        frame = pd.DataFrame(records, columns=["scope", "group", "metric", "value", "ci_low", "ci_high"])
        for key, value in extra.items():
            frame.insert(0, key, value)
        return frame

    def to_dict(self) -> dict:
        """Return a JSON-serialisable dict (NaN becomes None)."""
        groups = {
            str(group): {key: _json_float(value) for key, value in row.items()}
            for group, row in self.by_group.iterrows()
        }
        return {
            "positive_label": self.positive_label,
            "by_group": groups,
            "overall": {k: _json_float(v) for k, v in self.overall.items()},
            "disparities": {k: _json_float(v) for k, v in self.disparities.items()},
            "undefined": [{"group": g, "metric": m} for g, m in self.undefined],
        }


def _json_float(value) -> float | None:
    value = float(value)
    return None if np.isnan(value) else value


# --- fairlearn metric callables, wrapped so that an empty denominator gives NaN ---------


# fairlearn converts its input arrays, which can turn None into NaN or "None". A missing
# label therefore travels through MetricFrame as this sentinel string.
_MISSING = "\x00missing-label"


def _known(y_true: np.ndarray) -> np.ndarray:
    return np.array([t != _MISSING for t in y_true], dtype=bool)


def _wrapped_metrics(positive_label: str) -> dict:
    from fairlearn.metrics import count, false_positive_rate, selection_rate, true_positive_rate

    def accuracy(y_true, y_pred) -> float:
        y_true, y_pred = np.asarray(y_true, dtype=object), np.asarray(y_pred, dtype=object)
        known = _known(y_true)
        if not known.any():
            return float("nan")
        return float(np.mean((y_true[known] == positive_label) == (y_pred[known] == positive_label)))

    def selection(y_true, y_pred) -> float:
        if len(y_pred) == 0:
            return float("nan")
        return float(selection_rate(y_true, y_pred, pos_label=positive_label))

    def tpr(y_true, y_pred) -> float:
        # fairlearn returns 0 when a group has no positive example; that would read as
        # "never detected" instead of "undefined".
        y_true, y_pred = _binary_known(y_true, y_pred, positive_label)
        if not (y_true == 1).any():
            return float("nan")
        return float(true_positive_rate(y_true, y_pred, pos_label=1))

    def fpr(y_true, y_pred) -> float:
        y_true, y_pred = _binary_known(y_true, y_pred, positive_label)
        if not (y_true == 0).any():
            return float("nan")
        return float(false_positive_rate(y_true, y_pred, pos_label=1))

    def n_rows(y_true, y_pred) -> float:
        return float(count(y_true, y_pred))

    return {
        "accuracy": accuracy,
        "selection_rate": selection,
        "true_positive_rate": tpr,
        "false_positive_rate": fpr,
        "count": n_rows,
    }


def _binary_known(y_true, y_pred, positive_label: str) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_pred = np.asarray(y_true, dtype=object), np.asarray(y_pred, dtype=object)
    known = _known(y_true)
    return (
        (y_true[known] == positive_label).astype(int),
        (y_pred[known] == positive_label).astype(int),
    )


# --- bootstrap ------------------------------------------------------------------------


def bootstrap_replicates(groups: Sequence[str] | np.ndarray, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """Draw stratified bootstrap replicates of row indices.

    Parameters
    ----------
    groups : array of str, shape (n_rows,)
        Sensitive group of each row. Rows are resampled with replacement within their
        group, so each replicate keeps the group sizes.
    n_boot : int
        Number of replicates (0 gives an empty array, and every interval is NaN).
    seed : int
        Seed of ``numpy.random.default_rng``.

    Returns
    -------
    ndarray of int, shape (n_boot, n_rows)
        Column ``i`` of a replicate is a row of the same group as row ``i``.
    """
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0; got {n_boot}.")
    groups = np.asarray(groups, dtype=object)
    rng = np.random.default_rng(seed)
    replicates = np.empty((n_boot, len(groups)), dtype=np.int64)
    for group in sorted(set(groups.tolist()), key=str):
        members = np.flatnonzero(groups == group)
        replicates[:, members] = members[rng.integers(0, len(members), size=(n_boot, len(members)))]
    return replicates


def _interval(samples: np.ndarray, ci: float) -> tuple[float, float]:
    """Percentile interval of ``samples`` (n_boot,), ignoring NaN replicates."""
    samples = samples[~np.isnan(samples)]
    if samples.size == 0:
        return float("nan"), float("nan")
    alpha = (1.0 - ci) / 2.0
    low, high = np.quantile(samples, [alpha, 1.0 - alpha])
    return float(low), float(high)


def _rates_numpy(truth: np.ndarray, pred: np.ndarray, index: np.ndarray) -> dict[str, np.ndarray]:
    """Group metrics on resampled rows, vectorised over replicates.

    ``truth`` is +1 (positive), 0 (negative) or -1 (unknown), ``pred`` is 0/1, both (n_rows,);
    ``index`` (n_boot, n_g) selects the rows of one group in each replicate.
    Returns one (n_boot,) array per metric, NaN where the denominator is empty.
    """
    t, p = truth[index], pred[index]
    known, pos, neg = t >= 0, t == 1, t == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {
            "accuracy": ((t == p) & known).sum(1) / known.sum(1),
            "selection_rate": p.mean(1) if index.shape[1] else np.full(index.shape[0], np.nan),
            "true_positive_rate": (p.astype(bool) & pos).sum(1) / pos.sum(1),
            "false_positive_rate": (p.astype(bool) & neg).sum(1) / neg.sum(1),
            "count": np.full(index.shape[0], float(index.shape[1])),
        }
    return {k: np.where(np.isfinite(v), v, np.nan).astype(float) for k, v in out.items()}


def _range(values: np.ndarray) -> np.ndarray:
    """Max minus min over groups (axis 1) of (n, n_groups), NaN with fewer than 2 defined."""
    defined = (~np.isnan(values)).sum(1)
    with np.errstate(invalid="ignore"), _quiet_nan():
        spread = np.nanmax(values, 1) - np.nanmin(values, 1)
    return np.where(defined >= 2, spread, np.nan)


class _quiet_nan:
    """Silence numpy's all-NaN slice warnings, because NaN is the intended result there."""

    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("ignore", category=RuntimeWarning)

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)


def _disparities(selection: np.ndarray, tpr: np.ndarray, fpr: np.ndarray) -> dict[str, np.ndarray]:
    """Between-group figures from per-group rates, each (n, n_groups) -> (n,)."""
    dpd = _range(selection)
    with np.errstate(invalid="ignore", divide="ignore"), _quiet_nan():
        low, high = np.nanmin(selection, 1), np.nanmax(selection, 1)
        dpr = np.where(high > 0, low / high, np.nan)
    dpr = np.where((~np.isnan(selection)).sum(1) >= 2, dpr, np.nan)
    tpr_range, fpr_range = _range(tpr), _range(fpr)
    eod = np.where(np.isnan(tpr_range) | np.isnan(fpr_range), np.nan, np.fmax(tpr_range, fpr_range))
    return {
        "demographic_parity_difference": dpd,
        "demographic_parity_ratio": dpr,
        "equalized_odds_difference": eod,
    }


# --- public entry -----------------------------------------------------------------------


def compute_group_metrics(
    y_true: Sequence[str | None] | None,
    y_pred: Sequence[str],
    sensitive: Sequence[str],
    positive_label: str,
    replicates: np.ndarray | None = None,
    ci: float = 0.95,
    warn: bool = True,
) -> GroupMetrics:
    """Audit one-vs-rest predictions per sensitive group.

    Parameters
    ----------
    y_true : sequence of str or None, shape (n_rows,), or None
        True labels. ``None`` marks a row whose truth is unknown, which counts for the
        selection rate only. ``None`` for the whole argument means no truth at all.
    y_pred : sequence of str, shape (n_rows,)
        Predicted labels.
    sensitive : sequence of str, shape (n_rows,)
        Sensitive group of each row (``unknown`` for missing values).
    positive_label : str
        Label treated as positive.
    replicates : ndarray of int, shape (n_boot, n_rows), optional
        Bootstrap replicates from :func:`bootstrap_replicates`; without them the
        intervals are NaN.
    ci : float
        Coverage of the percentile intervals.
    warn : bool
        Log a warning for every undefined (group, metric).

    Returns
    -------
    GroupMetrics
        See the module docstring for the definitions.
    """
    from fairlearn.metrics import MetricFrame

    y_pred = np.asarray(list(y_pred), dtype=object)
    sensitive = np.asarray([str(s) for s in sensitive], dtype=object)
    n = len(y_pred)
    if y_true is None:
        y_true = np.full(n, None, dtype=object)
    y_true = np.asarray(list(y_true), dtype=object)
    if not (len(y_true) == len(sensitive) == n):
        raise ValueError(
            f"y_true, y_pred and sensitive must have the same length; got {len(y_true)}, {n}, {len(sensitive)}."
        )
    if n == 0:
        raise ValueError("no rows to audit: the input table is empty after loading.")
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1); got {ci}.")

    # 1. point estimates through fairlearn
    frame = MetricFrame(
        metrics=_wrapped_metrics(positive_label),
        y_true=np.array([_MISSING if t is None else t for t in y_true], dtype=object),
        y_pred=y_pred,
        sensitive_features=pd.Series(sensitive, name="group"),
    )
    by_group = frame.by_group.astype(float)
    by_group.index = by_group.index.astype(str)
    groups = list(by_group.index)
    overall = {m: float(frame.overall[m]) for m in GROUP_METRICS}

    undefined = [(g, m) for g in groups for m in _REASONS if np.isnan(by_group.loc[g, m])]
    if warn:
        for group, metric in undefined:
            logger.warning(
                "group %r: %s is undefined (%s for label %r); reported as NaN.",
                group, metric, _REASONS[metric], positive_label,
            )

    known_groups = [g for g in groups if g != UNKNOWN_GROUP]
    point = by_group.loc[known_groups]
    disparities_point = _disparities(
        point["selection_rate"].to_numpy()[None],
        point["true_positive_rate"].to_numpy()[None],
        point["false_positive_rate"].to_numpy()[None],
    )

    # 2. bootstrap intervals, recomputed with numpy on the shared replicates
    truth = np.array([-1 if t is None else int(t == positive_label) for t in y_true], dtype=np.int8)
    pred = (y_pred == positive_label).astype(np.int8)
    n_boot = 0 if replicates is None else replicates.shape[0]
    if replicates is not None and replicates.shape[1] != n:
        raise ValueError(f"replicates must have shape (n_boot, {n}); got {replicates.shape}.")
    per_group_boot: dict[str, dict[str, np.ndarray]] = {}
    for group in groups:
        members = np.flatnonzero(sensitive == group)
        index = replicates[:, members] if n_boot else np.empty((0, len(members)), dtype=np.int64)
        per_group_boot[group] = _rates_numpy(truth, pred, index)
    overall_boot = _rates_numpy(truth, pred, replicates if n_boot else np.empty((0, n), dtype=np.int64))

    table = by_group[list(GROUP_METRICS)].copy()
    for metric in GROUP_METRICS:
        bounds = [_interval(per_group_boot[g][metric], ci) for g in groups]
        table[f"{metric}_low"] = [b[0] for b in bounds]
        table[f"{metric}_high"] = [b[1] for b in bounds]
        overall[f"{metric}_low"], overall[f"{metric}_high"] = _interval(overall_boot[metric], ci)

    stacked = {
        m: np.stack([per_group_boot[g][m] for g in known_groups], axis=1) if known_groups else np.empty((n_boot, 0))
        for m in ("selection_rate", "true_positive_rate", "false_positive_rate")
    }
    disparities_boot = _disparities(
        stacked["selection_rate"], stacked["true_positive_rate"], stacked["false_positive_rate"]
    )
    disparities: dict[str, float] = {}
    for name in DISPARITIES:
        disparities[name] = float(disparities_point[name][0])
        disparities[f"{name}_low"], disparities[f"{name}_high"] = _interval(disparities_boot[name], ci)

    samples = {(g, m): per_group_boot[g][m] for g in groups for m in GROUP_METRICS}
    samples.update({("all", m): overall_boot[m] for m in GROUP_METRICS})
    samples.update({("between_groups", d): disparities_boot[d] for d in DISPARITIES})
    column_order = [c for m in GROUP_METRICS for c in (m, f"{m}_low", f"{m}_high")]
    return GroupMetrics(
        positive_label=positive_label,
        by_group=table[column_order],
        overall=overall,
        disparities=disparities,
        undefined=undefined,
        samples=samples,
    )
