"""Zero-shot prediction with dictionary latents removed from image and/or prompt embeddings.

Removing a set S of latents from a normalised embedding z uses the dictionary
intervention with the reconstruction error kept:
``z' = decode(a with a_S = 0) + (z - decode(a))``, ``a = encode(z)``, so an empty S gives
z back exactly. Zero-shot logits are cosine similarities between the (edited)
image embeddings and the class embeddings built from the (edited) prompt embeddings.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from apps.bias_audit.tasks import class_embeddings

logger = logging.getLogger(__name__)

__all__ = ["ABLATE_FROM", "Ablation", "random_latent_sets", "remove_latents", "zero_shot_logits"]

ABLATE_FROM = ("image", "prompt", "both")
"""Embeddings an ablation can edit: image, prompt or both."""


@dataclass(frozen=True)
class Ablation:
    """One set of latents to remove.

    Attributes
    ----------
    name : str
        ``none``, a modality group (``ImgD``, ``TextD``, ``CrossD``) or ``random:<group>``.
    latents : tuple of int
        Latent indices removed.
    group : str or None
        Modality group the set comes from (or whose size a random set matches).
    draw : int or None
        Index of the random draw (None for non-random sets).
    """

    name: str
    latents: tuple[int, ...] = ()
    group: str | None = None
    draw: int | None = None

    @property
    def is_random(self) -> bool:
        return self.draw is not None


def remove_latents(dictionary, z: torch.Tensor, latents: Sequence[int], batch_size: int = 4096) -> torch.Tensor:
    """Remove ``latents`` from normalised embeddings.

    Parameters
    ----------
    dictionary : mmono_features.dictionary.Dictionary
        The dictionary whose latents are removed.
    z : Tensor, shape (n, d_in)
        Embeddings already normalised with ``dictionary.prepare``.
    latents : sequence of int
        Latent indices to zero; empty returns ``z`` itself.
    batch_size : int
        Rows per intervention call.

    Returns
    -------
    Tensor, shape (n, d_in)
    """
    latents = tuple(int(i) for i in latents)
    if not latents:
        return z
    bad = [i for i in latents if not 0 <= i < dictionary.d_sae]
    if bad:
        raise ValueError(f"latent indices {bad[:5]} are outside [0, {dictionary.d_sae}); check the scores file.")
    from mmono_features.intervene import LatentEdit, intervene

    edit = LatentEdit.suppress(latents, strength=1.0)
    device = next(iter(dictionary.parameters()), torch.empty(0)).device
    out = []
    with torch.no_grad():
        for start in range(0, z.shape[0], batch_size):
            block = z[start : start + batch_size].to(device)
            out.append(intervene(dictionary, block, edit, keep_error=True).float().cpu())
    return torch.cat(out) if out else z


def zero_shot_logits(
    dictionary,
    image_z: torch.Tensor,
    prompt_z: torch.Tensor,
    class_index: torch.Tensor,
    n_classes: int,
    latents: Sequence[int] = (),
    ablate_from: str = "both",
) -> torch.Tensor:
    """Cosine-similarity logits after removing ``latents``.

    Parameters
    ----------
    dictionary : Dictionary or None
        Needed only when ``latents`` is not empty.
    image_z : Tensor, shape (n_images, d_in)
        Normalised image embeddings (``dictionary.prepare(z, "image")``).
    prompt_z : Tensor, shape (n_prompts, d_in)
        Normalised prompt embeddings (``dictionary.prepare(z, "text")``).
    class_index : LongTensor, shape (n_prompts,)
        Class of each prompt.
    n_classes : int
        Number of classes.
    latents : sequence of int
        Latents to remove; empty for the unablated logits.
    ablate_from : {"image", "prompt", "both"}
        Which embeddings are edited.

    Returns
    -------
    Tensor, shape (n_images, n_classes)
        ``cos(image_z'[i], class_embedding'[c])``.
    """
    if ablate_from not in ABLATE_FROM:
        raise ValueError(f"ablate_from must be one of {ABLATE_FROM}; got {ablate_from!r}.")
    if latents:
        if ablate_from in ("image", "both"):
            image_z = remove_latents(dictionary, image_z, latents)
        if ablate_from in ("prompt", "both"):
            prompt_z = remove_latents(dictionary, prompt_z, latents)
    classes = class_embeddings(prompt_z, class_index, n_classes)
    images = torch.nn.functional.normalize(image_z.float(), dim=1)
    return images @ classes.T


def random_latent_sets(
    d_sae: int, size: int, n_draws: int, seed: int = 0, pool: Sequence[int] | None = None
) -> list[tuple[int, ...]]:
    """Draw ``n_draws`` random sets of ``size`` distinct latents.

    The draws are the baseline of a group ablation: removing any ``size`` latents
    moves the embeddings, so a group matters only if it moves the metrics more than
    random sets of its size. Draw ``i`` uses ``numpy.random.default_rng([seed, size, i])``.

    Parameters
    ----------
    d_sae : int
        Number of latents of the dictionary.
    size : int
        Latents per set.
    n_draws : int
        Number of sets.
    seed : int
        Base seed.
    pool : sequence of int, optional
        Latents to draw from (the audit passes the scored, non-rare latents, so that a
        random set is not mostly silent latents); default: all ``d_sae``.
    """
    candidates = np.arange(d_sae) if pool is None else np.unique(np.asarray(pool, dtype=np.int64))
    if size > len(candidates):
        raise ValueError(f"cannot draw {size} distinct latents out of a pool of {len(candidates)}.")
    sets = []
    for draw in range(n_draws):
        rng = np.random.default_rng([seed, size, draw])
        sets.append(tuple(sorted(int(i) for i in rng.choice(candidates, size=size, replace=False))))
    return sets
