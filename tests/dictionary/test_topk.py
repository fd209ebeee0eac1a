"""TopK SAE: planted recovery, the k cap, unit decoder rows, config validation."""

from __future__ import annotations

import pytest
import torch

from mmono_features.dictionary import TopKConfig, TopKSAE, make_config


def test_recovers_planted_atoms(trained_planted, atom_recovery):
    planted, _, result = trained_planted("topk")
    # Measured 1.0 (64 of 64 atoms at cosine > 0.9) after 400 steps.
    assert atom_recovery(result.dictionary.decoder_directions(), planted.atoms) >= 0.9
    assert result.history[-1]["all"]["fvu"] < 0.15  # measured 0.056 on the held-out split


def test_at_most_k_active_per_sample(trained_planted):
    planted, _, result = trained_planted("topk")
    dictionary = result.dictionary
    latents = dictionary.encode(dictionary.prepare(planted.text[:500], "text"))
    assert latents.shape == (500, dictionary.d_sae)
    assert int((latents > 0).sum(dim=1).max()) <= dictionary.config.k
    assert bool((latents >= 0).all())


def test_decoder_rows_stay_unit_norm(trained_planted):
    _, _, result = trained_planted("topk")
    norms = result.dictionary.W_dec.detach().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)
    directions = result.dictionary.decoder_directions()
    assert directions.shape == (result.dictionary.d_sae, result.dictionary.d_in)


def test_forward_matches_encode_then_decode(trained_planted):
    planted, _, result = trained_planted("topk")
    dictionary = result.dictionary
    z = dictionary.prepare(planted.image[:64], "image")
    z_hat, latents = dictionary(z)
    torch.testing.assert_close(latents, dictionary.encode(z))
    torch.testing.assert_close(z_hat, dictionary.decode(latents), atol=1e-5, rtol=1e-5)


def test_encoder_starts_as_decoder_transpose():
    dictionary = TopKSAE(make_config("topk", 16, 40, k=4, seed=3))
    # Row-per-latent layout: W_enc (d_sae, d_in) equal to W_dec is the transpose of the
    # decoder matrix z_hat = W_dec.T @ latents.
    assert torch.equal(dictionary.W_enc, dictionary.W_dec)
    torch.testing.assert_close(dictionary.W_dec.norm(dim=1), torch.ones(40))


def test_k_aux_default_is_half_of_d_in():
    assert make_config("topk", 64, 512, k=8).k_aux == 32
    assert make_config("topk", 64, 16, k=8).k_aux == 16  # capped at d_sae


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"k": 200}, "k=200"),
        ({"k": 0}, "k=0"),
        ({"k": 4, "k_aux": 500}, "k_aux=500"),
        ({"k": 4, "aux_coefficient": -1.0}, "-1.0"),
    ],
)
def test_invalid_config_names_the_value(options, message):
    with pytest.raises(ValueError, match=message):
        make_config("topk", 32, 128, **options)


def test_k_above_d_sae_names_the_limit():
    with pytest.raises(ValueError, match=r"d_sae=128"):
        TopKConfig(kind="topk", d_in=32, d_sae=128, k=129)


@pytest.mark.parametrize("d_sae", [0, -4])
def test_non_positive_d_sae_rejected(d_sae):
    with pytest.raises(ValueError, match=f"got {d_sae}"):
        make_config("topk", 32, d_sae, k=1)


def test_wrong_kind_for_config_class():
    with pytest.raises(ValueError, match="'relu'"):
        TopKConfig(kind="relu", d_in=8, d_sae=16, k=2)
