"""ReLU sparse autoencoder with a decoder-norm-weighted L1 penalty (kind ``relu``).

latents = ReLU((z - b_dec) @ W_enc.T + b_enc), z_hat = latents @ W_dec + b_dec,

    loss = mean over the batch of [ ||z - z_hat||^2 + lambda_t * sum_j latents_j * ||W_dec[j]|| ].

Weighting each latent's L1 term by its decoder row norm makes the penalty invariant to
rescaling latent j by c > 0 while dividing its decoder row by c, so the model cannot
lower the loss by shrinking the encoder and growing the decoder. ``lambda_t`` rises
linearly from 0 to ``l1_coefficient`` over the first ``l1_warmup_steps`` steps.

The decoder rows are free during training (no unit-norm constraint). After the last
step, :meth:`ReLUSAE.finish_training` folds each row norm into the encoder: the codes
scale by the norm and the rows become unit vectors, while z_hat is unchanged. A trained
ReLU SAE therefore has unit decoder rows like the other kinds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from mmono_features.dictionary.base import DictionaryConfig, register_dictionary
from mmono_features.dictionary.sae import SparseAutoencoder, StepOutput, squared_error
from mmono_features.dictionary.topk import check_kind


@dataclass(frozen=True)
class ReLUConfig(DictionaryConfig):
    """Config of a ReLU-L1 SAE.

    Attributes
    ----------
    l1_coefficient : float
        Final weight ``lambda`` of the decoder-norm-weighted L1 penalty, >= 0. Its scale
        matches a squared error summed over ``d_in`` coordinates of embeddings of norm
        ``sqrt(d_in)``.
    l1_warmup_steps : int
        Steps over which the weight rises linearly from 0, >= 0 (0: constant).
    decoder_init_norm : float
        Norm of the decoder rows at initialisation, > 0. Small rows keep the first
        reconstructions small while about half of the latents are active.
    """

    expected_kind: ClassVar[str] = "relu"

    l1_coefficient: float = 1.0
    l1_warmup_steps: int = 500
    decoder_init_norm: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_kind(self, self.expected_kind)
        if not (isinstance(self.l1_coefficient, (int, float)) and math.isfinite(self.l1_coefficient) and self.l1_coefficient >= 0):
            raise ValueError(f"l1_coefficient must be a finite number >= 0; got {self.l1_coefficient!r}.")
        if not isinstance(self.l1_warmup_steps, int) or self.l1_warmup_steps < 0:
            raise ValueError(f"l1_warmup_steps must be an integer >= 0; got {self.l1_warmup_steps!r}.")
        if not (isinstance(self.decoder_init_norm, (int, float)) and math.isfinite(self.decoder_init_norm) and self.decoder_init_norm > 0):
            raise ValueError(f"decoder_init_norm must be a finite number > 0; got {self.decoder_init_norm!r}.")


def weighted_l1(latents: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``sum_j latents[b, j] * ||W_dec[j]||``.

    Parameters
    ----------
    latents : Tensor, shape (batch, d_sae)
        Non-negative codes.
    W_dec : Tensor, shape (d_sae, d_in)
        Decoder rows.
    """
    return (latents * W_dec.norm(dim=1)).sum(dim=1).mean()


@register_dictionary("relu")
class ReLUSAE(SparseAutoencoder):
    """ReLU SAE trained with a decoder-norm-weighted L1 penalty; see the module docstring."""

    config_class = ReLUConfig
    unit_norm_decoder = False

    def __init__(self, config: ReLUConfig) -> None:
        super().__init__(config)
        # The encoder stays the transpose of the decoder, both at the configured norm.
        with torch.no_grad():
            self.W_dec.mul_(config.decoder_init_norm)
            self.W_enc.mul_(config.decoder_init_norm)

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """Return ``ReLU((z - b_dec) @ W_enc.T + b_enc)``.

        Parameters
        ----------
        z : Tensor, shape (batch, d_in)

        Returns
        -------
        Tensor, shape (batch, d_sae)
        """
        return F.relu(self.pre_activations(z))

    def l1_weight(self, step: int) -> float:
        """Return the L1 weight at 0-based optimiser ``step`` (linear warm-up from 0)."""
        warmup = self.config.l1_warmup_steps
        fraction = 1.0 if warmup == 0 else min(1.0, (step + 1) / warmup)
        return self.config.l1_coefficient * fraction

    def loss_terms(self, z: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(loss, squared_error, weighted_l1, latents)`` of normalised ``z`` (batch, d_in)."""
        latents = self.encode(z)
        z_hat = self.decode(latents)
        error = squared_error(z, z_hat)
        penalty = weighted_l1(latents, self.W_dec)
        return error + self.l1_weight(step) * penalty, error, penalty, latents

    def training_step(self, z: torch.Tensor, step: int, dead: torch.Tensor) -> StepOutput:
        loss, error, penalty, latents = self.loss_terms(z, step)
        fired = (latents.detach() > 0).any(dim=0)
        terms = {"mse": float(error.detach()) / self.d_in, "l1": float(penalty.detach()), "l1_weight": self.l1_weight(step)}
        return StepOutput(loss, fired, terms)

    @torch.no_grad()
    def fold_decoder_norms(self) -> None:
        """Scale each decoder row to unit norm and its latent up by the old norm.

        ``W_enc[j]`` and ``b_enc[j]`` are multiplied by ``||W_dec[j]||`` and ``W_dec[j]``
        divided by it, so ``decode(encode(z))`` is unchanged (ReLU commutes with a
        positive scale) and the weighted L1 penalty becomes the plain L1 of the codes.
        Rows of zero norm are left as they are.
        """
        norms = self.W_dec.norm(dim=1)
        scale = torch.where(norms > 0, norms, torch.ones_like(norms))
        self.W_enc.mul_(scale[:, None])
        self.b_enc.mul_(scale)
        self.W_dec.div_(scale[:, None])

    def finish_training(self, batches=None) -> None:
        """Fold the decoder norms into the encoder (see :meth:`fold_decoder_norms`)."""
        self.fold_decoder_norms()
