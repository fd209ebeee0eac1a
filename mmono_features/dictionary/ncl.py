"""Non-negative contrastive learning head (kind ``ncl``).

A head g(z) = ReLU(z @ W_enc.T + b_enc), shared by both modalities by default, maps the
normalised embeddings of image i (u_i) and caption i (v_i) to non-negative codes, trained
with the symmetric CLIP InfoNCE loss on the cosine of the codes:

    s_ij = exp(logit_scale) * cos(g(u_i), g(v_j)),
    loss = (CE(s[i, :], i) + CE(s[:, j], j)) / 2 averaged over the batch,

with a learnable ``logit_scale`` (log inverse temperature, capped at log 100). The codes
are the latents.

The head has no decoder. After training, :meth:`NCLHead.fit_decoder` fits a linear one
by ridge least squares over the training embeddings,

    W_dec, b_dec = argmin sum ||z - g(z) @ W_dec - b_dec||^2 + ridge * ||W_dec||^2,

so that :meth:`decode` and interventions work; ``ridge`` is relative to the mean
diagonal of the centred code Gram matrix, which makes it scale-free.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mmono_features.dictionary.base import Dictionary, DictionaryConfig, register_dictionary
from mmono_features.dictionary.sae import StepOutput
from mmono_features.dictionary.topk import check_kind
from mmono_features.embeddings import check_modality

logger = logging.getLogger(__name__)

MAX_LOGIT_SCALE = math.log(100.0)


@dataclass(frozen=True)
class NCLConfig(DictionaryConfig):
    """Config of a non-negative contrastive head.

    Attributes
    ----------
    shared_head : bool
        One head for both modalities (True) or one per modality (False; then
        :meth:`NCLHead.encode` needs ``modality``).
    temperature : float
        Initial softmax temperature, in (0.01, 1]; learnt in training.
    ridge : float
        Relative ridge term of the least-squares decoder, >= 0.
    """

    expected_kind: ClassVar[str] = "ncl"

    shared_head: bool = True
    temperature: float = 0.07
    ridge: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        check_kind(self, self.expected_kind)
        if not 0.01 < self.temperature <= 1.0:
            raise ValueError(f"temperature must be in (0.01, 1]; got {self.temperature!r}.")
        if not self.ridge >= 0:
            raise ValueError(f"ridge must be >= 0; got {self.ridge!r}.")


@register_dictionary("ncl")
class NCLHead(Dictionary):
    """Non-negative contrastive head with a least-squares decoder; see the module docstring.

    Parameters (state dict names): ``W_enc`` (d_sae, d_in) and ``b_enc`` (d_sae,) for a
    shared head, else ``W_image``, ``b_image``, ``W_text``, ``b_text``; ``logit_scale``
    (scalar). Buffers: ``W_dec`` (d_sae, d_in) and ``b_dec`` (d_in,), zero until
    :meth:`fit_decoder` runs.
    """

    config_class = NCLConfig
    paired_training: bool = True

    def __init__(self, config: NCLConfig) -> None:
        super().__init__(config)
        generator = torch.Generator().manual_seed(int(config.seed))

        def unit_rows() -> torch.Tensor:
            rows = torch.randn(config.d_sae, config.d_in, generator=generator)
            return rows / rows.norm(dim=1, keepdim=True)

        if config.shared_head:
            self.W_enc = nn.Parameter(unit_rows())
            self.b_enc = nn.Parameter(torch.zeros(config.d_sae))
        else:
            self.W_image = nn.Parameter(unit_rows())
            self.b_image = nn.Parameter(torch.zeros(config.d_sae))
            self.W_text = nn.Parameter(unit_rows())
            self.b_text = nn.Parameter(torch.zeros(config.d_sae))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.temperature)))
        self.register_buffer("W_dec", torch.zeros(config.d_sae, config.d_in))
        self.register_buffer("b_dec", torch.zeros(config.d_in))

    def _head(self, modality: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config.shared_head:
            if modality is not None:
                check_modality(modality)
            return self.W_enc, self.b_enc
        if modality is None:
            raise ValueError(
                "this NCL dictionary has one head per modality (shared_head=False); "
                "call encode(z, modality='image' or 'text'), encode_image or encode_text."
            )
        check_modality(modality)
        return (self.W_image, self.b_image) if modality == "image" else (self.W_text, self.b_text)

    def encode(self, z: torch.Tensor, modality: str | None = None) -> torch.Tensor:
        """Return the non-negative codes ``ReLU(z @ W.T + b)`` of the head of ``modality``.

        Parameters
        ----------
        z : Tensor, shape (batch, d_in)
            Normalised embeddings.
        modality : {"image", "text"}, optional
            Ignored (only checked) with a shared head; required with per-modality
            heads, where a call without it raises ValueError.

        Returns
        -------
        Tensor, shape (batch, d_sae)
        """
        self.check_input(z)
        weight, bias = self._head(modality)
        return F.relu(F.linear(z, weight, bias))

    def encode_image(self, z: torch.Tensor) -> torch.Tensor:
        """Codes of normalised image embeddings (batch, d_in) -> (batch, d_sae)."""
        return self.encode(z, "image")

    def encode_text(self, z: torch.Tensor) -> torch.Tensor:
        """Codes of normalised text embeddings (batch, d_in) -> (batch, d_sae)."""
        return self.encode(z, "text")

    def forward(self, z: torch.Tensor, modality: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(z_hat, latents)``; ``modality`` as in :meth:`encode`."""
        latents = self.encode(z, modality)
        return self.decode(latents), latents

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Return ``latents @ W_dec + b_dec`` with the least-squares decoder.

        Parameters
        ----------
        latents : Tensor, shape (batch, d_sae)

        Returns
        -------
        Tensor, shape (batch, d_in)
            All ``b_dec`` (zero) before :meth:`fit_decoder` has run.
        """
        if latents.ndim != 2 or latents.shape[1] != self.d_sae:
            raise ValueError(f"expected latents of shape (batch, {self.d_sae}); got {tuple(latents.shape)}.")
        return latents @ self.W_dec + self.b_dec

    def decoder_directions(self) -> torch.Tensor:
        """Unit rows of the least-squares decoder, shape (d_sae, d_in).

        A latent whose decoder row is zero (it never fired on the fitting data, or the
        decoder is not fitted yet) gets the direction of its encoder row instead (the
        image head's with per-modality heads).
        """
        weight = self.W_dec.detach().clone()
        norms = weight.norm(dim=1)
        empty = norms <= 1e-12
        if empty.any():
            encoder = (self.W_enc if self.config.shared_head else self.W_image).detach()
            weight[empty] = encoder[empty]
            norms = weight.norm(dim=1)
        return weight / norms.clamp_min(1e-12)[:, None]

    def contrastive_loss(self, image_z: torch.Tensor, text_z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Symmetric InfoNCE loss of paired normalised embeddings.

        Parameters
        ----------
        image_z, text_z : Tensor, shape (n_pairs, d_in)
            Row i of each is the same pair.

        Returns
        -------
        loss : Tensor, scalar
        image_codes, text_codes : Tensor, shape (n_pairs, d_sae)
        """
        image_codes = self.encode(image_z, "image")
        text_codes = self.encode(text_z, "text")
        scale = self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
        logits = scale * F.normalize(image_codes, dim=1, eps=1e-8) @ F.normalize(text_codes, dim=1, eps=1e-8).t()
        targets = torch.arange(image_z.shape[0], device=image_z.device)
        loss = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))
        return loss, image_codes, text_codes

    def training_step(self, image_z: torch.Tensor, text_z: torch.Tensor, step: int) -> StepOutput:
        """Loss of one batch of pairs (normalised, each (n_pairs, d_in)); ``step`` is unused."""
        loss, image_codes, text_codes = self.contrastive_loss(image_z, text_z)
        fired = (image_codes.detach() > 0).any(dim=0) | (text_codes.detach() > 0).any(dim=0)
        return StepOutput(loss, fired, {"temperature": float(1.0 / self.logit_scale.detach().clamp(max=MAX_LOGIT_SCALE).exp())})

    def before_optimizer_step(self) -> None:
        """Nothing to do for a contrastive head."""

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Keep the logit scale at or below log 100."""
        self.logit_scale.clamp_(max=MAX_LOGIT_SCALE)

    def finish_training(self, batches: Iterable[tuple[torch.Tensor, str]] | None = None) -> None:
        """Fit the least-squares decoder on ``batches`` of (normalised z, modality)."""
        if batches is not None:
            self.fit_decoder(batches)

    @torch.no_grad()
    def fit_decoder(self, batches: Iterable[tuple[torch.Tensor, str]]) -> None:
        """Fit ``W_dec`` and ``b_dec`` by ridge least squares from streamed batches.

        Parameters
        ----------
        batches : iterable of (Tensor (batch, d_in), str)
            Normalised embeddings and their modality (``"image"`` or ``"text"``).
            Only sums of size (d_sae + d_in)^2 are kept, so memory does not grow
            with the data.
        """
        device = self.W_dec.device
        d_sae, d_in = self.d_sae, self.d_in
        gram = torch.zeros(d_sae, d_sae, dtype=torch.float64, device=device)
        cross = torch.zeros(d_sae, d_in, dtype=torch.float64, device=device)
        code_sum = torch.zeros(d_sae, dtype=torch.float64, device=device)
        z_sum = torch.zeros(d_in, dtype=torch.float64, device=device)
        count = 0
        for z, modality in batches:
            z = z.to(device)
            codes = self.encode(z, modality).double()
            z = z.double()
            gram += codes.t() @ codes
            cross += codes.t() @ z
            code_sum += codes.sum(dim=0)
            z_sum += z.sum(dim=0)
            count += z.shape[0]
        if count == 0:
            raise ValueError("fit_decoder got no data; pass at least one batch of embeddings.")
        code_mean, z_mean = code_sum / count, z_sum / count
        # Centring removes the bias from the solve: b_dec = mean(z) - mean(codes) @ W_dec.
        gram -= count * torch.outer(code_mean, code_mean)
        cross -= count * torch.outer(code_mean, z_mean)
        scale = gram.diagonal().mean().clamp_min(1e-12)
        system = gram + (self.config.ridge * scale + 1e-12) * torch.eye(d_sae, dtype=torch.float64, device=device)
        weight = torch.linalg.solve(system, cross)
        self.W_dec.copy_(weight.to(self.W_dec))
        self.b_dec.copy_((z_mean - code_mean @ weight).to(self.b_dec))
        logger.info("fitted the least-squares decoder of an NCL head on %d embeddings", count)
