"""Measuring generated images with the open_clip model and the dictionary.

For each image:

- the CLIP score against a text, ``100 * cos(f_img(x), f_txt(text))`` with the open_clip
  model the dictionary was trained on (not clipped at 0, so a negative value is kept);
- the activation of each steered latent on the image:
  ``encode(prepare(f_img(x), "image"))[:, j]``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)


def embed_images(backbone: Any, images: Sequence[Any]) -> torch.Tensor:
    """Embed PIL images with the backbone's own preprocessing, (n_images, embed_dim) float32 on the CPU."""
    if not images:
        raise ValueError("images must hold at least one PIL image.")
    pixels = torch.stack([backbone.preprocess(image.convert("RGB")) for image in images])
    return backbone.encode_images(pixels).cpu()


def clip_scores(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """Return ``100 * cos`` between every image and every text.

    Parameters
    ----------
    image_embeddings : Tensor, shape (n_images, embed_dim)
    text_embeddings : Tensor, shape (n_texts, embed_dim)

    Returns
    -------
    Tensor, shape (n_images, n_texts), float32
    """
    if image_embeddings.ndim != 2 or text_embeddings.ndim != 2 or image_embeddings.shape[1] != text_embeddings.shape[1]:
        raise ValueError(
            f"expected (n_images, d) and (n_texts, d) embeddings; got {tuple(image_embeddings.shape)} and {tuple(text_embeddings.shape)}."
        )
    images = torch.nn.functional.normalize(image_embeddings.float(), dim=-1)
    texts = torch.nn.functional.normalize(text_embeddings.float(), dim=-1)
    return 100.0 * images @ texts.T


@torch.no_grad()
def latent_activations(dictionary: Any, image_embeddings: torch.Tensor, latents: Sequence[int]) -> torch.Tensor:
    """Activations of ``latents`` on raw image embeddings, (n_images, len(latents)) float32."""
    device = next(iter(dictionary.parameters())).device
    z = dictionary.prepare(image_embeddings.float().to(device), "image")
    return dictionary.encode(z)[:, list(latents)].float().cpu()


def measure_images(
    backbone: Any,
    dictionary: Any,
    images: Sequence[Any],
    prompt: str,
    feature_texts: Sequence[str],
    latents: Sequence[int],
) -> list[dict[str, Any]]:
    """Measure each image against the prompt, the feature names and the steered latents.

    Parameters
    ----------
    backbone : mmono_features.backbone.Backbone
    dictionary : Dictionary
    images : sequence of PIL.Image.Image
    prompt : str
    feature_texts : sequence of str
        Names of the steered features (may be empty when they have none).
    latents : sequence of int
        Steered latent ids.

    Returns
    -------
    list of dict, one per image
        ``clip_score_prompt`` (float), ``clip_score_features`` ({name: float}),
        ``activations`` ({latent id as str: float}).
    """
    image_embeddings = embed_images(backbone, images)
    texts = [prompt] + list(feature_texts)
    scores = clip_scores(image_embeddings, backbone.encode_texts(texts).cpu())
    activations = latent_activations(dictionary, image_embeddings, latents)
    records = []
    for i in range(len(images)):
        records.append(
            {
                "clip_score_prompt": float(scores[i, 0]),
                "clip_score_features": {name: float(scores[i, 1 + k]) for k, name in enumerate(feature_texts)},
                "activations": {str(j): float(activations[i, k]) for k, j in enumerate(latents)},
            }
        )
    return records
