"""Matryoshka sparse autoencoder (kind ``matryoshka``).

Nested prefixes of the latents each reconstruct z on their own (Bussmann et al., 2025;
Nabeshima, 2024). Codes are chosen as in a TopK SAE: the ``k`` largest pre-activations
of each sample, so at most ``k`` are non-zero per sample. For each prefix size ``m``, the
reconstruction uses only the active latents with index ``< m``:

    z_hat_m = latents[:, :m] @ W_dec[:m] + b_dec,
    loss = mean over prefix sizes m of (mean over the batch of ||z - z_hat_m||^2) + AuxK.

The loss is averaged, not summed, over prefixes so that the learning rate means the same
as for a TopK SAE. Early latents are pushed to carry the coarse, general directions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mmono_features.dictionary.base import register_dictionary
from mmono_features.dictionary.sae import SparseLayout, TopKFamily, sparse_decode, squared_error
from mmono_features.dictionary.topk import TopKConfig


def default_prefix_sizes(d_sae: int) -> tuple[int, ...]:
    """Return ``(d_sae // 16, d_sae // 4, d_sae)`` without empty or repeated sizes."""
    sizes = sorted({size for size in (d_sae // 16, d_sae // 4, d_sae) if size > 0})
    return tuple(sizes)


@dataclass(frozen=True)
class MatryoshkaConfig(TopKConfig):
    """Config of a Matryoshka SAE (the fields of :class:`TopKConfig` plus the below).

    Attributes
    ----------
    prefix_sizes : tuple of int
        Strictly increasing positive prefix sizes ending at ``d_sae``. Empty means
        :func:`default_prefix_sizes` and is filled in at construction.
    """

    expected_kind: ClassVar[str] = "matryoshka"

    prefix_sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        sizes = tuple(self.prefix_sizes) if self.prefix_sizes else default_prefix_sizes(self.d_sae)
        if not all(isinstance(size, int) and size > 0 for size in sizes):
            raise ValueError(f"prefix_sizes must be positive integers; got {sizes!r}.")
        if any(later <= earlier for earlier, later in zip(sizes, sizes[1:])):
            raise ValueError(f"prefix_sizes must be strictly increasing; got {sizes!r}.")
        if sizes[-1] != self.d_sae:
            raise ValueError(
                f"the last prefix size must equal d_sae={self.d_sae}; got prefix_sizes={sizes!r}. "
                f"Append {self.d_sae} or change d_sae."
            )
        object.__setattr__(self, "prefix_sizes", sizes)


@register_dictionary("matryoshka")
class MatryoshkaSAE(TopKFamily):
    """Matryoshka SAE with TopK codes; see the module docstring for the loss."""

    config_class = MatryoshkaConfig

    def select(self, pre: torch.Tensor) -> SparseLayout:
        """Choose the ``k`` largest pre-activations of each row of ``pre`` (batch, d_sae)."""
        return SparseLayout.from_row_indices(pre.topk(self.config.k, dim=1, sorted=False).indices, self.d_sae)

    def prefix_reconstructions(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Return the reconstruction of ``z`` (batch, d_in) by each prefix, each (batch, d_in)."""
        values, layout, _, _ = self.sparse_codes(z)
        return [z_hat for _, z_hat in self._prefix_outputs(values, layout)]

    def _prefix_outputs(self, values: torch.Tensor, layout: SparseLayout):
        for size in self.config.prefix_sizes:
            masked = values if size == self.d_sae else values * (layout.cols < size).to(values)
            yield size, sparse_decode(masked, self.W_dec, layout) + self.b_dec

    def reconstruction_loss(
        self, z: torch.Tensor, values: torch.Tensor, layout: SparseLayout
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        losses, z_hat = [], None
        for _, z_hat in self._prefix_outputs(values, layout):
            losses.append(squared_error(z, z_hat))
        # The last prefix is the whole dictionary, so z_hat is the full reconstruction.
        return torch.stack(losses).mean(), z_hat, losses[-1].detach()
