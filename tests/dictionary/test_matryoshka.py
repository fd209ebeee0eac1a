"""Matryoshka SAE: planted recovery, nested prefixes, prefix-size validation."""

from __future__ import annotations

import pytest
import torch

from mmono_features.dictionary import MatryoshkaConfig, make_config


def test_recovers_planted_atoms(trained_planted, atom_recovery):
    planted, _, result = trained_planted("matryoshka")
    # Measured 1.0 (64 of 64 atoms at cosine > 0.9) after 400 steps.
    assert atom_recovery(result.dictionary.decoder_directions(), planted.atoms) >= 0.9


def test_every_prefix_reconstructs_better_than_zero(trained_planted):
    planted, _, result = trained_planted("matryoshka")
    dictionary = result.dictionary
    z = dictionary.prepare(planted.image[:1000], "image")
    with torch.no_grad():
        reconstructions = dictionary.prefix_reconstructions(z)
    assert len(reconstructions) == len(dictionary.config.prefix_sizes) == 3
    zero_error = float(z.pow(2).sum(dim=1).mean())
    errors = [float((z - z_hat).pow(2).sum(dim=1).mean()) for z_hat in reconstructions]
    assert all(error < zero_error for error in errors), (errors, zero_error)
    # The whole dictionary is the last prefix, so it is the full reconstruction.
    torch.testing.assert_close(reconstructions[-1], dictionary(z)[0], atol=1e-5, rtol=1e-5)
    assert errors[-1] <= errors[0]


def test_at_most_k_active(trained_planted):
    planted, _, result = trained_planted("matryoshka")
    latents = result.dictionary.encode(result.dictionary.prepare(planted.text[:300], "text"))
    assert int((latents > 0).sum(dim=1).max()) <= result.dictionary.config.k


def test_default_prefix_sizes_filled_and_saved():
    config = make_config("matryoshka", 16, 128, k=4)
    assert config.prefix_sizes == (8, 32, 128)
    assert config.to_dict()["prefix_sizes"] == [8, 32, 128]
    assert MatryoshkaConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ((16, 8, 64), "strictly increasing"),
        ((8, 8, 64), "strictly increasing"),
        ((8, 32), "d_sae=64"),
        ((8, 32, 100), "d_sae=64"),
        ((0, 64), "positive"),
    ],
)
def test_invalid_prefix_sizes_rejected(sizes, message):
    with pytest.raises(ValueError, match=message) as error:
        make_config("matryoshka", 16, 64, k=4, prefix_sizes=sizes)
    assert str(sizes).replace(" ", "") in str(error.value).replace(" ", "")
