"""Reconstruction and sparsity metrics of a dictionary, per modality.

For normalised embeddings z (n, d_in), reconstructions z_hat = decode(encode(z)) and
latents a (n, d_sae):

- ``mse``: mean over samples and coordinates of (z - z_hat)^2;
- ``fvu``: fraction of variance unexplained, sum ||z - z_hat||^2 / sum ||z - mean(z)||^2
  (the mean over the set being scored);
- ``cosine``: mean over samples of cos(z, z_hat);
- ``l0``: mean number of non-zero latents per sample;
- ``dead_fraction``: share of the d_sae latents that are zero on every sample of the set.

For an NCL head, ``retrieval`` adds the top-1 accuracy of image -> text and text ->
image retrieval by cosine of the codes over the given pairs (chance: 1 / n_pairs).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from mmono_features.dictionary.base import Dictionary

logger = logging.getLogger(__name__)

METRIC_KEYS = ("mse", "fvu", "cosine", "l0", "dead_fraction")


class _Accumulator:
    """Running sums for the metrics of one set, in float64."""

    def __init__(self, d_in: int, d_sae: int, device: torch.device) -> None:
        self.count = 0
        self.squared_error = 0.0
        self.z_sum = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.z_squared = 0.0
        self.cosine = 0.0
        self.l0 = 0.0
        self.active = torch.zeros(d_sae, dtype=torch.bool, device=device)

    def add(self, z: torch.Tensor, z_hat: torch.Tensor, latents: torch.Tensor) -> None:
        z64, z_hat64 = z.double(), z_hat.double()
        self.count += z.shape[0]
        self.squared_error += float((z64 - z_hat64).pow(2).sum())
        self.z_sum += z64.sum(dim=0)
        self.z_squared += float(z64.pow(2).sum())
        self.cosine += float(F.cosine_similarity(z64, z_hat64, dim=1, eps=1e-12).sum())
        nonzero = latents != 0
        self.l0 += float(nonzero.sum())
        self.active |= nonzero.any(dim=0)

    def merge(self, other: "_Accumulator") -> "_Accumulator":
        merged = _Accumulator(self.z_sum.numel(), self.active.numel(), self.z_sum.device)
        for total in (self, other):
            merged.count += total.count
            merged.squared_error += total.squared_error
            merged.z_sum += total.z_sum
            merged.z_squared += total.z_squared
            merged.cosine += total.cosine
            merged.l0 += total.l0
            merged.active |= total.active
        return merged

    def result(self) -> dict[str, float]:
        if self.count == 0:
            return {key: float("nan") for key in METRIC_KEYS}
        d_in = self.z_sum.numel()
        # sum ||z - mean||^2 = sum ||z||^2 - n ||mean||^2
        variance = self.z_squared - float(self.z_sum.pow(2).sum()) / self.count
        return {
            "mse": self.squared_error / (self.count * d_in),
            "fvu": self.squared_error / variance if variance > 0 else float("nan"),
            "cosine": self.cosine / self.count,
            "l0": self.l0 / self.count,
            "dead_fraction": 1.0 - float(self.active.double().mean()),
        }


def _device_of(dictionary: Dictionary) -> torch.device:
    for tensor in dictionary.parameters():
        return tensor.device
    for tensor in dictionary.buffers():
        return tensor.device
    return torch.device("cpu")


def _encode(dictionary: Dictionary, z: torch.Tensor, modality: str) -> torch.Tensor:
    # Only an NCL head may need the modality (one head per modality); the other kinds
    # take the generic encode(z).
    if getattr(dictionary, "paired_training", False):
        return dictionary.encode(z, modality)
    return dictionary.encode(z)


def _check_embeddings(name: str, z: torch.Tensor, d_in: int) -> None:
    if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[1] != d_in or z.shape[0] == 0:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"{name} must be a tensor of shape (n, {d_in}) with n >= 1; got {shape}.")


@torch.no_grad()
def evaluate_dictionary(
    dictionary: Dictionary,
    image_z: torch.Tensor,
    text_z: torch.Tensor,
    batch_size: int = 1024,
) -> dict:
    """Score a dictionary on raw image and text embeddings.

    Parameters
    ----------
    dictionary : Dictionary
        Any kind; inputs are normalised with ``dictionary.prepare``.
    image_z : Tensor, shape (n_image, d_in)
        Raw image embeddings.
    text_z : Tensor, shape (n_text, d_in)
        Raw text embeddings. For an NCL head, ``n_text == n_image`` and row i of each
        is the same pair (for the retrieval accuracy).
    batch_size : int
        Embeddings encoded at once.

    Returns
    -------
    dict
        ``{"image": {...}, "text": {...}, "all": {...}}``, each with ``mse``, ``fvu``,
        ``cosine``, ``l0`` and ``dead_fraction`` (see the module docstring); ``all``
        scores the union of both sets. An NCL head adds
        ``"retrieval": {"image_to_text": ..., "text_to_image": ...}``.
    """
    _check_embeddings("image_z", image_z, dictionary.d_in)
    _check_embeddings("text_z", text_z, dictionary.d_in)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")
    device = _device_of(dictionary)
    was_training = dictionary.training
    dictionary.eval()
    try:
        totals = {}
        codes = {}
        for modality, raw in (("image", image_z), ("text", text_z)):
            total = _Accumulator(dictionary.d_in, dictionary.d_sae, device)
            unit_codes = []
            for start in range(0, raw.shape[0], batch_size):
                z = dictionary.prepare(raw[start : start + batch_size].to(device), modality)
                latents = _encode(dictionary, z, modality)
                total.add(z, dictionary.decode(latents), latents)
                if getattr(dictionary, "paired_training", False):
                    unit_codes.append(F.normalize(latents, dim=1, eps=1e-8))
            totals[modality] = total
            codes[modality] = unit_codes
        result: dict = {modality: totals[modality].result() for modality in ("image", "text")}
        result["all"] = totals["image"].merge(totals["text"]).result()
        if getattr(dictionary, "paired_training", False):
            if image_z.shape[0] == text_z.shape[0]:
                result["retrieval"] = _retrieval(torch.cat(codes["image"]), torch.cat(codes["text"]), batch_size)
            else:
                logger.warning(
                    "retrieval accuracy skipped: it needs paired sets, got %d image and %d text embeddings",
                    image_z.shape[0],
                    text_z.shape[0],
                )
    finally:
        dictionary.train(was_training)
    return result


def _retrieval(image_codes: torch.Tensor, text_codes: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Top-1 retrieval accuracy both ways from unit-norm codes (n_pairs, d_sae)."""
    n = image_codes.shape[0]
    targets = torch.arange(n, device=image_codes.device)
    image_hits = 0
    text_best = torch.full((n,), -float("inf"), device=image_codes.device)
    text_argbest = torch.zeros(n, dtype=torch.long, device=image_codes.device)
    for start in range(0, n, batch_size):
        block = image_codes[start : start + batch_size] @ text_codes.t()  # (block, n)
        image_hits += int((block.argmax(dim=1) == targets[start : start + block.shape[0]]).sum())
        # Best image for every text, keeping the first maximum as argmax does.
        values, rows = block.max(dim=0)
        better = values > text_best
        text_best = torch.where(better, values, text_best)
        text_argbest = torch.where(better, rows + start, text_argbest)
    text_hits = int((text_argbest == targets).sum())
    return {"image_to_text": image_hits / n, "text_to_image": text_hits / n}
