"""NCL head: non-negative codes, retrieval, per-modality heads, the least-squares decoder."""

from __future__ import annotations

import pytest
import torch

from mmono_features.dictionary import NCLHead, TrainConfig, make_config, train_dictionary


def test_codes_non_negative_and_retrieval_above_chance(trained_planted):
    planted, _, result = trained_planted("ncl")
    dictionary = result.dictionary
    latents = dictionary.encode(dictionary.prepare(planted.image[:500], "image"))
    assert bool((latents >= 0).all())
    retrieval = result.history[-1]["retrieval"]
    # Measured 1.0 both ways over 409 held-out pairs (chance 1/409).
    assert retrieval["image_to_text"] > 0.8
    assert retrieval["text_to_image"] > 0.8


def test_recovers_planted_atoms_through_the_fitted_decoder(trained_planted, atom_recovery):
    planted, _, result = trained_planted("ncl")
    # Measured 0.95 (61 of 64 atoms at cosine > 0.9) after 400 steps; an untrained
    # head with a fitted decoder reaches 0.08 (checked below).
    assert atom_recovery(result.dictionary.decoder_directions(), planted.atoms) >= 0.85
    untrained = NCLHead(result.dictionary.config)
    z = untrained.prepare(planted.image[:4096], "image")
    untrained.fit_decoder([(z, "image")])
    assert atom_recovery(untrained.decoder_directions(), planted.atoms) < 0.3


def test_fitted_decoder_reconstructs(trained_planted):
    _, _, result = trained_planted("ncl")
    assert result.history[-1]["all"]["fvu"] < 0.3
    directions = result.dictionary.decoder_directions()
    torch.testing.assert_close(directions.norm(dim=1), torch.ones(directions.shape[0]), atol=1e-5, rtol=0)


def test_fit_decoder_known_answer():
    # Codes are an exact linear image of z on the data, so least squares finds it.
    head = NCLHead(make_config("ncl", 3, 6, ridge=0.0, seed=0))
    with torch.no_grad():
        head.W_enc.copy_(torch.cat([torch.eye(3), -torch.eye(3)]))
        head.b_enc.zero_()
    z = torch.randn(200, 3, generator=torch.Generator().manual_seed(0))
    head.fit_decoder([(z[:100], "image"), (z[100:], "text")])
    torch.testing.assert_close(head.decode(head.encode(z)), z, atol=1e-4, rtol=1e-4)


def test_per_modality_heads_need_the_modality():
    head = NCLHead(make_config("ncl", 4, 8, shared_head=False))
    z = torch.randn(3, 4)
    with pytest.raises(ValueError, match="modality"):
        head.encode(z)
    image_codes, text_codes = head.encode(z, "image"), head.encode_text(z)
    assert not torch.equal(image_codes, text_codes)
    with pytest.raises(ValueError, match="'audio'"):
        head.encode(z, "audio")
    shared = NCLHead(make_config("ncl", 4, 8))
    assert torch.equal(shared.encode(z), shared.encode(z, "text"))


def test_per_modality_heads_train_and_report(planted_maker):
    planted = planted_maker(n=1024, noise=0.05)
    config = make_config("ncl", 32, 32, shared_head=False)
    train_config = TrainConfig(n_steps=30, batch_size=128, lr=3e-3, warmup_steps=5, log_every=0, device="cpu")
    result = train_dictionary((planted.image, planted.text), config, train_config)
    entry = result.history[-1]
    assert set(entry["retrieval"]) == {"image_to_text", "text_to_image"}
    assert entry["retrieval"]["image_to_text"] > 1.0 / 51


def test_needs_paired_tensors(planted_maker):
    planted = planted_maker(n=300)
    with pytest.raises(ValueError, match="same number of rows"):
        train_dictionary((planted.image, planted.text[:200]), make_config("ncl", 32, 16), TrainConfig(n_steps=2, device="cpu"))


def test_invalid_temperature_rejected():
    with pytest.raises(ValueError, match="5.0"):
        make_config("ncl", 8, 16, temperature=5.0)
