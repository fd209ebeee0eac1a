"""BatchTopK sparse autoencoder (kind ``batchtopk``).

Training keeps the ``k * batch`` largest pre-activations over the whole batch
(Bussmann et al., 2024), so a sample may use more or fewer than ``k`` latents while the
batch averages ``k``. Each training batch also updates a threshold: an exponential
running average, with weight ``threshold_momentum`` on the past, of the smallest kept
positive pre-activation. Inference uses that threshold instead of the batch:

    latents = pre * (pre > threshold),

so a sample's codes do not depend on the rest of its batch. With ``cap_at_k`` (the
default), inference then also keeps at most the ``k`` largest of those per sample, which
guarantees at most ``k`` non-zero latents per sample. Without it, a sample can exceed
``k``. Both inference modes are per-sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mmono_features.dictionary.base import register_dictionary
from mmono_features.dictionary.sae import SparseLayout, StepOutput, TopKFamily
from mmono_features.dictionary.topk import TopKConfig


@dataclass(frozen=True)
class BatchTopKConfig(TopKConfig):
    """Config of a BatchTopK SAE (the fields of :class:`TopKConfig` plus the below).

    Attributes
    ----------
    threshold_momentum : float
        Weight of the past in the running average of the threshold, in [0, 1).
    cap_at_k : bool
        Whether inference keeps at most the ``k`` largest above-threshold latents per
        sample (True) or every latent above the threshold (False).
    """

    expected_kind: ClassVar[str] = "batchtopk"

    threshold_momentum: float = 0.99
    cap_at_k: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.threshold_momentum < 1.0:
            raise ValueError(f"threshold_momentum must be in [0, 1); got {self.threshold_momentum!r}.")


def _batch_top(pre: torch.Tensor, n_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Select the ``n_keep`` largest entries of ``pre`` (batch, d_sae): (values, flat indices).

    A top-k over all batch * d_sae entries is slow on the CPU, so each row first keeps
    its ``4 * n_keep / batch`` largest entries and the batch-level top-k runs over those.
    The result is exact unless some row had all its candidates kept (it might have had
    more); then the full top-k runs instead.
    """
    n_rows, n_cols = pre.shape
    n_keep = min(n_keep, pre.numel())
    per_row = min(n_cols, 4 * -(-n_keep // n_rows))
    if per_row < n_cols:
        candidates = pre.topk(per_row, dim=1, sorted=False)
        top = candidates.values.reshape(-1).topk(n_keep, sorted=False)
        rows = torch.div(top.indices, per_row, rounding_mode="floor")
        if int(torch.bincount(rows, minlength=n_rows).max()) < per_row:
            flat = rows * n_cols + candidates.indices.reshape(-1)[top.indices]
            return top.values, flat
    top = pre.reshape(-1).topk(n_keep, sorted=False)
    return top.values, top.indices


@register_dictionary("batchtopk")
class BatchTopKSAE(TopKFamily):
    """BatchTopK SAE: batch-level top-k in training, a learned threshold in inference.

    Buffers ``threshold`` (scalar, the inference threshold) and ``threshold_updates``
    (number of training batches averaged into it) are saved with the weights. Before
    any training step the threshold is 0, so inference is a ReLU (capped at ``k`` per
    sample when ``cap_at_k``).
    """

    config_class = BatchTopKConfig

    def __init__(self, config: BatchTopKConfig) -> None:
        super().__init__(config)
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))

    def select(self, pre: torch.Tensor) -> SparseLayout:
        """Cells of ``pre`` (batch, d_sae) above the threshold, capped at ``k`` per row if configured."""
        threshold = self.threshold.clamp_min(0.0)
        if not self.config.cap_at_k:
            return SparseLayout.from_mask(pre > threshold)
        top = pre.topk(self.config.k, dim=1, sorted=False)
        return SparseLayout.from_row_indices(top.indices, self.d_sae, keep=top.values > threshold)

    def select_for_training(self, pre: torch.Tensor) -> SparseLayout:
        """Choose the ``k * batch`` largest positive pre-activations of the whole batch."""
        top_values, flat = _batch_top(pre, self.config.k * pre.shape[0])
        positive = top_values > 0
        self._update_threshold(top_values[positive])
        return SparseLayout.from_flat(flat[positive], pre.shape[0], self.d_sae)

    @torch.no_grad()
    def _update_threshold(self, kept_values: torch.Tensor) -> None:
        if kept_values.numel() == 0:
            return
        smallest = kept_values.min().to(self.threshold)
        if int(self.threshold_updates) == 0:
            self.threshold.copy_(smallest)
        else:
            momentum = self.config.threshold_momentum
            self.threshold.mul_(momentum).add_((1.0 - momentum) * smallest)
        self.threshold_updates += 1

    def training_step(self, z: torch.Tensor, step: int, dead: torch.Tensor) -> StepOutput:
        output = super().training_step(z, step, dead)
        output.terms["threshold"] = float(self.threshold)
        return output
