"""TopK sparse autoencoder (kind ``topk``).

latents = ReLU(TopK_k((z - b_dec) @ W_enc.T + b_enc)), z_hat = latents @ W_dec + b_dec,
loss = mean over the batch of ||z - z_hat||^2 + aux_coefficient * AuxK,
as in "Scaling and evaluating sparse autoencoders" (Gao et al., 2024). Decoder rows stay
at unit norm; the encoder starts as the transpose of the decoder and ``b_dec`` at the
geometric median of a data sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mmono_features.dictionary.base import DictionaryConfig, register_dictionary
from mmono_features.dictionary.sae import SparseLayout, TopKFamily


def check_kind(config: DictionaryConfig, expected: str) -> None:
    """Raise ValueError unless ``config.kind`` is ``expected``."""
    if config.kind != expected:
        raise ValueError(
            f"{type(config).__name__} is the config of kind {expected!r}; got kind={config.kind!r} "
            "(make_config(kind, ...) picks the right class)."
        )


@dataclass(frozen=True)
class TopKConfig(DictionaryConfig):
    """Config of a TopK SAE.

    Attributes
    ----------
    k : int
        Active latents per sample, 1 <= k <= d_sae.
    k_aux : int, optional
        Dead latents used by the auxiliary loss; ``None`` means ``min(d_in // 2, d_sae)``
        (the TopK paper's choice) and is filled in at construction.
    aux_coefficient : float
        Weight of the auxiliary loss, >= 0 (1/32 in the TopK paper).
    """

    expected_kind: ClassVar[str] = "topk"

    k: int = 32
    k_aux: int | None = None
    aux_coefficient: float = 1.0 / 32.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_kind(self, self.expected_kind)
        if not isinstance(self.k, int) or not 1 <= self.k <= self.d_sae:
            raise ValueError(f"k must be an integer in [1, d_sae={self.d_sae}]; got k={self.k!r}. Lower k or raise d_sae.")
        if self.k_aux is None:
            object.__setattr__(self, "k_aux", max(1, min(self.d_in // 2, self.d_sae)))
        if not isinstance(self.k_aux, int) or not 1 <= self.k_aux <= self.d_sae:
            raise ValueError(f"k_aux must be an integer in [1, d_sae={self.d_sae}]; got k_aux={self.k_aux!r}.")
        if not self.aux_coefficient >= 0:
            raise ValueError(f"aux_coefficient must be >= 0; got {self.aux_coefficient!r}.")


@register_dictionary("topk")
class TopKSAE(TopKFamily):
    """TopK SAE: exactly the ``k`` largest pre-activations of each sample, ReLU'd.

    At most ``k`` latents are non-zero per sample (fewer when some of the top ``k``
    pre-activations are negative).
    """

    config_class = TopKConfig

    def select(self, pre: torch.Tensor) -> SparseLayout:
        """Choose the ``k`` largest pre-activations of each row of ``pre`` (batch, d_sae)."""
        return SparseLayout.from_row_indices(pre.topk(self.config.k, dim=1, sorted=False).indices, self.d_sae)
