"""Shift of dictionary latents under an attack, and its split over modality groups.

For clean embeddings z and adversarial embeddings z' of the same images, with latents
``a = encode(prepare(z, "image"))``, the shift of latent j is

    shift_j = mean_i |a_j(z'_i) - a_j(z_i)|,

and the share of a modality group G is ``sum_{j in G} shift_j / sum_j shift_j``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

logger = logging.getLogger(__name__)

__all__ = ["GROUP_ORDER", "ShiftResult", "feature_shift", "latent_shift", "plot_shift", "shift_by_group"]

GROUP_ORDER = ("ImgD", "TextD", "CrossD", "rare", "unscored")
"""Order of the groups in tables and plots; ``unscored`` contains latents missing from the scores."""


@torch.no_grad()
def image_latents(dictionary: Any, z: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Latents (n, d_sae) of raw image embeddings ``z`` (n, d_in), on the CPU."""
    if z.ndim != 2 or z.shape[1] != dictionary.d_in:
        raise ValueError(f"z must have shape (n, {dictionary.d_in}); got {tuple(z.shape)}.")
    device = next(iter(dictionary.buffers()), torch.empty(0)).device
    chunks = []
    for start in range(0, len(z), batch_size):
        batch = z[start : start + batch_size].to(device)
        chunks.append(dictionary.encode(dictionary.prepare(batch, "image")).float().cpu())
    return torch.cat(chunks) if chunks else torch.zeros(0, dictionary.d_sae)


def latent_shift(clean_latents: torch.Tensor, adversarial_latents: torch.Tensor) -> pd.DataFrame:
    """Per-latent shift between clean and adversarial latents.

    Parameters
    ----------
    clean_latents, adversarial_latents : Tensor, shape (n_images, d_sae)
        Latents of the same images, row by row.

    Returns
    -------
    pandas.DataFrame
        One row per latent, sorted by decreasing shift: ``latent``, ``mean_abs_shift``
        (mean_i |a'_ij - a_ij|), ``mean_clean``, ``mean_adversarial``, ``share`` (of the
        summed shift; 0 everywhere when nothing moved) and ``rank`` (0 = most shifted).
    """
    if clean_latents.shape != adversarial_latents.shape or clean_latents.ndim != 2:
        raise ValueError(
            "clean_latents and adversarial_latents must both be (n_images, d_sae); got "
            f"{tuple(clean_latents.shape)} and {tuple(adversarial_latents.shape)}."
        )
    if len(clean_latents) == 0:
        raise ValueError("no images: latent_shift needs at least one clean/adversarial pair.")
    clean = clean_latents.double()
    adversarial = adversarial_latents.double()
    shift = (adversarial - clean).abs().mean(dim=0).numpy()
    total = shift.sum()
    table = pd.DataFrame(
        {
            "latent": np.arange(len(shift)),
            "mean_abs_shift": shift,
            "mean_clean": clean.mean(dim=0).numpy(),
            "mean_adversarial": adversarial.mean(dim=0).numpy(),
            "share": shift / total if total > 0 else np.zeros_like(shift),
        }
    )
    # A stable sort keeps ties in latent order, so the ranking is deterministic.
    table = table.sort_values("mean_abs_shift", ascending=False, kind="stable").reset_index(drop=True)
    table["rank"] = np.arange(len(table))
    return table


def _latent_groups(scores: Any | None, d_sae: int) -> np.ndarray:
    groups = np.full(d_sae, "unscored", dtype=object)
    if scores is None:
        return groups
    table = scores.table
    latents = table["latent"].to_numpy(dtype=np.int64)
    if (latents < 0).any() or (latents >= d_sae).any():
        raise ValueError(f"the scores name latents outside [0, {d_sae}); they belong to another dictionary. Pass the scores of this dictionary.")
    groups[latents] = table["group"].astype(str).to_numpy()
    return groups


def shift_by_group(table: pd.DataFrame, scores: Any | None) -> pd.DataFrame:
    """Share of the total shift carried by each modality group.

    Parameters
    ----------
    table : pandas.DataFrame
        Output of :func:`latent_shift`.
    scores : mmono_features.modality.Scores, optional
        Group of every latent; without it every latent is ``unscored``.

    Returns
    -------
    pandas.DataFrame
        One row per group present: ``group``, ``n_latents``, ``shift`` (summed mean
        |delta a|), ``share`` (of the total), ``latent_fraction`` (the group's share of
        the latents, the share expected if every latent moved alike) and
        ``mean_shift_per_latent``.
    """
    d_sae = int(table["latent"].max()) + 1 if len(table) else 0
    groups = _latent_groups(scores, d_sae)
    labelled = table.assign(group=groups[table["latent"].to_numpy()])
    total = float(labelled["mean_abs_shift"].sum())
    rows = []
    present = list(GROUP_ORDER) + sorted(set(labelled["group"]) - set(GROUP_ORDER))
    for group in present:
        part = labelled[labelled["group"] == group]
        if part.empty:
            continue
        shift = float(part["mean_abs_shift"].sum())
        rows.append(
            {
                "group": group,
                "n_latents": int(len(part)),
                "shift": shift,
                "share": shift / total if total > 0 else 0.0,
                "latent_fraction": len(part) / len(labelled),
                "mean_shift_per_latent": shift / len(part),
            }
        )
    return pd.DataFrame(rows, columns=["group", "n_latents", "shift", "share", "latent_fraction", "mean_shift_per_latent"])


@dataclass
class ShiftResult:
    """Feature shift of one attack.

    Attributes
    ----------
    latents : pandas.DataFrame
        :func:`latent_shift` table with a ``group`` column.
    groups : pandas.DataFrame
        :func:`shift_by_group` table.
    attack : str
        Label of the attack (and mode) that made the adversarial images.
    """

    latents: pd.DataFrame
    groups: pd.DataFrame
    attack: str = ""


def feature_shift(
    dictionary: Any,
    clean_z: torch.Tensor,
    adversarial_z: torch.Tensor,
    scores: Any | None = None,
    attack: str = "",
) -> ShiftResult:
    """Latent and group shift between clean and adversarial raw image embeddings (n, d_in)."""
    table = latent_shift(image_latents(dictionary, clean_z), image_latents(dictionary, adversarial_z))
    groups = _latent_groups(scores, dictionary.d_sae)
    table.insert(1, "group", groups[table["latent"].to_numpy()])
    return ShiftResult(latents=table, groups=shift_by_group(table, scores), attack=attack)


def plot_shift(result: ShiftResult, path: str | Path, top: int = 20) -> Path:
    """Save a PNG: the ``top`` most shifted latents coloured by group, and the group shares."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"ImgD": "#d95f02", "TextD": "#1b9e77", "CrossD": "#7570b3", "rare": "#999999", "unscored": "#cccccc"}
    head = result.latents.head(top)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 1]})
    left.bar(
        range(len(head)),
        head["mean_abs_shift"],
        color=[colours.get(g, "#444444") for g in head["group"]],
    )
    left.set_xticks(range(len(head)), [str(v) for v in head["latent"]], rotation=90, fontsize=7)
    left.set_xlabel("latent")
    left.set_ylabel("mean |Δa|")
    left.set_title(f"most shifted latents{': ' + result.attack if result.attack else ''}")
    right.bar(
        result.groups["group"],
        result.groups["share"],
        color=[colours.get(g, "#444444") for g in result.groups["group"]],
    )
    right.set_ylim(0, 1)
    right.set_ylabel("share of total shift")
    right.set_title("by modality group")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
