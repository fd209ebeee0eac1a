"""Edit embeddings through a dictionary's latents, keeping what the dictionary misses.

Every application changes an embedding by feature through this module. The bias audit
ablates modality groups, and the adversarial defense suppresses ImgD latents inside a
differentiable classifier. The Stable Diffusion app turns a latent edit into a
steering direction.

For normalised embeddings ``z`` of shape (batch, d_in)::

    a   = encode(z)                          (batch, d_sae), a >= 0
    a'  = edit(a)                            zero, scale or add to chosen latents
    z'  = z + (decode(a') - decode(a))       (batch, d_in)

which equals ``decode(a') + err`` with the reconstruction error
``err = z - decode(a)``. Written as a difference of two decodes, the output is ``z``
bit for bit whenever ``a' == a`` (an empty edit, or zeroing latents that are already
silent). Both decodes then return the same floats on a deterministic device, so their
difference is exactly zero. The form ``decode(a') + (z - decode(a))`` would round twice
and could differ in the last bit. An empty edit returns ``z`` itself without decoding. With ``keep_error=False`` the output is ``decode(a')``, the edited
reconstruction alone. Everything is differentiable with respect to ``z`` (gradient
attacks run through :func:`intervene`); nothing here switches off autograd.

An edit acts on each latent j independently::

    a'_j = 0                               if j in edit.zero
    a'_j = a_j * scale[j] + add[j]         otherwise (scale 1 and add 0 by default)

Example (``dictionary`` and ``scores`` come from training and scoring)::

    from mmono_features.intervene import LatentEdit, intervene, latent_delta

    z = dictionary.prepare(raw_image_embeddings, "image")    # (batch, d_in)
    edit = LatentEdit.from_group(scores, "ImgD")              # zero every ImgD latent
    z_edit = intervene(dictionary, z, edit)                   # (batch, d_in)

    # Halve latents 12 and 40, then triple latent 7.
    edit = LatentEdit.suppress([12, 40], strength=0.5).then(LatentEdit.amplify([7], 3.0))

    # 5 times latent 7's decoder row, shape (d_in,): a steering direction.
    delta = latent_delta(dictionary, LatentEdit(add={7: 5.0}), torch.zeros(dictionary.d_sae))
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = ["LatentEdit", "edit_latents", "intervene", "intervene_raw", "latent_delta"]


def _latent_id(value: Any, argument: str) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"invalid {argument}: latent ids must be non-negative integers; got {value!r}.")
    return int(value)


def _latent_ids(latents: Any, argument: str = "latents") -> tuple[int, ...]:
    """Turn an int, an iterable of ints, a LongTensor or an integer array into sorted unique ids."""
    if isinstance(latents, torch.Tensor):
        if latents.is_floating_point():
            raise ValueError(f"{argument} must be integer latent ids; got a {latents.dtype} tensor.")
        latents = latents.flatten().tolist()
    elif isinstance(latents, np.ndarray):
        if not np.issubdtype(latents.dtype, np.integer):
            raise ValueError(f"{argument} must be integer latent ids; got an array of {latents.dtype}.")
        latents = latents.ravel().tolist()
    elif isinstance(latents, (int, np.integer)) and not isinstance(latents, bool):
        latents = [latents]
    elif isinstance(latents, (str, bytes)) or not isinstance(latents, Iterable):
        raise ValueError(f"{argument} must be an int or an iterable of ints; got {latents!r}.")
    return tuple(sorted({_latent_id(v, argument) for v in latents}))


def _factor(value: Any, argument: str, latent: int) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not math.isfinite(float(value)):
        raise ValueError(f"{argument}[{latent}] must be a finite number; got {value!r}.")
    return float(value)


def _latent_map(mapping: Any, argument: str) -> Mapping[int, float]:
    if not isinstance(mapping, Mapping):
        raise ValueError(f"{argument} must be a mapping latent id -> number; got {type(mapping).__name__}.")
    checked = {}
    for key, value in mapping.items():
        latent = _latent_id(key, argument)
        checked[latent] = _factor(value, argument, latent)
    return MappingProxyType(dict(sorted(checked.items())))


@dataclass(frozen=True)
class LatentEdit:
    """A per-latent edit: zero some latents, scale others, add to others.

    ``a'_j = 0`` for ``j in zero``, otherwise ``a'_j = a_j * scale.get(j, 1) +
    add.get(j, 0)``. Zeroing wins over scale and add for the same latent. Added values
    are not clipped, so a negative ``add`` can make an activation negative.

    Attributes
    ----------
    zero : tuple of int
        Latents set to 0 (stored sorted and unique).
    scale : mapping int -> float
        Multiplicative factor per latent.
    add : mapping int -> float
        Value added to the (scaled) activation per latent.

    Examples
    --------
    >>> LatentEdit(zero=(3,), scale={5: 0.5}).touched
    (3, 5)
    >>> LatentEdit.suppress([1, 2], strength=0.0).is_empty
    True
    """

    zero: tuple[int, ...] = ()
    scale: Mapping[int, float] = field(default_factory=dict)
    add: Mapping[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "zero", _latent_ids(self.zero, "zero"))
        object.__setattr__(self, "scale", _latent_map(self.scale, "scale"))
        object.__setattr__(self, "add", _latent_map(self.add, "add"))

    def __hash__(self) -> int:
        return hash((self.zero, tuple(self.scale.items()), tuple(self.add.items())))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LatentEdit):
            return NotImplemented
        return self.zero == other.zero and dict(self.scale) == dict(other.scale) and dict(self.add) == dict(other.add)

    # ---- constructors ----------------------------------------------------------------

    @classmethod
    def suppress(cls, latents: Any, strength: float = 1.0) -> "LatentEdit":
        """Scale ``latents`` by ``1 - strength``, so strength 1 zeroes them and 0 is the identity.

        Parameters
        ----------
        latents : int, iterable of int, LongTensor or integer array
        strength : float in [0, 1]
        """
        if isinstance(strength, bool) or not isinstance(strength, (int, float, np.integer, np.floating)) or not 0.0 <= float(strength) <= 1.0:
            raise ValueError(f"strength must be a number in [0, 1] (0 leaves latents unchanged, 1 zeroes them); got {strength!r}.")
        ids = _latent_ids(latents)
        strength = float(strength)
        if strength == 0.0:
            return cls()
        if strength == 1.0:
            return cls(zero=ids)
        return cls(scale={j: 1.0 - strength for j in ids})

    @classmethod
    def amplify(cls, latents: Any, factor: float) -> "LatentEdit":
        """Multiply ``latents`` by ``factor`` (finite, >= 0). Factor 1 is the identity."""
        if isinstance(factor, bool) or not isinstance(factor, (int, float, np.integer, np.floating)) or not (
            math.isfinite(float(factor)) and float(factor) >= 0.0
        ):
            raise ValueError(f"factor must be a finite number >= 0; got {factor!r}. Use add= for signed shifts.")
        ids = _latent_ids(latents)
        if float(factor) == 1.0:
            return cls()
        return cls(scale={j: float(factor) for j in ids})

    @classmethod
    def from_group(cls, scores: Any, group: str, strength: float = 1.0) -> "LatentEdit":
        """Suppress every latent of a modality group of ``scores`` (a :class:`~mmono_features.modality.Scores`).

        An empty group gives an empty edit and a logged warning.
        """
        latents = scores.latents(group)
        if len(latents) == 0:
            logger.warning("group %r has no latents, so the edit changes nothing.", group)
        return cls.suppress(latents, strength=strength)

    # ---- properties and composition --------------------------------------------------

    @property
    def is_empty(self) -> bool:
        """Whether the edit changes no latent (no zero, all scales 1, all adds 0)."""
        return not self.zero and all(v == 1.0 for v in self.scale.values()) and all(v == 0.0 for v in self.add.values())

    @property
    def touched(self) -> tuple[int, ...]:
        """Sorted ids of every latent the edit mentions."""
        return tuple(sorted(set(self.zero) | set(self.scale) | set(self.add)))

    @property
    def max_latent(self) -> int:
        """Largest latent id mentioned, or -1 for an edit that mentions none."""
        touched = self.touched
        return touched[-1] if touched else -1

    def affine(self, latent: int) -> tuple[float, float]:
        """Return ``(factor, offset)`` with ``a'_j = factor * a_j + offset`` for latent ``latent``."""
        if latent in self.zero:
            return 0.0, 0.0
        return self.scale.get(latent, 1.0), self.add.get(latent, 0.0)

    def then(self, other: "LatentEdit") -> "LatentEdit":
        """Return the edit that applies ``self`` first and ``other`` second.

        Each latent's map is affine, so the composition is exact:
        ``factor = f1 * f2`` and ``offset = c1 * f2 + c2``.
        """
        if not isinstance(other, LatentEdit):
            raise ValueError(f"invalid edit to combine: expected a LatentEdit, got {type(other).__name__}.")
        zero, scale, add = [], {}, {}
        for j in sorted(set(self.touched) | set(other.touched)):
            f1, c1 = self.affine(j)
            f2, c2 = other.affine(j)
            factor, offset = f1 * f2, c1 * f2 + c2
            if factor == 0.0 and offset == 0.0:
                zero.append(j)
                continue
            if factor != 1.0:
                scale[j] = factor
            if offset != 0.0:
                add[j] = offset
        return LatentEdit(zero=tuple(zero), scale=scale, add=add)

    def __or__(self, other: "LatentEdit") -> "LatentEdit":
        """``a | b`` is ``a.then(b)``."""
        return self.then(other)

    def check(self, d_sae: int) -> None:
        """Raise ValueError if a latent id is not below ``d_sae``."""
        if self.max_latent >= d_sae:
            raise ValueError(
                f"invalid latent id {self.max_latent} in the edit: the dictionary has d_sae={d_sae} latents "
                f"(ids 0..{d_sae - 1}). Check that the scores belong to this dictionary."
            )


def edit_latents(latents: torch.Tensor, edit: LatentEdit) -> torch.Tensor:
    """Apply ``edit`` to a batch of latents.

    Parameters
    ----------
    latents : Tensor, shape (batch, d_sae)
    edit : LatentEdit

    Returns
    -------
    Tensor, shape (batch, d_sae)
        A new tensor, or ``latents`` itself for an empty edit. It is differentiable
        with respect to ``latents``, and untouched columns pass gradients unchanged.
    """
    if not isinstance(edit, LatentEdit):
        raise ValueError(f"edit must be a LatentEdit; got {type(edit).__name__}.")
    if latents.ndim != 2:
        raise ValueError(f"latents must have shape (batch, d_sae); got {tuple(latents.shape)}.")
    edit.check(latents.shape[1])
    if edit.is_empty:
        return latents
    ids = edit.touched
    factors, offsets = zip(*(edit.affine(j) for j in ids))
    index = torch.tensor(ids, dtype=torch.long, device=latents.device)
    factor = torch.tensor(factors, dtype=latents.dtype, device=latents.device)
    offset = torch.tensor(offsets, dtype=latents.dtype, device=latents.device)
    columns = latents.index_select(1, index) * factor + offset
    return latents.index_copy(1, index, columns)


def _check_embeddings(dictionary, z: torch.Tensor) -> None:
    if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[1] != dictionary.d_in:
        raise ValueError(f"z must be a tensor of shape (batch, {dictionary.d_in}); got {tuple(getattr(z, 'shape', ()))}.")


def intervene(dictionary, z: torch.Tensor, edit: LatentEdit, keep_error: bool = True) -> torch.Tensor:
    """Edit normalised embeddings through the dictionary's latents.

    ``z' = z + (decode(edit(encode(z))) - decode(encode(z)))``, which is the edited
    reconstruction plus the reconstruction error. The module notes explain why this
    form is exact for an empty edit.

    Parameters
    ----------
    dictionary : Dictionary
        Any kind with ``encode``/``decode``.
    z : Tensor, shape (batch, d_in)
        Embeddings already normalised for this dictionary (``dictionary.prepare``).
    edit : LatentEdit
    keep_error : bool
        Keep the reconstruction error (default). ``False`` returns ``decode(a')``.

    Returns
    -------
    Tensor, shape (batch, d_in)
        ``z`` itself for an empty edit with ``keep_error``. Otherwise a new tensor,
        differentiable with respect to ``z``.
    """
    if not isinstance(edit, LatentEdit):
        raise ValueError(f"edit must be a LatentEdit; got {type(edit).__name__}.")
    _check_embeddings(dictionary, z)
    edit.check(dictionary.d_sae)
    if edit.is_empty and keep_error:
        return z
    latents = dictionary.encode(z)
    edited = edit_latents(latents, edit)
    if not keep_error:
        return dictionary.decode(edited)
    return z + (dictionary.decode(edited) - dictionary.decode(latents))


def intervene_raw(dictionary, z_raw: torch.Tensor, modality: str, edit: LatentEdit, keep_error: bool = True) -> torch.Tensor:
    """Normalise raw backbone embeddings with ``dictionary.prepare``, then :func:`intervene`.

    Parameters
    ----------
    z_raw : Tensor, shape (batch, d_in)
        Raw embeddings of one modality.
    modality : {"image", "text"}

    Returns
    -------
    Tensor, shape (batch, d_in)
        Edited embeddings in the dictionary's normalised space (norm about sqrt(d_in)).
    """
    return intervene(dictionary, dictionary.prepare(z_raw, modality), edit, keep_error=keep_error)


def latent_delta(dictionary, edit: LatentEdit, latents: torch.Tensor) -> torch.Tensor:
    """Change of the decoded embedding caused by ``edit``: ``decode(a') - decode(a)``.

    With a linear decoder this is ``sum_j (a'_j - a_j) W_dec[j]`` and does not depend on
    the bias, so ``LatentEdit(add={j: alpha})`` on zero latents gives ``alpha`` times
    latent j's decoder row: the steering direction of the Stable Diffusion app.

    Parameters
    ----------
    dictionary : Dictionary
    edit : LatentEdit
    latents : Tensor, shape (batch, d_sae) or (d_sae,)
        Activations the edit starts from.

    Returns
    -------
    Tensor, shape (batch, d_in) or (d_in,)
        Matching the shape of ``latents``, and zeros for an empty edit.
    """
    if not isinstance(edit, LatentEdit):
        raise ValueError(f"edit must be a LatentEdit; got {type(edit).__name__}.")
    squeeze = latents.ndim == 1
    batch = latents.unsqueeze(0) if squeeze else latents
    if batch.ndim != 2 or batch.shape[1] != dictionary.d_sae:
        raise ValueError(f"latents must have shape (batch, {dictionary.d_sae}) or ({dictionary.d_sae},); got {tuple(latents.shape)}.")
    edit.check(dictionary.d_sae)
    delta = dictionary.decode(edit_latents(batch, edit)) - dictionary.decode(batch)
    return delta.squeeze(0) if squeeze else delta
