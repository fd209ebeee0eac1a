"""Normalisation of backbone embeddings before a dictionary encodes them.

Each embedding is L2-normalised, then multiplied by sqrt(d) so that a coordinate is
O(1) whatever the width of the backbone. There is no per-modality centring by default,
because centring each modality would erase the modality gap that the Modality
Dominance Score measures.
"""

from __future__ import annotations

import math

import torch

MODALITIES = ("image", "text")


def normalize_embeddings(z: torch.Tensor, center: torch.Tensor | None = None) -> torch.Tensor:
    """Scale embeddings to norm sqrt(d), optionally after removing a mean.

    Parameters
    ----------
    z : Tensor, shape (n, d)
        Raw embeddings of one modality.
    center : Tensor, shape (d,), optional
        Mean of the L2-normalised embeddings of that modality. When given, rows are
        L2-normalised, the mean is subtracted, and the rows are normalised again.

    Returns
    -------
    Tensor, shape (n, d), float32
        Rows of L2 norm sqrt(d) (rows that are exactly zero stay zero).
    """
    if z.ndim != 2:
        raise ValueError(f"z must have shape (n, d); got {tuple(z.shape)}.")
    d = z.shape[1]
    z = z.float()
    z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
    if center is not None:
        if center.shape != (d,):
            raise ValueError(f"center must have shape ({d},) to match z; got {tuple(center.shape)}.")
        z = z - center.to(z)
        z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return z * math.sqrt(d)


def modality_mean(z: torch.Tensor) -> torch.Tensor:
    """Return the mean of the L2-normalised rows of ``z`` (n, d) as a (d,) tensor."""
    z = z.float()
    return (z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)).mean(dim=0)


def check_modality(modality: str) -> str:
    """Return ``modality`` if it is ``"image"`` or ``"text"``, else raise ValueError."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}; got {modality!r}.")
    return modality
