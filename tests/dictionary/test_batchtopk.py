"""BatchTopK SAE: planted recovery, threshold inference, batch independence, the k cap."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mmono_features.dictionary import BatchTopKSAE, make_config
from mmono_features.dictionary.batchtopk import _batch_top


def test_recovers_planted_atoms(trained_planted, atom_recovery):
    planted, _, result = trained_planted("batchtopk")
    # Measured 1.0 (64 of 64 atoms at cosine > 0.9) after 400 steps.
    assert atom_recovery(result.dictionary.decoder_directions(), planted.atoms) >= 0.9


def test_threshold_is_learnt_and_saved(trained_planted, tmp_path):
    _, _, result = trained_planted("batchtopk")
    dictionary = result.dictionary
    assert float(dictionary.threshold) > 0
    assert int(dictionary.threshold_updates) > 0
    dictionary.save_pretrained(tmp_path)
    reloaded = BatchTopKSAE.from_pretrained(tmp_path)
    assert float(reloaded.threshold) == float(dictionary.threshold)


def test_inference_caps_at_k_per_sample(trained_planted):
    planted, _, result = trained_planted("batchtopk")
    dictionary = result.dictionary
    assert dictionary.config.cap_at_k
    latents = dictionary.encode(dictionary.prepare(planted.image[:1000], "image"))
    assert int((latents > 0).sum(dim=1).max()) <= dictionary.config.k
    # Every kept latent clears the learnt threshold.
    assert bool((latents[latents > 0] > dictionary.threshold).all())


@pytest.mark.parametrize("cap_at_k", [True, False])
def test_inference_does_not_depend_on_the_batch(trained_planted, cap_at_k):
    planted, _, result = trained_planted("batchtopk")
    trained = result.dictionary
    config = dataclasses.replace(trained.config, cap_at_k=cap_at_k)
    dictionary = BatchTopKSAE(config)
    dictionary.load_state_dict(trained.state_dict())
    z = dictionary.prepare(planted.text[:200], "text")
    together = dictionary.encode(z)
    alone = torch.cat([dictionary.encode(z[i : i + 1]) for i in range(0, 200, 7)])
    torch.testing.assert_close(alone, together[0:200:7], atol=1e-5, rtol=1e-5)
    shuffled = dictionary.encode(z.flip(0)).flip(0)
    torch.testing.assert_close(shuffled, together, atol=1e-5, rtol=1e-5)


def test_uncapped_inference_is_the_plain_threshold(trained_planted):
    planted, _, result = trained_planted("batchtopk")
    trained = result.dictionary
    dictionary = BatchTopKSAE(dataclasses.replace(trained.config, cap_at_k=False))
    dictionary.load_state_dict(trained.state_dict())
    z = dictionary.prepare(planted.image[:300], "image")
    pre = dictionary.pre_activations(z)
    expected = pre * (pre > dictionary.threshold)
    torch.testing.assert_close(dictionary.encode(z), expected, atol=1e-5, rtol=1e-5)


def test_training_keeps_k_times_batch_over_the_batch():
    dictionary = BatchTopKSAE(make_config("batchtopk", 8, 32, k=2, seed=0))
    pre = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    pre[0] += 10.0  # one sample takes far more than k latents
    layout = dictionary.select_for_training(pre)
    assert layout.nnz == 2 * 16
    assert int((layout.rows == 0).sum()) > 2
    expected = torch.sort(pre.reshape(-1).topk(32).indices).values
    assert torch.equal(torch.sort(layout.rows * 32 + layout.cols).values, expected)
    # The threshold starts at the smallest kept value.
    assert float(dictionary.threshold) == pytest.approx(float(pre.reshape(-1).topk(32).values.min()))


@pytest.mark.parametrize("boost_row", [None, 3])
def test_batch_top_equals_the_flat_top(boost_row):
    generator = torch.Generator().manual_seed(0)
    pre = torch.randn(64, 300, generator=generator)
    if boost_row is not None:
        pre[boost_row] += 6.0  # forces the exact fallback
    values, flat = _batch_top(pre, 64 * 5)
    reference = pre.reshape(-1).topk(64 * 5)
    assert torch.equal(torch.sort(flat).values, torch.sort(reference.indices).values)
    torch.testing.assert_close(pre.reshape(-1)[flat], values)


def test_invalid_momentum_rejected():
    with pytest.raises(ValueError, match="1.5"):
        make_config("batchtopk", 8, 16, k=2, threshold_momentum=1.5)
    with pytest.raises(ValueError, match="k=17"):
        make_config("batchtopk", 8, 16, k=17)
