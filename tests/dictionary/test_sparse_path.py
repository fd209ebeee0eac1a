"""The sparse autograd path of the TopK kinds, checked against dense autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmono_features.dictionary import TopKSAE, make_config
from mmono_features.dictionary.sae import SparseLayout, gather_pre_activations, geometric_median, sparse_decode


def _random_layout(generator: torch.Generator, n_rows: int = 7, n_cols: int = 11, k: int = 3) -> SparseLayout:
    indices = torch.rand(n_rows, n_cols, generator=generator).topk(k, dim=1).indices
    return SparseLayout.from_row_indices(indices, n_cols)


def test_layout_round_trip():
    mask = torch.tensor([[True, False, True], [False, False, False], [False, True, False]])
    layout = SparseLayout.from_mask(mask)
    assert layout.crow.tolist() == [0, 2, 2, 3]
    values = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(layout.to_dense(values), torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0], [0.0, 3.0, 0.0]]))
    flat = SparseLayout.from_flat(torch.tensor([7, 0, 2]), 3, 3)
    assert flat.rows.tolist() == [0, 0, 2]
    assert flat.cols.tolist() == [0, 2, 1]


def test_sparse_decode_matches_dense_gradients():
    generator = torch.Generator().manual_seed(0)
    layout = _random_layout(generator)
    values = torch.rand(layout.nnz, generator=generator, dtype=torch.float64).requires_grad_(True)
    weight = torch.randn(11, 5, generator=generator, dtype=torch.float64).requires_grad_(True)
    target = torch.randn(7, 5, generator=generator, dtype=torch.float64)

    sparse_out = sparse_decode(values, weight, layout)
    (sparse_out * target).sum().backward()
    sparse_grads = values.grad.clone(), weight.grad.clone()
    values.grad, weight.grad = None, None

    dense_out = layout.to_dense(values) @ weight
    (dense_out * target).sum().backward()
    torch.testing.assert_close(sparse_out, dense_out)
    torch.testing.assert_close(sparse_grads[0], values.grad)
    torch.testing.assert_close(sparse_grads[1], weight.grad)
    # Only the rows of active latents get a gradient.
    inactive = torch.ones(11, dtype=torch.bool)
    inactive[layout.cols] = False
    assert bool((sparse_grads[1][inactive] == 0).all())


def test_sparse_decode_passes_gradcheck():
    generator = torch.Generator().manual_seed(1)
    layout = _random_layout(generator, n_rows=4, n_cols=6, k=2)
    values = torch.rand(layout.nnz, generator=generator, dtype=torch.float64).requires_grad_(True)
    weight = torch.randn(6, 3, generator=generator, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v, w: sparse_decode(v, w, layout), (values, weight))


def test_gather_pre_activations_matches_dense_gradients():
    generator = torch.Generator().manual_seed(2)
    layout = _random_layout(generator)
    x = torch.randn(7, 5, generator=generator, dtype=torch.float64).requires_grad_(True)
    weight = torch.randn(11, 5, generator=generator, dtype=torch.float64).requires_grad_(True)
    bias = torch.randn(11, generator=generator, dtype=torch.float64).requires_grad_(True)
    upstream = torch.randn(layout.nnz, generator=generator, dtype=torch.float64)

    with torch.no_grad():
        pre = F.linear(x, weight, bias)
    sparse = gather_pre_activations(x, weight, bias, pre, layout)
    (sparse * upstream).sum().backward()
    sparse_grads = [tensor.grad.clone() for tensor in (x, weight, bias)]
    for tensor in (x, weight, bias):
        tensor.grad = None

    dense = layout.gather(F.linear(x, weight, bias))
    (dense * upstream).sum().backward()
    torch.testing.assert_close(sparse, dense)
    for got, expected in zip(sparse_grads, (x.grad, weight.grad, bias.grad)):
        torch.testing.assert_close(got, expected)


def test_topk_training_step_gradients_match_a_dense_topk():
    # The full TopK loss through the sparse path against the same loss written densely.
    dictionary = TopKSAE(make_config("topk", 8, 24, k=3, aux_coefficient=0.0, seed=0))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        dictionary.b_enc.copy_(0.1 * torch.randn(24, generator=generator))
        dictionary.b_dec.copy_(0.1 * torch.randn(8, generator=generator))
    z = torch.randn(10, 8, generator=generator)
    output = dictionary.training_step(z, step=0, dead=torch.zeros(24, dtype=torch.bool))
    output.loss.backward()
    sparse_grads = {name: p.grad.clone() for name, p in dictionary.named_parameters()}
    dictionary.zero_grad()

    pre = F.linear(z - dictionary.b_dec, dictionary.W_enc, dictionary.b_enc)
    top = pre.topk(3, dim=1)
    latents = torch.zeros_like(pre).scatter(1, top.indices, F.relu(top.values))
    z_hat = latents @ dictionary.W_dec + dictionary.b_dec
    (z - z_hat).pow(2).sum(dim=1).mean().backward()
    assert float(output.loss.detach()) == pytest.approx(float((z - z_hat).detach().pow(2).sum(dim=1).mean()), rel=1e-5)
    for name, p in dictionary.named_parameters():
        torch.testing.assert_close(sparse_grads[name], p.grad, atol=1e-5, rtol=1e-4)


def test_aux_loss_uses_only_dead_latents():
    dictionary = TopKSAE(make_config("topk", 8, 24, k=2, k_aux=4, seed=0))
    z = torch.randn(16, 8, generator=torch.Generator().manual_seed(4))
    dead = torch.zeros(24, dtype=torch.bool)
    dead[[1, 5, 9, 13, 17]] = True
    output = dictionary.training_step(z, step=0, dead=dead)
    assert "aux_loss" in output.terms
    output.loss.backward()
    # Live latents get encoder gradient from the main loss only, so the difference to a
    # run without the aux term must sit on dead latents.
    with_aux = dictionary.W_enc.grad.clone()
    dictionary.zero_grad()
    plain = TopKSAE(make_config("topk", 8, 24, k=2, k_aux=4, aux_coefficient=0.0, seed=0))
    plain.training_step(z, step=0, dead=dead).loss.backward()
    changed = (with_aux - plain.W_enc.grad).abs().sum(dim=1) > 1e-7
    assert bool(changed.any())
    assert bool(dead[changed].all())
    no_dead = dictionary.training_step(z, step=0, dead=torch.zeros(24, dtype=torch.bool))
    assert "aux_loss" not in no_dead.terms


def test_geometric_median_known_answers():
    # Three of four points at the origin: the median is the origin, the mean is not.
    points = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [8.0, 0.0]])
    torch.testing.assert_close(geometric_median(points), torch.zeros(2), atol=1e-3, rtol=0)
    # Symmetric points: the median is the centre.
    square = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]]) + torch.tensor([3.0, -2.0])
    torch.testing.assert_close(geometric_median(square), torch.tensor([3.0, -2.0]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"\(0, 2\)"):
        geometric_median(torch.zeros(0, 2))
