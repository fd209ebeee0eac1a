"""Shared machinery of the sparse autoencoder kinds (TopK, BatchTopK, Matryoshka, ReLU-L1).

Parameter layout, for ``d_in`` inputs and ``d_sae`` latents:

- ``W_enc`` (d_sae, d_in) and ``b_enc`` (d_sae,): pre-activations
  ``pre = (z - b_dec) @ W_enc.T + b_enc``;
- ``W_dec`` (d_sae, d_in) and ``b_dec`` (d_in,): ``z_hat = latents @ W_dec + b_dec``,
  i.e. row ``j`` of ``W_dec`` is the direction latent ``j`` writes.

Both weights store one row per latent, so the rows that a sparse code touches are
contiguous in memory for the encoder as well as for the decoder.

Sparse path. A TopK-style step touches only ``nnz = batch * k`` (latent, sample) cells.
After one dense product for the pre-activations (needed to choose the active latents),
everything with a gradient goes through two autograd functions on a CSR layout of the
active cells: :func:`gather_pre_activations` (encoder side) and :func:`sparse_decode`
(decoder side). Their backward passes cost O(nnz * d_in), not O(batch * d_sae * d_in):

- sums of selected rows use ``embedding_bag`` with per-sample weights (mode ``sum``);
- per-cell dot products (the gradient of a code value) use ``torch.sparse.sampled_addmm``;
- weight gradients touch only the active rows (a column-sorted ``embedding_bag``).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mmono_features.dictionary.base import Dictionary

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# Sparse layout and the two autograd functions of the sparse path
# ---------------------------------------------------------------------------


@dataclass
class SparseLayout:
    """Positions of the active cells of a (n_rows, n_cols) code matrix, in CSR order.

    Attributes
    ----------
    rows : LongTensor, shape (nnz,)
        Row (sample) of each cell, non-decreasing.
    cols : LongTensor, shape (nnz,)
        Column (latent) of each cell.
    crow : LongTensor, shape (n_rows + 1,)
        CSR row pointers: the cells of row ``b`` are ``crow[b]:crow[b + 1]``.
    n_rows, n_cols : int
        Shape of the dense matrix.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    crow: torch.Tensor
    n_rows: int
    n_cols: int
    _by_col: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def from_row_indices(cls, indices: torch.Tensor, n_cols: int, keep: torch.Tensor | None = None) -> "SparseLayout":
        """Layout of ``indices`` (n_rows, k): row ``b`` is active at columns ``indices[b]``.

        ``keep`` (n_rows, k) bool, optional, drops the cells where it is False.
        """
        n_rows, k = indices.shape
        device = indices.device
        if keep is None:
            rows = torch.arange(n_rows, device=device).repeat_interleave(k)
            crow = torch.arange(n_rows + 1, device=device) * k
            return cls(rows, indices.reshape(-1), crow, n_rows, n_cols)
        rows = torch.arange(n_rows, device=device)[:, None].expand(n_rows, k)[keep]
        return cls(rows, indices[keep], _row_pointers(rows, n_rows), n_rows, n_cols)

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> "SparseLayout":
        """Layout of the True cells of ``mask`` (n_rows, n_cols)."""
        rows, cols = mask.nonzero(as_tuple=True)
        return cls(rows, cols, _row_pointers(rows, mask.shape[0]), mask.shape[0], mask.shape[1])

    @classmethod
    def from_flat(cls, flat: torch.Tensor, n_rows: int, n_cols: int) -> "SparseLayout":
        """Layout of flat indices ``row * n_cols + col`` into a (n_rows, n_cols) matrix."""
        flat = _sort_indices(flat)
        rows = torch.div(flat, n_cols, rounding_mode="floor")
        return cls(rows, flat - rows * n_cols, _row_pointers(rows, n_rows), n_rows, n_cols)

    @property
    def nnz(self) -> int:
        return int(self.cols.numel())

    def by_col(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(perm, col_pointers)``: the cells sorted by column, and CSR pointers of that order."""
        if self._by_col is None:
            perm = _sort_indices(self.cols, return_order=True)
            self._by_col = (perm, _row_pointers(self.cols[perm], self.n_cols))
        return self._by_col

    def gather(self, dense: torch.Tensor) -> torch.Tensor:
        """Return the values of ``dense`` (n_rows, n_cols) at the active cells, shape (nnz,)."""
        return dense[self.rows, self.cols]

    def to_dense(self, values: torch.Tensor) -> torch.Tensor:
        """Scatter ``values`` (nnz,) into a zero (n_rows, n_cols) matrix; differentiable."""
        dense = values.new_zeros(self.n_rows, self.n_cols)
        return dense.index_put((self.rows, self.cols), values)

    def row_sums(self, values: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Return ``out[b] = sum over cells (b, j) of values * table[j]``, shape (n_rows, d)."""
        return F.embedding_bag(self.cols, table, self.crow, mode="sum", per_sample_weights=values, include_last_offset=True)

    def col_sums(self, values: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """Return ``out[j] = sum over cells (b, j) of values * dense[b]``, shape (n_cols, d)."""
        perm, col_pointers = self.by_col()
        return F.embedding_bag(
            self.rows[perm], dense, col_pointers, mode="sum", per_sample_weights=values[perm], include_last_offset=True
        )

    def cell_dots(self, left: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Return ``<left[b], table[j]>`` for every active cell (b, j), shape (nnz,)."""
        if self.nnz == 0:
            return left.new_zeros(0)
        with warnings.catch_warnings():
            # The beta-state notice of sparse CSR tensors, raised on first use.
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(
                self.crow, self.cols, left.new_zeros(self.nnz), (self.n_rows, self.n_cols), check_invariants=False
            )
            return torch.sparse.sampled_addmm(pattern, left, table.t(), beta=0.0).values()


def _sort_indices(indices: torch.Tensor, return_order: bool = False) -> torch.Tensor:
    """Stable sort of non-negative indices: the sorted values, or the order that sorts them."""
    # Sorting int32 keys is an order of magnitude faster than int64 on the CPU.
    keys = indices.int() if indices.numel() and int(indices.max()) < 2**31 - 1 else indices
    result = torch.sort(keys, stable=True)
    return result.indices if return_order else result.values.long()


def _row_pointers(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    counts = torch.bincount(rows, minlength=n_rows)
    pointers = rows.new_zeros(n_rows + 1)
    torch.cumsum(counts, 0, out=pointers[1:])
    return pointers


class _GatherPreActivations(torch.autograd.Function):
    """values[e] = x[b] . W_enc[j] + b_enc[j] at the active cells, from precomputed pre-activations."""

    @staticmethod
    def forward(ctx, x, weight, bias, pre, layout):  # noqa: D401
        ctx.layout = layout
        ctx.save_for_backward(x, weight)
        return layout.gather(pre)

    @staticmethod
    def backward(ctx, grad_values):
        x, weight = ctx.saved_tensors
        layout: SparseLayout = ctx.layout
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = layout.row_sums(grad_values, weight)
        if ctx.needs_input_grad[1]:
            grad_weight = layout.col_sums(grad_values, x)
        if ctx.needs_input_grad[2]:
            grad_bias = torch.zeros_like(weight[:, 0]).index_add_(0, layout.cols, grad_values)
        return grad_x, grad_weight, grad_bias, None, None


class _SparseDecode(torch.autograd.Function):
    """out[b] = sum over active cells (b, j) of values * W_dec[j]."""

    @staticmethod
    def forward(ctx, values, weight, layout):  # noqa: D401
        ctx.layout = layout
        ctx.save_for_backward(values, weight)
        return layout.row_sums(values, weight)

    @staticmethod
    def backward(ctx, grad_out):
        values, weight = ctx.saved_tensors
        layout: SparseLayout = ctx.layout
        grad_out = grad_out.contiguous()
        grad_values = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_values = layout.cell_dots(grad_out, weight)
        if ctx.needs_input_grad[1]:
            grad_weight = layout.col_sums(values, grad_out)
        return grad_values, grad_weight, None


def gather_pre_activations(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pre: torch.Tensor, layout: SparseLayout
) -> torch.Tensor:
    """Pre-activations at the active cells, with a sparse backward.

    Parameters
    ----------
    x : Tensor, shape (batch, d_in)
        Encoder input (``z - b_dec``).
    weight : Tensor, shape (d_sae, d_in)
    bias : Tensor, shape (d_sae,)
    pre : Tensor, shape (batch, d_sae)
        ``x @ weight.T + bias`` computed without gradient (it chose the layout).
    layout : SparseLayout
        The active cells.

    Returns
    -------
    Tensor, shape (nnz,)
        ``pre`` at the active cells; gradients flow to ``x``, ``weight`` (active rows
        only) and ``bias``.
    """
    return _GatherPreActivations.apply(x, weight, bias, pre.detach(), layout)


def sparse_decode(values: torch.Tensor, weight: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
    """Return ``sum_j values[b, j] * weight[j]`` per row, shape (batch, d_in), with a sparse backward.

    Parameters
    ----------
    values : Tensor, shape (nnz,)
        Code values at the active cells of ``layout``.
    weight : Tensor, shape (d_sae, d_in)
        Decoder rows; its gradient is non-zero only at the active rows.
    layout : SparseLayout
    """
    return _SparseDecode.apply(values, weight, layout)


# ---------------------------------------------------------------------------
# Shared SAE base
# ---------------------------------------------------------------------------


@dataclass
class StepOutput:
    """Output of one training step of a dictionary, read by the training loop.

    Attributes
    ----------
    loss : Tensor, scalar
        The loss to minimise.
    fired : BoolTensor, shape (d_sae,)
        Latents active on at least one sample of the batch (dead-latent tracking).
    terms : dict[str, float]
        Parts of the loss for the history (e.g. ``mse``, ``aux_loss``, ``l1``).
    """

    loss: torch.Tensor
    fired: torch.Tensor
    terms: dict[str, float] = field(default_factory=dict)


def geometric_median(points: torch.Tensor, n_iter: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Geometric median of ``points`` (n, d) by Weiszfeld's iterations, shape (d,).

    The point minimising the sum of Euclidean distances to the rows. It starts at the
    mean and stops when a step moves less than ``tol`` times the mean distance.
    """
    if points.ndim != 2 or points.shape[0] == 0:
        raise ValueError(f"points must have shape (n, d) with n >= 1; got {tuple(points.shape)}.")
    points = points.double()
    median = points.mean(dim=0)
    for _ in range(n_iter):
        distances = (points - median).norm(dim=1)
        weights = 1.0 / distances.clamp_min(1e-12)
        updated = (weights[:, None] * points).sum(dim=0) / weights.sum()
        moved = (updated - median).norm()
        median = updated
        if moved <= tol * distances.mean().clamp_min(1e-12):
            break
    return median.float()


class SparseAutoencoder(Dictionary):
    """Base of the SAE kinds: parameters, initialisation and decoder-norm upkeep.

    Initialisation is seeded by ``config.seed`` and independent of the global RNG.
    Decoder rows are random unit vectors and the encoder is the transpose of the decoder
    (``W_enc = W_dec`` in this row-per-latent layout), with ``b_enc = 0``.
    :meth:`initialize_from_data` then sets ``b_dec`` to the geometric median of a sample.
    """

    #: Whether the decoder rows are kept at unit norm during training.
    unit_norm_decoder: bool = True
    #: Whether training needs (image, text) pairs instead of single embeddings.
    paired_training: bool = False

    def __init__(self, config) -> None:
        super().__init__(config)
        if config.kind != self.kind:
            raise ValueError(f"{type(self).__name__} is the {self.kind!r} kind; got a config of kind {config.kind!r}.")
        generator = torch.Generator().manual_seed(int(config.seed))
        directions = torch.randn(config.d_sae, config.d_in, generator=generator)
        directions = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec = nn.Parameter(directions.clone())
        self.W_enc = nn.Parameter(directions.clone())
        self.b_enc = nn.Parameter(torch.zeros(config.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(config.d_in))

    # -- initialisation and decoder upkeep ---------------------------------

    @torch.no_grad()
    def initialize_from_data(self, sample: torch.Tensor) -> None:
        """Set ``b_dec`` to the geometric median of ``sample`` (n, d_in) normalised embeddings."""
        self.check_input(sample)
        self.b_dec.copy_(geometric_median(sample).to(self.b_dec))

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Remove from each decoder row's gradient its component along the row."""
        if not self.unit_norm_decoder or self.W_dec.grad is None:
            return
        # The rows are unit vectors here (after_optimizer_step keeps them so), which
        # spares a normalisation: grad -= <grad, row> row.
        grad, rows = self.W_dec.grad, self.W_dec
        along = torch.einsum("ij,ij->i", grad, rows)
        grad.addcmul_(along[:, None].expand_as(rows), rows, value=-1.0)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Rescale the decoder rows back to unit norm."""
        if self.unit_norm_decoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def finish_training(self, batches=None) -> None:
        """Hook run once after the last step (``batches``: training data, unused here)."""

    # -- shared forward pieces ----------------------------------------------

    def pre_activations(self, z: torch.Tensor) -> torch.Tensor:
        """Return ``(z - b_dec) @ W_enc.T + b_enc``, shape (batch, d_sae)."""
        self.check_input(z)
        return F.linear(z - self.b_dec, self.W_enc, self.b_enc)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Return ``latents @ W_dec + b_dec``.

        Parameters
        ----------
        latents : Tensor, shape (batch, d_sae)

        Returns
        -------
        Tensor, shape (batch, d_in)
        """
        if latents.ndim != 2 or latents.shape[1] != self.d_sae:
            raise ValueError(f"expected latents of shape (batch, {self.d_sae}); got {tuple(latents.shape)}.")
        return latents @ self.W_dec + self.b_dec

    def decoder_directions(self) -> torch.Tensor:
        """Return the decoder rows scaled to unit norm, shape (d_sae, d_in)."""
        weight = self.W_dec.detach()
        return weight / weight.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def training_step(self, z: torch.Tensor, step: int, dead: torch.Tensor) -> StepOutput:
        """Loss of one batch of normalised embeddings ``z`` (batch, d_in).

        ``step`` is the 0-based optimiser step; ``dead`` (d_sae,) bool marks the latents
        that have not fired for the configured number of training samples.
        """
        raise NotImplementedError


def squared_error(z: torch.Tensor, z_hat: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``||z - z_hat||^2`` (summed over the d_in coordinates)."""
    return (z - z_hat).pow(2).sum(dim=1).mean()


class TopKFamily(SparseAutoencoder):
    """Shared code of the kinds whose codes come from a top-k choice (TopK, BatchTopK, Matryoshka).

    Subclasses choose the active cells in :meth:`select` (inference) and may override
    :meth:`select_for_training`. The auxiliary loss follows the TopK paper of OpenAI
    (Gao et al., 2024): the residual ``e = z - z_hat`` is reconstructed from the
    ``k_aux`` largest pre-activations among the dead latents, and
    ``aux_coefficient * ||e - e_hat||^2`` is added to the loss.
    """

    def select(self, pre: torch.Tensor) -> SparseLayout:
        """Choose the active cells of ``pre`` (batch, d_sae) for inference."""
        raise NotImplementedError

    def select_for_training(self, pre: torch.Tensor) -> SparseLayout:
        """Choose the active cells during training; defaults to :meth:`select`."""
        return self.select(pre)

    def sparse_codes(self, z: torch.Tensor, training: bool = False) -> tuple[torch.Tensor, SparseLayout, torch.Tensor, torch.Tensor]:
        """Return ``(values, layout, x, pre)``: the codes of ``z`` in sparse form.

        ``values`` (nnz,) are the ReLU'd pre-activations at the active cells;
        ``x = z - b_dec`` and ``pre`` (batch, d_sae, no gradient) are returned for the
        auxiliary loss.
        """
        self.check_input(z)
        x = z - self.b_dec
        with torch.no_grad():
            pre = F.linear(x, self.W_enc, self.b_enc)
        layout = self.select_for_training(pre) if training else self.select(pre)
        values = F.relu(gather_pre_activations(x, self.W_enc, self.b_enc, pre, layout))
        return values, layout, x, pre

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """Return the latents of normalised embeddings.

        Parameters
        ----------
        z : Tensor, shape (batch, d_in)

        Returns
        -------
        Tensor, shape (batch, d_sae)
            Non-negative; differentiable with respect to ``z`` and the parameters.
        """
        values, layout, _, _ = self.sparse_codes(z)
        return layout.to_dense(values)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(z_hat, latents)``; the reconstruction uses the sparse decoder path."""
        values, layout, _, _ = self.sparse_codes(z)
        return sparse_decode(values, self.W_dec, layout) + self.b_dec, layout.to_dense(values)

    def reconstruction_loss(
        self, z: torch.Tensor, values: torch.Tensor, layout: SparseLayout
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(loss, z_hat, error)`` of the codes, ``error`` the detached squared error of ``z_hat``.

        Matryoshka overrides it with its loss over prefixes.
        """
        z_hat = sparse_decode(values, self.W_dec, layout) + self.b_dec
        loss = squared_error(z, z_hat)
        return loss, z_hat, loss.detach()

    def training_step(self, z: torch.Tensor, step: int, dead: torch.Tensor) -> StepOutput:
        values, layout, x, pre = self.sparse_codes(z, training=True)
        loss, z_hat, error = self.reconstruction_loss(z, values, layout)
        terms = {"mse": float(error) / self.d_in}
        total = loss
        aux = self._aux_loss(z - z_hat.detach(), x, pre, dead)
        if aux is not None:
            total = total + self.config.aux_coefficient * aux
            terms["aux_loss"] = float(aux.detach())
        fired = torch.zeros(self.d_sae, dtype=torch.bool, device=z.device)
        fired[layout.cols[values.detach() > 0]] = True
        return StepOutput(total, fired, terms)

    def _aux_loss(self, residual: torch.Tensor, x: torch.Tensor, pre: torch.Tensor, dead: torch.Tensor) -> torch.Tensor | None:
        n_dead = int(dead.sum())
        if n_dead == 0 or self.config.aux_coefficient == 0:
            return None
        k_aux = min(self.config.k_aux, n_dead)
        masked = pre.masked_fill(~dead[None, :], -math.inf)
        layout = SparseLayout.from_row_indices(masked.topk(k_aux, dim=1, sorted=False).indices, self.d_sae)
        values = F.relu(gather_pre_activations(x, self.W_enc, self.b_enc, pre, layout))
        residual_hat = sparse_decode(values, self.W_dec, layout)
        return squared_error(residual.detach(), residual_hat)
