"""Modality Dominance Score (MDS) of dictionary latents, groups and score files.

For latent j and pair i, with activations ``p = a_j(u_i)`` on the image embedding and
``q = a_j(v_i)`` on the caption embedding (``|p|`` and ``|q|`` with ``absolute=True``,
for scoring signed raw backbone coordinates)::

    s_ij  = (p - q) / (p + q)     over the pairs where p + q > eps
    MDS_j = mean_i s_ij           in [-1, 1]; +1 fires only on images, -1 only on texts

Pairs where the latent is silent in both modalities are left out. Each MDS comes with
the number of pairs it rests on (``n_active``) and a percentile bootstrap interval over
pairs. Latents active on fewer than ``min_active`` pairs get the group ``"rare"``. The
others are split into image-dominant (ImgD), text-dominant (TextD) and cross-modal
(CrossD) by :func:`assign_groups`.

Scale. The scores are computed from running sums over chunks of pairs, so no
``(n_pairs, d_sae)`` matrix needs to exist at once: :func:`score_dictionary` encodes a
chunk, folds it into a :class:`ModalityDominanceAccumulator` and drops it. The bootstrap
uses Poisson(1) weights per pair (the streaming form of the pair bootstrap): replicate b
of latent j is ``sum_i w_bi s_ij / sum_i w_bi [p + q > eps]``, the weighted mean over
the active pairs, where ``w_bi`` is the number of times pair i enters replicate b. The
same weights serve every latent, so a chunk of b pairs costs two products of the
``(d_sae, b)`` scores and indicators with the ``(b, n_boot)`` weights: about
``4 * n_boot * nnz`` operations on the sparse path (TopK latents: nnz is at most
``2 * k * b``) or ``4 * n_boot * b * d_sae`` on the dense path, and memory
``O(n_boot * d_sae)`` for the two replicate accumulators (256 MiB of float64 for
d_sae = 16384 and n_boot = 1000) plus ``O(b * (d_sae + n_boot))`` per chunk. For
d_sae = 16384, TopK k = 32 and 3M pairs that is at most about 8e11 operations. The weights of
each block of 4096 pairs come from a generator seeded by ``(seed, block index)``, so
results do not depend on the chunk size. They do depend on the device type, because
CPU and CUDA generators give different random streams. Measured on a shared 2-core CPU:
one chunk of 4096 pairs with d_sae = 16384, 32 active latents per sample and
n_boot = 1000 takes about 4 s (3 s without the bootstrap).

NOTE: the CUDA path (CUDA generators, sparse product on the GPU) has not run in the
tests, which are CPU only, and the GPU cost above is an operation count, not a timing.

Score files. :meth:`Scores.save` writes the table as ``.csv`` or ``.parquet`` and the
rule and settings to a sidecar ``<stem>.json`` beside it; :meth:`Scores.load` reads both.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mmono_features.fileio import atomic_write, json_safe

from mmono_features.progress import progress
from mmono_features.stats import bootstrap_ci_columns

logger = logging.getLogger(__name__)

__all__ = [
    "GROUPS",
    "RARE",
    "RULES",
    "ModalityDominanceAccumulator",
    "Scores",
    "assign_groups",
    "encode_pairs",
    "modality_dominance",
    "score_dictionary",
]

GROUPS = ("ImgD", "TextD", "CrossD")
RARE = "rare"
RULES = ("std", "quantile", "fixed")

TABLE_COLUMNS = ("latent", "mds", "ci_low", "ci_high", "n_active", "group", "frequency", "name")
SCORE_COLUMNS = ("latent", "mds", "ci_low", "ci_high", "n_active", "frequency")
_FLOAT_COLUMNS = ("mds", "ci_low", "ci_high", "frequency")
_INT_COLUMNS = ("latent", "n_active")

SIDECAR_FORMAT = "mmono.scores"
SIDECAR_VERSION = 1

# Pairs per block of bootstrap weights. It is fixed so that results do not depend on
# the chunk size the caller picks.
_WEIGHT_BLOCK = 4096
# Below this fraction of active (pair, latent) entries a chunk takes the sparse path.
_SPARSE_DENSITY = 0.02
# Poisson(1) cumulative probabilities P(X <= k) for k = 0..15. The mass above 15 is
# below 1e-13, far under the float32 resolution of the uniforms drawn against it.
_POISSON1_CDF = tuple(
    itertools.accumulate(math.exp(-1.0) / math.factorial(k) for k in range(16))
)

_MODALITY_OPTIONS = ("eps", "min_active", "n_boot", "ci", "seed", "absolute", "chunk_size")
_GROUP_OPTIONS = ("rule", "k", "quantiles", "thresholds")


# --------------------------------------------------------------------------------------
# Option checks


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}.")
    return int(value)


def _check_float(name: str, value: Any, low: float = -math.inf, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number; got {value!r}.")
    value = float(value)
    if not math.isfinite(value) or not low <= value <= high:
        raise ValueError(f"{name} must be a finite number in [{low}, {high}]; got {value!r}.")
    return value


def _check_ci(ci: Any) -> float:
    value = _check_float("ci", ci, 0.0, 1.0)
    if value in (0.0, 1.0):
        raise ValueError(f"ci must be strictly between 0 and 1, e.g. 0.95; got {ci!r}.")
    return value


# --------------------------------------------------------------------------------------
# Streaming MDS


class _PoissonWeights:
    """Bootstrap weights ``(n_pairs, n_boot)`` drawn block by block from Poisson(1).

    Block ``k`` covers pairs ``[k * 4096, (k + 1) * 4096)`` and is drawn from a generator
    seeded by ``(seed, k)``, so any slice of pairs gets the same weights whatever the
    chunking. Draws are inverse-CDF lookups of float32 uniforms.
    """

    def __init__(self, n_boot: int, seed: int, device: torch.device) -> None:
        self.n_boot = n_boot
        self.seed = seed
        self.device = device
        self.cdf = torch.tensor(_POISSON1_CDF, dtype=torch.float32, device=device)
        self._cached: tuple[int, torch.Tensor] | None = None

    def _block(self, index: int) -> torch.Tensor:
        if self._cached is not None and self._cached[0] == index:
            return self._cached[1]
        block_seed = int(np.random.SeedSequence([self.seed, index]).generate_state(1, dtype=np.uint64)[0])
        generator = torch.Generator(device=self.device).manual_seed(block_seed)
        uniforms = torch.rand((_WEIGHT_BLOCK, self.n_boot), generator=generator, device=self.device)
        # bucketize(right=True) returns k with cdf[k-1] <= u < cdf[k]: a Poisson(1) draw.
        weights = torch.bucketize(uniforms, self.cdf, right=True).to(torch.float32)
        self._cached = (index, weights)
        return weights

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        parts = []
        for index in range(start // _WEIGHT_BLOCK, (stop - 1) // _WEIGHT_BLOCK + 1):
            block_start = index * _WEIGHT_BLOCK
            lo, hi = max(start, block_start) - block_start, min(stop, block_start + _WEIGHT_BLOCK) - block_start
            parts.append(self._block(index)[lo:hi])
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class ModalityDominanceAccumulator:
    """Running sums of the Modality Dominance Score over chunks of pairs.

    Feed aligned chunks of image and text latents with :meth:`update`, then read the
    per-latent table with :meth:`table`. Memory is ``O(d_sae)`` for the point
    estimates plus ``O(n_boot * d_sae)`` for the bootstrap (see the module notes).

    Parameters
    ----------
    d_sae : int
        Number of latents (columns of every chunk).
    eps : float
        A pair counts for latent j when ``p + q > eps``; a sample counts as firing when
        its activation is ``> eps``.
    min_active : int
        Recorded in the table's ``attrs``; :func:`assign_groups` marks latents with
        fewer active pairs as rare.
    n_boot : int
        Bootstrap replicates; 0 skips the bootstrap (``ci_low``/``ci_high`` are NaN).
    ci : float
        Coverage of the intervals.
    seed : int
        Seed of the bootstrap weights.
    absolute : bool
        Score ``|p|`` and ``|q|`` (signed inputs such as raw backbone coordinates).
        Without it, negative activations raise ValueError.
    device : str or torch.device
        Where the sums live; chunks are moved there.

    Examples
    --------
    >>> acc = ModalityDominanceAccumulator(d_sae=4, n_boot=0)
    >>> acc.update(torch.tensor([[1.0, 0.0, 2.0, 0.0]]), torch.tensor([[0.0, 0.0, 2.0, 1.0]]))
    >>> acc.table()["mds"].tolist()
    [1.0, nan, 0.0, -1.0]
    """

    def __init__(
        self,
        d_sae: int,
        eps: float = 1e-8,
        min_active: int = 20,
        n_boot: int = 1000,
        ci: float = 0.95,
        seed: int = 0,
        absolute: bool = False,
        device: str | torch.device = "cpu",
    ) -> None:
        self.d_sae = _check_int("d_sae", d_sae, 1)
        self.eps = _check_float("eps", eps, 0.0)
        self.min_active = _check_int("min_active", min_active, 0)
        self.n_boot = _check_int("n_boot", n_boot, 0)
        self.ci = _check_ci(ci)
        self.seed = _check_int("seed", seed, 0)
        self.absolute = bool(absolute)
        self.device = torch.device(device)
        self.n_pairs = 0
        self._s_sum = torch.zeros(self.d_sae, dtype=torch.float64, device=self.device)
        self._n_active = torch.zeros(self.d_sae, dtype=torch.int64, device=self.device)
        self._n_fire = torch.zeros(self.d_sae, dtype=torch.int64, device=self.device)
        if self.n_boot:
            self._weights = _PoissonWeights(self.n_boot, self.seed, self.device)
            self._boot_num = torch.zeros(self.d_sae, self.n_boot, dtype=torch.float64, device=self.device)
            self._boot_den = torch.zeros(self.d_sae, self.n_boot, dtype=torch.float64, device=self.device)

    def update(self, image_latents: torch.Tensor | np.ndarray, text_latents: torch.Tensor | np.ndarray) -> None:
        """Fold in the next chunk of pairs.

        Parameters
        ----------
        image_latents, text_latents : Tensor or ndarray, shape (b, d_sae)
            Activations on the image and the caption of the same b pairs, in order.
        """
        p = torch.as_tensor(image_latents).detach().to(self.device, torch.float32)
        q = torch.as_tensor(text_latents).detach().to(self.device, torch.float32)
        if p.ndim != 2 or p.shape[1] != self.d_sae or p.shape != q.shape:
            raise ValueError(
                f"image_latents and text_latents must both have shape (b, {self.d_sae}) and be aligned by "
                f"pair; got {tuple(p.shape)} and {tuple(q.shape)}."
            )
        b = p.shape[0]
        if b == 0:
            return
        if self.absolute:
            p, q = p.abs(), q.abs()
        total = p + q
        # One pass finds NaN or infinity in either input, because both propagate into the sum.
        if not bool(torch.isfinite(total).all()):
            self._raise_non_finite(p, q, b)
        if not self.absolute:
            for name, x in (("image_latents", p), ("text_latents", q)):
                lowest = float(x.min())
                if lowest < 0:
                    raise ValueError(
                        f"invalid {name}: negative values (min {lowest:.4g}), but dictionary latents are >= 0. "
                        "Pass absolute=True to score signed coordinates by their magnitude."
                    )

        active = total > self.eps
        n_entries = int(active.sum())
        if n_entries < _SPARSE_DENSITY * active.numel():
            self._update_sparse(p, q, total, active)
        else:
            self._update_dense(p, q, total, active)
        self.n_pairs += b

    def _raise_non_finite(self, p: torch.Tensor, q: torch.Tensor, b: int) -> None:
        for name, x in (("image_latents", p), ("text_latents", q)):
            n_bad = int((~torch.isfinite(x)).sum())
            if n_bad:
                raise ValueError(
                    f"invalid {name}: {n_bad} NaN or infinite values in pairs {self.n_pairs}..{self.n_pairs + b - 1}. "
                    "Fix the encoder or drop those pairs."
                )
        raise ValueError(
            f"image_latents + text_latents overflows float32 in pairs {self.n_pairs}..{self.n_pairs + b - 1}. "
            "Rescale the latents."
        )

    def _update_dense(self, p: torch.Tensor, q: torch.Tensor, total: torch.Tensor, active: torch.Tensor) -> None:
        """Fold in a chunk where many (pair, latent) entries are active, with dense products."""
        scores = (p - q).div_(torch.where(active, total, torch.ones_like(total))).masked_fill_(~active, 0.0)
        self._s_sum += scores.sum(dim=0, dtype=torch.float64)
        self._n_active += active.sum(dim=0)
        self._n_fire += (p > self.eps).sum(dim=0) + (q > self.eps).sum(dim=0)
        if self.n_boot:
            # Per-chunk products run in float32, which is accurate enough because the
            # weights are small integers and |s| <= 1. Accumulation is in float64.
            weights = self._weights(self.n_pairs, self.n_pairs + p.shape[0])
            self._boot_num += (scores.T @ weights).double()
            self._boot_den += (active.T.to(torch.float32) @ weights).double()

    def _update_sparse(self, p: torch.Tensor, q: torch.Tensor, total: torch.Tensor, active: torch.Tensor) -> None:
        """Fold in a chunk with few active entries, touching only those entries."""
        pair_idx, latent_idx = active.nonzero(as_tuple=True)
        # Order by latent, then by pair (nonzero() lists pairs in order, and the sort
        # is stable): this is the coalesced order of the COO matrix below.
        order = torch.argsort(latent_idx, stable=True)
        pair_idx, latent_idx = pair_idx[order], latent_idx[order]
        p_values, q_values = p[pair_idx, latent_idx], q[pair_idx, latent_idx]
        scores = (p_values - q_values) / total[pair_idx, latent_idx]
        self._s_sum.index_add_(0, latent_idx, scores.double())
        self._n_active += torch.bincount(latent_idx, minlength=self.d_sae)
        # Activations are >= 0 here, so a firing sample always lies in an active pair.
        fired = (p_values > self.eps).to(torch.int64) + (q_values > self.eps).to(torch.int64)
        self._n_fire.index_add_(0, latent_idx, fired)
        if self.n_boot:
            # Rows [0, d_sae) contain the scores and rows [d_sae, 2 d_sae) the activity
            # indicators, so one sparse product gives both weighted sums.
            weights = self._weights(self.n_pairs, self.n_pairs + p.shape[0])
            indices = torch.stack([torch.cat([latent_idx, latent_idx + self.d_sae]), torch.cat([pair_idx, pair_idx])])
            stacked = torch.sparse_coo_tensor(
                indices,
                torch.cat([scores, torch.ones_like(scores)]),
                (2 * self.d_sae, p.shape[0]),
                is_coalesced=True,
                check_invariants=False,
            )
            product = torch.sparse.mm(stacked, weights)
            self._boot_num += product[: self.d_sae].double()
            self._boot_den += product[self.d_sae :].double()

    def table(self) -> pd.DataFrame:
        """Return the per-latent scores.

        Returns
        -------
        DataFrame, d_sae rows
            Columns ``latent`` (int), ``mds`` (NaN when no pair is active), ``ci_low``,
            ``ci_high`` (NaN without bootstrap or active pairs), ``n_active`` (pairs with
            ``p + q > eps``), ``frequency`` (share of the ``2 * n_pairs`` samples where
            the latent is ``> eps``). ``attrs`` contains the settings.
        """
        n_active = self._n_active.cpu().numpy()
        s_sum = self._s_sum.cpu().numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            mds = np.where(n_active > 0, s_sum / np.maximum(n_active, 1), np.nan)
            frequency = self._n_fire.cpu().numpy() / (2.0 * self.n_pairs) if self.n_pairs else np.full(self.d_sae, np.nan)
        ci_low = np.full(self.d_sae, np.nan)
        ci_high = np.full(self.d_sae, np.nan)
        if self.n_boot and self.n_pairs:
            den = self._boot_den.cpu().numpy()
            with np.errstate(invalid="ignore", divide="ignore"):
                replicates = np.where(den > 0, self._boot_num.cpu().numpy() / den, np.nan)
            alpha = (1.0 - self.ci) / 2.0
            ci_low, ci_high = _row_quantiles(replicates, (alpha, 1.0 - alpha))
            # A replicate mean cannot leave [-1, 1], so clipping only removes float32 rounding.
            ci_low, ci_high = np.clip(ci_low, -1.0, 1.0), np.clip(ci_high, -1.0, 1.0)
        table = pd.DataFrame(
            {
                "latent": np.arange(self.d_sae, dtype=np.int64),
                "mds": mds.astype(np.float64),
                "ci_low": ci_low,
                "ci_high": ci_high,
                "n_active": n_active.astype(np.int64),
                "frequency": np.asarray(frequency, dtype=np.float64),
            }
        )
        table.attrs.update(self.settings())
        return table

    def settings(self) -> dict[str, Any]:
        """Return the settings recorded with the scores."""
        return {
            "eps": self.eps,
            "min_active": self.min_active,
            "n_boot": self.n_boot,
            "ci": self.ci,
            "seed": self.seed,
            "absolute": self.absolute,
            "n_pairs": self.n_pairs,
            "bootstrap": "poisson" if self.n_boot else None,
        }


def _row_quantiles(replicates: np.ndarray, levels: Sequence[float]) -> list[np.ndarray]:
    """Linear-interpolation quantiles of each row, ignoring NaN, vectorised over rows.

    ``np.nanquantile`` loops over rows in Python when NaN are present. Sorting once
    (NaN go last) and interpolating by each row's count of valid values avoids the loop.
    """
    ordered = np.sort(replicates, axis=1)
    valid = (~np.isnan(ordered)).sum(axis=1)
    rows = np.arange(ordered.shape[0])
    out = []
    for level in levels:
        position = level * np.maximum(valid - 1, 0)
        lo = np.floor(position).astype(np.int64)
        hi = np.minimum(lo + 1, np.maximum(valid - 1, 0))
        frac = position - lo
        value = ordered[rows, lo] + frac * (ordered[rows, hi] - ordered[rows, lo])
        out.append(np.where(valid > 0, value, np.nan))
    return out


def _as_pair_source(name: str, x: Any) -> torch.Tensor | np.ndarray:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return x
    raise ValueError(f"{name} must be a torch.Tensor or numpy array of shape (n_pairs, d); got {type(x).__name__}.")


def modality_dominance(
    image_latents: torch.Tensor | np.ndarray,
    text_latents: torch.Tensor | np.ndarray,
    eps: float = 1e-8,
    min_active: int = 20,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    absolute: bool = False,
    chunk_size: int = 4096,
    device: str | torch.device | None = None,
) -> pd.DataFrame:
    """Modality Dominance Score of every latent, with bootstrap intervals over pairs.

    ``s_ij = (p - q) / (p + q)`` over the pairs with ``p + q > eps`` and
    ``MDS_j = mean_i s_ij``, where ``p = a_j(u_i)`` and ``q = a_j(v_i)``. Rows are read
    ``chunk_size`` pairs at a time (numpy memmaps work), so the inputs may be larger
    than the memory of ``device``.

    Parameters
    ----------
    image_latents, text_latents : Tensor or ndarray, shape (n_pairs, d_sae)
        Activations on the image and on the caption of each pair, aligned by pair.
    eps : float
        Activity threshold (see :class:`ModalityDominanceAccumulator`).
    min_active : int
        Recorded in ``attrs``: :func:`assign_groups` marks latents with fewer active
        pairs as rare. Their MDS is still reported (NaN with 0 active pairs).
    n_boot : int
        Bootstrap replicates (Poisson weights over pairs); 0 skips the intervals.
    ci : float
        Coverage of the intervals.
    seed : int
        Seed of the bootstrap.
    absolute : bool
        Use ``|p|`` and ``|q|``, for signed inputs such as raw backbone coordinates.
    chunk_size : int
        Pairs per chunk.
    device : str or torch.device, optional
        Where to compute; defaults to the device of ``image_latents`` (CPU for numpy).

    Returns
    -------
    DataFrame, d_sae rows
        Columns ``latent, mds, ci_low, ci_high, n_active, frequency``. ``attrs``
        contains ``eps, min_active, n_boot, ci, seed, absolute, n_pairs``.

    Examples
    --------
    >>> p = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    >>> q = torch.tensor([[1.0, 2.0], [1.0, 0.0]])
    >>> modality_dominance(p, q, n_boot=0)["mds"].tolist()   # latent 0: (0 + 0.5) / 2
    [0.25, -1.0]
    """
    image_latents = _as_pair_source("image_latents", image_latents)
    text_latents = _as_pair_source("text_latents", text_latents)
    if image_latents.ndim != 2 or tuple(image_latents.shape) != tuple(text_latents.shape):
        raise ValueError(
            "image_latents and text_latents must both have shape (n_pairs, d_sae), aligned by pair; "
            f"got {tuple(image_latents.shape)} and {tuple(text_latents.shape)}."
        )
    chunk_size = _check_int("chunk_size", chunk_size, 1)
    if device is None:
        device = image_latents.device if isinstance(image_latents, torch.Tensor) else "cpu"
    accumulator = ModalityDominanceAccumulator(
        image_latents.shape[1], eps=eps, min_active=min_active, n_boot=n_boot, ci=ci, seed=seed, absolute=absolute, device=device
    )
    n_pairs = image_latents.shape[0]
    for start in range(0, n_pairs, chunk_size):
        stop = min(start + chunk_size, n_pairs)
        accumulator.update(_rows(image_latents, start, stop), _rows(text_latents, start, stop))
    return accumulator.table()


def _rows(x: torch.Tensor | np.ndarray, start: int, stop: int) -> torch.Tensor:
    block = x[start:stop]
    if isinstance(block, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(block))
    return block


# --------------------------------------------------------------------------------------
# Groups




@dataclass
class Scores:
    """Per-latent Modality Dominance Scores, their groups and the rule that made them.

    Attributes
    ----------
    table : DataFrame, d_sae rows
        Columns ``latent, mds, ci_low, ci_high, n_active, group, frequency, name``.
        ``group`` is one of ``ImgD, TextD, CrossD, rare``; ``name`` is the empty string
        until feature naming fills it.
    rule : dict
        The grouping rule and the scoring settings: ``rule, k, quantiles, thresholds,
        mu, sigma, sigma_ddof, min_active, n_scored, counts`` and ``eps, n_boot, ci,
        seed, absolute, n_pairs``. Stored JSON-ready (tuples as lists, NaN as None).
    """

    table: pd.DataFrame
    rule: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.table, pd.DataFrame):
            raise ValueError(f"Scores.table must be a pandas DataFrame; got {type(self.table).__name__}.")
        table = self.table.copy()
        if "name" not in table.columns:
            table["name"] = ""
        missing = [c for c in TABLE_COLUMNS if c not in table.columns]
        if missing:
            raise ValueError(f"Scores.table is missing columns {missing}; expected {list(TABLE_COLUMNS)} (build it with assign_groups).")
        bad_groups = sorted(set(table["group"].astype(str)) - set(GROUPS) - {RARE})
        if bad_groups:
            raise ValueError(f"Scores.table has unknown groups {bad_groups}; valid groups are {list(GROUPS) + [RARE]}.")
        for column in _INT_COLUMNS:
            table[column] = table[column].astype(np.int64)
        for column in _FLOAT_COLUMNS:
            table[column] = table[column].astype(np.float64)
        table["group"] = table["group"].astype(str)
        table["name"] = table["name"].fillna("").astype(str)
        extra = [c for c in table.columns if c not in TABLE_COLUMNS]
        table = table[list(TABLE_COLUMNS) + extra].reset_index(drop=True)
        table.attrs = {}
        self.table = table
        self.rule = json_safe(dict(self.rule))

    # ---- selection -------------------------------------------------------------------

    def check_dictionary(self, dictionary: Any) -> None:
        """Raise ValueError unless these scores were computed for ``dictionary``.

        The number of latents must match, and so must the dictionary fingerprint when the
        scores recorded one (scores written by :func:`score_dictionary` do).
        """
        d_sae = getattr(dictionary, "d_sae", None)
        if d_sae is not None and len(self.table) != d_sae:
            raise ValueError(
                f"the scores have {len(self.table)} latents but the dictionary has d_sae={d_sae}; "
                "score this dictionary with `mmono score STORE DICTIONARY`."
            )
        recorded = (self.rule.get("dictionary") or {}).get("fingerprint")
        if recorded and hasattr(dictionary, "fingerprint") and dictionary.fingerprint() != recorded:
            raise ValueError(
                f"the scores were computed for another dictionary (fingerprint {recorded}, this one has "
                f"{dictionary.fingerprint()}); score this dictionary with `mmono score STORE DICTIONARY`."
            )

    def latents(self, group: str) -> torch.Tensor:
        """Return the ids of the latents in ``group`` as a sorted LongTensor of shape (n,)."""
        if group not in GROUPS and group != RARE:
            raise ValueError(f"group must be one of {list(GROUPS) + [RARE]}; got {group!r}.")
        ids = np.sort(self.table.loc[self.table["group"] == group, "latent"].to_numpy(dtype=np.int64))
        return torch.from_numpy(ids)

    def group_sizes(self, n_boot: int = 0, ci: float = 0.95, seed: int = 0) -> pd.DataFrame:
        """Count the latents of each group.

        Parameters
        ----------
        n_boot : int
            With ``n_boot > 0``, add a percentile bootstrap interval of each group's
            fraction, resampling latents.
        ci, seed
            Coverage and seed of that bootstrap.

        Returns
        -------
        DataFrame, one row per group (``ImgD, TextD, CrossD, rare``)
            Columns ``count``, ``fraction`` (of all latents) and ``confident``: the
            latents whose whole MDS interval lies in the group's range. That range is
            above the high threshold for ImgD, below the low one for TextD and between
            them for CrossD. ``confident`` is NaN for rare and when the rule has no
            thresholds. With the bootstrap, also ``fraction_low`` and ``fraction_high``.
        """
        n_boot = _check_int("n_boot", n_boot, 0)
        names = list(GROUPS) + [RARE]
        groups = self.table["group"].to_numpy()
        counts = np.array([(groups == g).sum() for g in names], dtype=np.int64)
        total = max(len(groups), 1)
        result = pd.DataFrame({"group": names, "count": counts, "fraction": counts / total})
        result["confident"] = self._confident_counts(names)
        if n_boot:
            onehot = np.stack([(groups == g).astype(np.float64) for g in names], axis=1)
            low, high = bootstrap_ci_columns(onehot, n_boot=n_boot, ci=_check_ci(ci), seed=seed)
            result["fraction_low"], result["fraction_high"] = low, high
        return result

    def _confident_counts(self, names: Sequence[str]) -> list[float]:
        thresholds = self.rule.get("thresholds")
        if not thresholds or thresholds[0] is None or thresholds[1] is None:
            return [math.nan] * len(names)
        low_t, high_t = thresholds
        table = self.table
        low, high = table["ci_low"].to_numpy(), table["ci_high"].to_numpy()
        known = ~np.isnan(low) & ~np.isnan(high)
        in_group = {g: (table["group"] == g).to_numpy() & known for g in GROUPS}
        confident = {
            "ImgD": in_group["ImgD"] & (low > high_t),
            "TextD": in_group["TextD"] & (high < low_t),
            "CrossD": in_group["CrossD"] & (low >= low_t) & (high <= high_t),
        }
        return [float(confident[g].sum()) if g in confident else math.nan for g in names]

    # ---- files -----------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the table to ``path`` (``.csv`` or ``.parquet``) and the rule to ``<stem>.json``.

        Both files are written under temporary names and renamed. Parquet needs pyarrow
        (``pip install 'mmono[parquet]'``).

        Returns
        -------
        Path
            The table's path.
        """
        path = Path(path)
        suffix = _check_suffix(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".parquet":
            _require_pyarrow()
            atomic_write(path, lambda tmp: self.table.to_parquet(tmp, index=False, engine="pyarrow"))
        else:
            atomic_write(path, lambda tmp: self.table.to_csv(tmp, index=False))
        sidecar = {
            "format": SIDECAR_FORMAT,
            "version": SIDECAR_VERSION,
            "table": path.name,
            "rule": self.rule,
        }
        text = json.dumps(sidecar, indent=2, sort_keys=True, allow_nan=False) + "\n"
        atomic_write(_sidecar_path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        logger.info("wrote scores of %d latents to %s", len(self.table), path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Scores":
        """Read scores written by :meth:`save` (the table and its sidecar ``<stem>.json``)."""
        path = Path(path)
        suffix = _check_suffix(path)
        sidecar_path = _sidecar_path(path)
        for required in (path, sidecar_path):
            if not required.is_file():
                raise FileNotFoundError(
                    f"{required} not found: scores are a table ({path.name}) plus its sidecar {sidecar_path.name}, "
                    "both written by Scores.save or `mmono score`."
                )
        sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
        if sidecar.get("format") != SIDECAR_FORMAT:
            raise ValueError(f"{sidecar_path} is not an mmono scores sidecar (format {sidecar.get('format')!r}, expected {SIDECAR_FORMAT!r}).")
        if suffix == ".parquet":
            _require_pyarrow()
            table = pd.read_parquet(path, engine="pyarrow")
        else:
            # Only empty fields outside the text columns are missing values, so a
            # feature named "NA" or "null" stays a string.
            header = pd.read_csv(path, nrows=0).columns
            table = pd.read_csv(
                path,
                keep_default_na=False,
                na_values={c: [""] for c in header if c not in ("group", "name")},
                dtype={"group": str, "name": str},
            )
        return cls(table=table, rule=sidecar.get("rule", {}))


def _check_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise ValueError(f"scores path must end in .csv or .parquet; got {str(path)!r}.")
    return suffix


def _sidecar_path(path: Path) -> Path:
    return path.with_suffix(".json")


def _require_pyarrow() -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "writing or reading .parquet scores needs pyarrow: install it with `pip install 'mmono[parquet]'`, "
            "or use a .csv path."
        ) from error




def assign_groups(
    table: pd.DataFrame,
    rule: str = "std",
    k: float = 1.0,
    quantiles: tuple[float, float] = (0.1, 0.9),
    thresholds: tuple[float, float] | None = None,
    min_active: int | None = None,
) -> Scores:
    """Split latents into ImgD, TextD, CrossD and rare.

    A latent is scored when ``n_active >= min_active`` and its MDS is not NaN. The
    others are ``"rare"``. Over the scored latents, with ``mu`` the mean and ``sigma``
    the population standard deviation (ddof = 0) of MDS, and thresholds
    ``(low, high)`` set by the rule:

    - ``"std"``: ``low = mu - k * sigma``, ``high = mu + k * sigma``;
    - ``"quantile"``: the ``quantiles`` of the scored MDS (linear interpolation);
    - ``"fixed"``: ``thresholds`` as given.

    ImgD if ``mds > high``, TextD if ``mds < low``, else CrossD.

    Parameters
    ----------
    table : DataFrame
        Output of :func:`modality_dominance` (or a :attr:`Scores.table` to regroup;
        an existing ``name`` column is kept).
    rule : {"std", "quantile", "fixed"}
    k : float
        Width in standard deviations for ``"std"``.
    quantiles : (float, float)
        Low and high quantile levels for ``"quantile"``.
    thresholds : (float, float), optional
        ``(low, high)`` for ``"fixed"``; only valid with that rule.
    min_active : int, optional
        Minimum active pairs to be scored; defaults to ``table.attrs["min_active"]``
        (set by :func:`modality_dominance`), else 20.

    Returns
    -------
    Scores
        With ``rule`` recording the rule, k, quantiles, thresholds used, mu, sigma,
        sigma_ddof, min_active, n_scored, counts per group and the scoring settings.
    """
    if not isinstance(table, pd.DataFrame):
        raise ValueError(f"table must be a pandas DataFrame from modality_dominance; got {type(table).__name__}.")
    missing = [c for c in SCORE_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"table is missing columns {missing}; build it with modality_dominance (columns {list(SCORE_COLUMNS)}).")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {list(RULES)}; got {rule!r}.")
    if thresholds is not None and rule != "fixed":
        raise ValueError(f"thresholds are only used with rule='fixed'; got rule={rule!r} and thresholds={thresholds!r}.")
    if min_active is None:
        min_active = table.attrs.get("min_active", 20)
    min_active = _check_int("min_active", min_active, 0)

    mds = table["mds"].to_numpy(dtype=np.float64)
    n_active = table["n_active"].to_numpy(dtype=np.int64)
    scored = (n_active >= min_active) & ~np.isnan(mds)
    values = mds[scored]
    mu = float(values.mean()) if values.size else math.nan
    sigma = float(values.std(ddof=0)) if values.size else math.nan

    recorded_k: float | None = None
    recorded_quantiles: list[float] | None = None
    if rule == "std":
        recorded_k = _check_float("k", k, 0.0)
        low, high = mu - recorded_k * sigma, mu + recorded_k * sigma
    elif rule == "quantile":
        q_low, q_high = _check_pair("quantiles", quantiles, 0.0, 1.0)
        recorded_quantiles = [q_low, q_high]
        low, high = (float(x) for x in np.quantile(values, [q_low, q_high])) if values.size else (math.nan, math.nan)
    else:
        if thresholds is None:
            raise ValueError("thresholds are missing: rule='fixed' needs thresholds=(low, high), e.g. (-0.5, 0.5).")
        low, high = _check_pair("thresholds", thresholds, -math.inf, math.inf)

    groups = np.full(len(table), "CrossD", dtype=object)
    groups[scored & (mds > high)] = "ImgD"
    groups[scored & (mds < low)] = "TextD"
    groups[~scored] = RARE
    if not values.size:
        logger.warning("no latent has at least %d active pairs: every latent is %r", min_active, RARE)

    out = table.copy()
    out["group"] = groups
    if "name" not in out.columns:
        out["name"] = ""
    counts = {g: int((groups == g).sum()) for g in list(GROUPS) + [RARE]}
    record = {
        "rule": rule,
        "k": recorded_k,
        "quantiles": recorded_quantiles,
        "thresholds": [low, high],
        "mu": mu,
        "sigma": sigma,
        "sigma_ddof": 0,
        "min_active": min_active,
        "n_scored": int(scored.sum()),
        "counts": counts,
    }
    for key, value in table.attrs.items():
        if key != "min_active":
            record.setdefault(key, value)
    logger.info("groups by rule %r (thresholds %.4g, %.4g): %s", rule, low, high, counts)
    # MDS lies in [-1, 1]; a threshold beyond that range leaves its group empty by construction.
    if low < -1 or high > 1:
        logger.warning(
            "the %r rule put a threshold outside [-1, 1] (%.3g, %.3g), so %s cannot have members; "
            "use a smaller k, --rule quantile or --rule fixed.",
            rule,
            low,
            high,
            " and ".join(group for group, bad in (("TextD", low < -1), ("ImgD", high > 1)) if bad),
        )
    return Scores(table=out, rule=record)


def _check_pair(name: str, value: Any, low: float, high: float) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a pair (low, high); got {value!r}.")
    a, b = (_check_float(name, v, low, high) for v in value)
    if a > b:
        raise ValueError(f"{name} must be ordered (low, high) with low <= high; got {value!r}.")
    return a, b


# --------------------------------------------------------------------------------------
# Dictionaries


def _resolve_pairs(image_z: Any, text_z: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Return raw (image, text) embeddings from two tensors or one feature store."""
    if hasattr(image_z, "embeddings") and callable(image_z.embeddings):
        if text_z is not None:
            raise ValueError("pass either a feature store alone or two tensors (image_z, text_z), not a store and a tensor.")
        store = image_z
        image_z, text_z = store.embeddings("image", normalize=False), store.embeddings("text", normalize=False)
    if text_z is None:
        raise ValueError("text_z is missing: pass the caption embeddings aligned with image_z, or a feature store as image_z.")
    pairs = []
    for name, z in (("image_z", image_z), ("text_z", text_z)):
        if isinstance(z, np.ndarray):
            z = torch.from_numpy(z)
        if not isinstance(z, torch.Tensor) or z.ndim != 2:
            raise ValueError(f"{name} must be a tensor of shape (n_pairs, d_in); got {getattr(z, 'shape', type(z).__name__)}.")
        pairs.append(z)
    if pairs[0].shape != pairs[1].shape:
        raise ValueError(f"image_z and text_z must have the same shape (n_pairs, d_in); got {tuple(pairs[0].shape)} and {tuple(pairs[1].shape)}.")
    return pairs[0], pairs[1]


def _dictionary_device(dictionary: torch.nn.Module) -> torch.device:
    for tensor in itertools.chain(dictionary.parameters(), dictionary.buffers()):
        return tensor.device
    return torch.device("cpu")


def _encoded_batches(dictionary, image_z: torch.Tensor, text_z: torch.Tensor, batch_size: int):
    """Yield (image_latents, text_latents) per batch of pairs, in eval mode, without autograd."""
    batch_size = _check_int("batch_size", batch_size, 1)
    if image_z.shape[1] != dictionary.d_in:
        raise ValueError(f"embeddings have width {image_z.shape[1]} but the dictionary expects d_in={dictionary.d_in}.")
    device = _dictionary_device(dictionary)
    n_pairs = image_z.shape[0]
    was_training = dictionary.training
    dictionary.eval()
    try:
        with torch.inference_mode():
            starts = range(0, n_pairs, batch_size)
            for start in progress(starts, total=len(starts), desc="encode pairs"):
                stop = min(start + batch_size, n_pairs)
                latents = []
                for modality, z in (("image", image_z), ("text", text_z)):
                    z_batch = z[start:stop].to(device)
                    prepared = dictionary.prepare(z_batch, modality)
                    # A contrastive head trained on pairs may have one head per modality.
                    if getattr(dictionary, "paired_training", False):
                        latents.append(dictionary.encode(prepared, modality=modality))
                    else:
                        latents.append(dictionary.encode(prepared))
                yield latents[0], latents[1]
    finally:
        dictionary.train(was_training)


def encode_pairs(dictionary, image_z: Any, text_z: Any = None, batch_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode paired raw embeddings into latents, batch by batch.

    Each batch is normalised with ``dictionary.prepare(z, modality)`` and encoded under
    ``torch.inference_mode`` in eval mode. All latents stay in memory, so for
    scoring large sets use :func:`score_dictionary`, which streams.

    Parameters
    ----------
    dictionary : Dictionary
    image_z, text_z : Tensor, shape (n_pairs, d_in)
        Raw (not normalised) embeddings aligned by pair; or a feature store (anything
        with ``.embeddings(modality, normalize=False)``) as ``image_z`` and no ``text_z``.
    batch_size : int

    Returns
    -------
    image_latents, text_latents : Tensor, shape (n_pairs, d_sae), float32 on CPU
    """
    image_z, text_z = _resolve_pairs(image_z, text_z)
    image_parts, text_parts = [], []
    for image_latents, text_latents in _encoded_batches(dictionary, image_z, text_z, batch_size):
        image_parts.append(image_latents.float().cpu())
        text_parts.append(text_latents.float().cpu())
    if not image_parts:
        empty = torch.zeros(0, dictionary.d_sae)
        return empty, empty.clone()
    return torch.cat(image_parts), torch.cat(text_parts)


def score_dictionary(dictionary, image_z: Any, text_z: Any = None, batch_size: int = 4096, **options: Any) -> Scores:
    """Encode paired embeddings, score every latent's MDS and assign groups.

    Latents are streamed into a :class:`ModalityDominanceAccumulator` batch by batch,
    so the ``(n_pairs, d_sae)`` latents never exist at once. The sums live on the
    dictionary's device.

    Parameters
    ----------
    dictionary : Dictionary
    image_z, text_z : Tensor, shape (n_pairs, d_in)
        Raw embeddings aligned by pair, or a feature store as ``image_z`` (see
        :func:`encode_pairs`).
    batch_size : int
        Pairs encoded at once.
    **options
        ``eps, min_active, n_boot, ci, seed`` as in :func:`modality_dominance` and
        ``rule, k, quantiles, thresholds`` as in :func:`assign_groups`.

    Returns
    -------
    Scores
        Its ``rule`` also records the dictionary (kind, d_in, d_sae, backbone).
    """
    allowed = set(_MODALITY_OPTIONS) - {"chunk_size"} | set(_GROUP_OPTIONS)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"unknown scoring options {unknown}; valid options are {sorted(allowed)}.")
    image_z, text_z = _resolve_pairs(image_z, text_z)
    modality_options = {key: options[key] for key in _MODALITY_OPTIONS if key in options}
    group_options = {key: options[key] for key in _GROUP_OPTIONS if key in options}
    accumulator = ModalityDominanceAccumulator(dictionary.d_sae, device=_dictionary_device(dictionary), **modality_options)
    for image_latents, text_latents in _encoded_batches(dictionary, image_z, text_z, batch_size):
        accumulator.update(image_latents, text_latents)
    scores = assign_groups(accumulator.table(), **group_options)
    config = getattr(dictionary, "config", None)
    if config is not None and dataclasses.is_dataclass(config):
        scores.rule["dictionary"] = json_safe(
            {
                "kind": config.kind,
                "d_in": config.d_in,
                "d_sae": config.d_sae,
                "backbone": getattr(config, "backbone", {}),
                "fingerprint": dictionary.fingerprint() if hasattr(dictionary, "fingerprint") else None,
            }
        )
    return scores
