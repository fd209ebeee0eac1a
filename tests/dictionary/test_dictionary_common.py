"""What every dictionary kind shares: registry, save/load, differentiability, unit directions."""

from __future__ import annotations

import json

import pytest
import torch

from mmono_features.dictionary import (
    BatchTopKConfig,
    Dictionary,
    DictionaryConfig,
    MatryoshkaConfig,
    NCLConfig,
    ReLUConfig,
    TopKConfig,
    TrainConfig,
    get_dictionary_class,
    list_kinds,
    load_dictionary,
    make_config,
    train_dictionary,
)

KINDS = ["topk", "relu", "batchtopk", "matryoshka", "ncl"]
OPTIONS = {"topk": {"k": 4}, "batchtopk": {"k": 4}, "matryoshka": {"k": 4}, "relu": {}, "ncl": {}}


def test_registry_lists_the_five_kinds():
    # Other test modules register test-only kinds in the same process, so only the
    # shipped kinds are checked here.
    assert set(KINDS) <= set(list_kinds())
    with pytest.raises(ValueError, match="valid kinds"):
        get_dictionary_class("sparse-pca")


@pytest.mark.parametrize(
    ("kind", "config_class"),
    [("topk", TopKConfig), ("relu", ReLUConfig), ("batchtopk", BatchTopKConfig), ("matryoshka", MatryoshkaConfig), ("ncl", NCLConfig)],
)
def test_make_config_picks_the_class(kind, config_class):
    config = make_config(kind, 16, 32, seed=2, center=True, backbone={"name": "mmono-tiny"}, **OPTIONS[kind])
    assert type(config) is config_class
    assert (config.kind, config.d_in, config.d_sae, config.seed, config.center) == (kind, 16, 32, 2, True)
    assert get_dictionary_class(kind).config_class is config_class


def test_make_config_rejects_options_of_another_kind():
    with pytest.raises(ValueError, match=r"\['l1_coefficient'\].*valid options"):
        make_config("topk", 16, 32, l1_coefficient=1.0)


@pytest.fixture(scope="module")
def small_trained(planted_maker):
    planted = planted_maker(n=600, noise=0.05)
    trained = {}
    for kind in KINDS:
        config = make_config(kind, 32, 48, seed=1, center=kind == "topk", backbone={"name": "test"}, **OPTIONS[kind])
        train_config = TrainConfig(n_steps=8, batch_size=64, lr=1e-2, warmup_steps=2, log_every=0, device="cpu", seed=1)
        trained[kind] = train_dictionary((planted.image, planted.text), config, train_config).dictionary
    return planted, trained


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_reproduces_codes_exactly(small_trained, tmp_path, kind):
    planted, trained = small_trained
    dictionary = trained[kind]
    dictionary.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["kind"] == kind
    assert saved["backbone"] == {"name": "test"}
    reloaded = load_dictionary(tmp_path)
    assert type(reloaded) is type(dictionary)
    assert reloaded.config == dictionary.config
    for modality, raw in (("image", planted.image[:50]), ("text", planted.text[:50])):
        z = dictionary.prepare(raw, modality)
        assert torch.equal(reloaded.prepare(raw, modality), z)
        assert torch.equal(reloaded.encode(z), dictionary.encode(z))
        assert torch.equal(reloaded.decode(dictionary.encode(z)), dictionary.decode(dictionary.encode(z)))
    assert torch.equal(reloaded.decoder_directions(), dictionary.decoder_directions())


def test_center_means_are_stored(small_trained):
    planted, trained = small_trained
    dictionary = trained["topk"]
    assert dictionary.config.center
    image_mean = planted.image / planted.image.norm(dim=1, keepdim=True)
    # The means come from the training split (95% of the pairs), so they are close to,
    # not equal to, the mean over all pairs.
    torch.testing.assert_close(dictionary.image_center, image_mean.mean(dim=0), atol=0.02, rtol=0)
    assert not torch.equal(dictionary.image_center, dictionary.text_center)


@pytest.mark.parametrize("kind", KINDS)
def test_encode_decode_differentiable(small_trained, kind):
    planted, trained = small_trained
    dictionary = trained[kind]
    z = dictionary.prepare(planted.image[:16], "image").requires_grad_(True)
    latents = dictionary.encode(z)
    assert latents.shape == (16, 48)
    assert bool((latents >= 0).all())
    dictionary.decode(latents).pow(2).sum().backward()
    assert z.grad is not None and float(z.grad.abs().sum()) > 0


@pytest.mark.parametrize("kind", KINDS)
def test_decoder_directions_are_unit_rows(small_trained, kind):
    _, trained = small_trained
    directions = trained[kind].decoder_directions()
    assert directions.shape == (48, 32)
    torch.testing.assert_close(directions.norm(dim=1), torch.ones(48), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_bad_input_shape_rejected(small_trained, kind):
    _, trained = small_trained
    with pytest.raises(ValueError, match=r"\(batch, 32\)"):
        trained[kind].encode(torch.zeros(3, 31))
    with pytest.raises(ValueError, match=r"\(batch, 48\)"):
        trained[kind].decode(torch.zeros(3, 47))


def test_base_config_is_not_a_kind_config():
    with pytest.raises(ValueError, match="TopKConfig"):
        get_dictionary_class("topk")(DictionaryConfig(kind="topk", d_in=4, d_sae=8))
    assert issubclass(get_dictionary_class("ncl"), Dictionary)


@pytest.mark.parametrize("kind", ["topk", "relu", "batchtopk", "matryoshka"])
def test_sae_decoder_rows_unit_norm_after_training(small_trained, kind):
    _, trained = small_trained
    norms = trained[kind].W_dec.detach().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(48), atol=1e-5, rtol=0)
