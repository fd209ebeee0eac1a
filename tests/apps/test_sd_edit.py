"""Stable Diffusion steering on a tiny pipeline whose text encoder is mmono-tiny's text tower."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from apps.sd_edit.consistency import (
    ConsistencyError,
    check_dictionary_backbone,
    check_text_tower,
    eot_positions,
    tokenize_for_pipeline,
)
from apps.sd_edit.generate import GenerationConfig, encode_prompt, generate_image, image_grid, sweep
from apps.sd_edit.measure import clip_scores, latent_activations, measure_images
from apps.sd_edit.pipeline import PipelineConfig, PipelineLoadError, load_pipeline
from apps.sd_edit.steering import (
    SteeringConfig,
    SteeringSpace,
    check_prompt_embeds,
    joint_delta,
    select_features,
    steer_prompt_embeds,
    token_mask,
)
from apps.sd_edit.testing import random_text_encoder, tiny_edit_setup

PROMPT = "a red cat on a beach"
FAST = GenerationConfig(num_inference_steps=2, guidance_scale=7.5, seed=0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_edit_setup(tmp_path_factory.getbasetemp() / "sd_edit_tiny")


@pytest.fixture(scope="module")
def pipe(setup):
    return load_pipeline(PipelineConfig(source=str(setup.pipeline_dir), device="cpu"))


@pytest.fixture(scope="module")
def space(setup):
    return SteeringSpace.from_model(setup.backbone.model)


@pytest.fixture(scope="module")
def encoded(pipe):
    return encode_prompt(pipe, PROMPT, guidance_scale=FAST.guidance_scale)


def _pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


# ---- consistency ----------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["a photo of a dog", "Two CATS, sleeping! on 3 chairs.", "tree"])
def test_tokenizer_ids_match_open_clip(setup, pipe, prompt):
    ids = tokenize_for_pipeline(pipe, [prompt])
    reference = setup.backbone.tokenize([prompt])
    eot = int(eot_positions(ids, pipe.tokenizer.eos_token_id)[0])
    assert eot == int(reference[0].argmax())
    assert ids[0, : eot + 1].tolist() == reference[0, : eot + 1].tolist()


def test_text_tower_check_passes(setup, pipe):
    result = check_text_tower(pipe, setup.backbone)
    assert result.cosine > 0.9999
    assert result.max_abs_diff < 1e-4
    check_dictionary_backbone(setup.dictionary, setup.backbone)


def test_other_text_encoder_rejected(setup, pipe):
    from diffusers import StableDiffusionPipeline

    other = StableDiffusionPipeline(**{**pipe.components, "text_encoder": random_text_encoder(pipe.text_encoder, seed=3)})
    with pytest.raises(ConsistencyError) as error:
        check_text_tower(other, setup.backbone)
    message = str(error.value)
    assert "mmono-tiny" in message
    assert "CLIPTextModel" in message
    assert "cosine" in message


def test_other_seed_backbone_rejected(setup, pipe):
    from mmono_features.backbone import load_backbone

    other = load_backbone("mmono-tiny", pretrained=None, device="cpu", seed=1)
    with pytest.raises(ConsistencyError, match="random-init-seed-1"):
        check_text_tower(pipe, other)
    with pytest.raises(ConsistencyError, match="random-init-seed-0.*random-init-seed-1"):
        check_dictionary_backbone(setup.dictionary, other)


def test_dictionary_without_identity_rejected(setup):
    from dataclasses import replace

    class _Fake:
        config = replace(setup.dictionary.config, backbone={})

    with pytest.raises(ConsistencyError, match="no backbone identity"):
        check_dictionary_backbone(_Fake(), setup.backbone)


# ---- steering -------------------------------------------------------------------------


def test_strength_zero_keeps_prompt_embeds(setup, encoded, space):
    steered, delta = steer_prompt_embeds(encoded.prompt_embeds, encoded.eot, space, setup.dictionary, SteeringConfig(latents=(1,)), 0.0)
    assert torch.equal(steered, encoded.prompt_embeds)
    assert float(delta.abs().max()) == 0.0


@pytest.mark.parametrize("position", ["eot", "after-eot", "all"])
def test_strength_changes_chosen_tokens_only(setup, encoded, space, position):
    config = SteeringConfig(latents=(1, 5), token_position=position)
    steered, delta = steer_prompt_embeds(encoded.prompt_embeds, encoded.eot, space, setup.dictionary, config, 2.0)
    assert steered.shape == encoded.prompt_embeds.shape
    assert steered.dtype == encoded.prompt_embeds.dtype
    changed = (steered != encoded.prompt_embeds).any(dim=-1)[0]
    expected = token_mask(encoded.eot, steered.shape[1], position)[0]
    assert torch.equal(changed, expected)
    torch.testing.assert_close(steered[0, expected] - encoded.prompt_embeds[0, expected], delta.expand(int(expected.sum()), -1))


def test_pseudo_inverse_round_trip(setup, encoded, space):
    eot = int(encoded.eot[0])
    hidden = encoded.prompt_embeds[:, eot]
    t = space.to_joint(hidden)
    config = SteeringConfig(latents=(7,))
    dt = joint_delta(setup.dictionary, t, config, 0.5)
    steered, delta = steer_prompt_embeds(encoded.prompt_embeds, encoded.eot, space, setup.dictionary, config, 0.5)
    achieved = space.to_joint(steered[:, eot]) - t
    torch.testing.assert_close(achieved, dt, atol=1e-3 * float(dt.norm()), rtol=1e-3)

    # In the dictionary's normalised space the change points along the latent's decoder
    # direction, less its component along z (the normalisation removes that).
    z = setup.dictionary.prepare(t, "text")
    moved = setup.dictionary.prepare(t + dt, "text") - z
    direction = setup.dictionary.decoder_directions().detach()[7]
    unit_z = z[0] / z[0].norm()
    tangent = direction - (direction @ unit_z) * unit_z
    assert float(torch.nn.functional.cosine_similarity(moved[0], tangent, dim=0)) > 0.99


def test_pseudo_inverse_known_answer():
    # width 3 -> embed_dim 2 with a known right inverse.
    projection = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    space = SteeringSpace(projection=projection, bias=None)
    torch.testing.assert_close(space.pinv, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.0]]))
    v = torch.tensor([[3.0, -4.0]])
    torch.testing.assert_close(space.to_hidden(v), torch.tensor([[3.0, -2.0, 0.0]]))
    torch.testing.assert_close(space.to_joint(space.to_hidden(v)), v)


def test_amplify_raises_latent(setup, encoded, space):
    eot = int(encoded.eot[0])
    dictionary = setup.dictionary
    t = space.to_joint(encoded.prompt_embeds[:, eot])
    before = dictionary.encode(dictionary.prepare(t, "text")).detach()
    latent = int(before[0].argmin())  # a silent latent
    steered, _ = steer_prompt_embeds(encoded.prompt_embeds, encoded.eot, space, dictionary, SteeringConfig(latents=(latent,)), 8.0)
    after = dictionary.encode(dictionary.prepare(space.to_joint(steered[:, eot]), "text")).detach()
    assert float(after[0, latent]) > float(before[0, latent]) + 1.0


def test_suppress_lowers_activation(setup, encoded, space):
    eot = int(encoded.eot[0])
    dictionary = setup.dictionary
    t = space.to_joint(encoded.prompt_embeds[:, eot])
    before = dictionary.encode(dictionary.prepare(t, "text")).detach()
    latent = int(before[0].argmax())
    config = SteeringConfig(latents=(latent,), mode="suppress")
    steered, _ = steer_prompt_embeds(encoded.prompt_embeds, encoded.eot, space, dictionary, config, 1.0)
    after = dictionary.encode(dictionary.prepare(space.to_joint(steered[:, eot]), "text")).detach()
    assert float(before[0, latent]) > 0
    assert float(after[0, latent]) < 0.5 * float(before[0, latent])
    with pytest.raises(ValueError, match="strength"):
        steer_prompt_embeds(encoded.prompt_embeds, encoded.eot, space, dictionary, config, 2.0)


@pytest.mark.parametrize(
    "shape, dtype",
    [((1, 76, 64), torch.float32), ((1, 77, 32), torch.float32), ((77, 64), torch.float32), ((1, 77, 64), torch.float64)],
)
def test_wrong_prompt_embeds_rejected(pipe, setup, encoded, space, shape, dtype):
    bad = torch.zeros(shape, dtype=dtype)
    with pytest.raises(ValueError, match=r"\(batch, 77, 64\)"):
        generate_image(pipe, bad, None, FAST)
    with pytest.raises(ValueError, match=r"\(batch, 77, 64\)"):
        check_prompt_embeds(bad, 77, 64, torch.float32)
    if len(shape) == 3 and shape[2] != 64:
        with pytest.raises(ValueError, match="64"):
            steer_prompt_embeds(bad, torch.tensor([3]), space, setup.dictionary, SteeringConfig(latents=(1,)), 1.0)
    with pytest.raises(ValueError, match="negative_prompt_embeds.*\\(batch, 77, 64\\)"):
        generate_image(pipe, encoded.prompt_embeds, bad, FAST)


def test_select_features_by_id_name_group(setup):
    scores = setup.scores
    table = scores.table
    name = table.loc[table["latent"] == 3, "name"].item()
    by_id = select_features(["3"], scores=scores, d_sae=setup.dictionary.d_sae)
    assert by_id[0].latent == 3
    assert by_id[0].name == name
    by_name = select_features([name.upper()], scores=scores, d_sae=setup.dictionary.d_sae)
    assert sorted(f.latent for f in by_name) == sorted(table.loc[table["name"] == name, "latent"].tolist())
    group = next(g for g in ("CrossD", "ImgD", "TextD") if len(scores.latents(g)))
    by_group = select_features([], scores=scores, group=group, d_sae=setup.dictionary.d_sae)
    assert [f.latent for f in by_group] == scores.latents(group).tolist()
    with pytest.raises(ValueError, match="no latent is named 'zebra'"):
        select_features(["zebra"], scores=scores)
    with pytest.raises(ValueError, match="d_sae=64"):
        select_features(["64"], scores=scores, d_sae=64)
    with pytest.raises(ValueError, match="--scores"):
        select_features(["cat"], scores=None)
    with pytest.raises(ValueError, match="no feature selected"):
        select_features([], scores=scores)


# ---- generation -----------------------------------------------------------------------


def test_strength_zero_pixel_identical(pipe, setup, encoded, space):
    unedited = pipe(PROMPT, num_inference_steps=2, guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(0)).images[0]
    images = sweep(pipe, encoded, space, setup.dictionary, SteeringConfig(latents=(1,)), [0.0, 4.0], FAST)
    assert np.array_equal(_pixels(images[0].image), _pixels(unedited))
    again, _ = generate_image(pipe, encoded.prompt_embeds, encoded.negative_prompt_embeds, FAST)
    assert np.array_equal(_pixels(again), _pixels(unedited))
    assert np.abs(_pixels(images[1].image) - _pixels(unedited)).max() > 0
    assert images[0].delta_norm == 0
    assert images[1].delta_norm > 0


def test_negative_prompt_matches_embeds(pipe):
    with_text = encode_prompt(pipe, PROMPT, negative_prompt="blurry dog", guidance_scale=7.5)
    plain = encode_prompt(pipe, PROMPT, guidance_scale=7.5)
    with_embeds = encode_prompt(pipe, PROMPT, guidance_scale=7.5, negative_prompt_embeds=with_text.negative_prompt_embeds)
    image_text, _ = generate_image(pipe, with_text.prompt_embeds, with_text.negative_prompt_embeds, FAST)
    image_embeds, _ = generate_image(pipe, with_embeds.prompt_embeds, with_embeds.negative_prompt_embeds, FAST)
    image_plain, _ = generate_image(pipe, plain.prompt_embeds, plain.negative_prompt_embeds, FAST)
    assert np.array_equal(_pixels(image_text), _pixels(image_embeds))
    assert not np.array_equal(_pixels(image_text), _pixels(image_plain))
    assert encode_prompt(pipe, PROMPT, negative_prompt="x", guidance_scale=1.0).negative_prompt_embeds is None


def test_image_grid_labelled_cells():
    from PIL import Image

    cells = [Image.new("RGB", (16, 16), colour) for colour in ("red", "green", "blue")]
    grid = image_grid(cells, ["+0", "+1", "+2"], min_cell=64)
    assert grid.size == (3 * 64, 64 + 18)
    assert grid.getpixel((10, 10)) == (255, 0, 0)
    assert grid.getpixel((64 + 10, 10)) == (0, 128, 0)
    with pytest.raises(ValueError, match="one entry per image"):
        image_grid(cells, ["+0"])


# ---- measurement ----------------------------------------------------------------------


def test_clip_score_known_answers():
    images = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    texts = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    expected = torch.tensor([[100.0, 100.0 / 2**0.5], [0.0, 100.0 / 2**0.5]])
    torch.testing.assert_close(clip_scores(images, texts), expected)


def test_measure_images_records(pipe, setup, encoded):
    image, _ = generate_image(pipe, encoded.prompt_embeds, encoded.negative_prompt_embeds, FAST)
    records = measure_images(setup.backbone, setup.dictionary, [image, image], PROMPT, ["cat"], [1, 2])
    assert len(records) == 2
    assert records[0] == records[1]
    assert set(records[0]) == {"clip_score_prompt", "clip_score_features", "activations"}
    assert -100 <= records[0]["clip_score_prompt"] <= 100
    z = setup.backbone.encode_images(torch.stack([setup.backbone.preprocess(image)]))
    expected = latent_activations(setup.dictionary, z, [1, 2])[0]
    assert records[0]["activations"] == pytest.approx({"1": float(expected[0]), "2": float(expected[1])})


# ---- loading --------------------------------------------------------------------------


def test_loading_errors_name_fix(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pipeline(PipelineConfig(source=str(tmp_path / "missing"), device="cpu"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PipelineLoadError, match=r"nobody/no-such-pipeline.*--pipeline DIR"):
        load_pipeline(PipelineConfig(source="nobody/no-such-pipeline", device="cpu"))
    with pytest.raises(ValueError, match="fp16.*CPU"):
        load_pipeline(PipelineConfig(source=str(tmp_path), device="cpu", dtype="fp16"))
    with pytest.raises(ValueError, match="scheduler must be one of"):
        PipelineConfig(scheduler="turbo")


def test_scheduler_and_safety_checker(setup, caplog):
    with caplog.at_level(logging.WARNING, logger="apps.sd_edit.pipeline"):
        pipe = load_pipeline(PipelineConfig(source=str(setup.pipeline_dir), device="cpu", scheduler="euler", safety_checker=False))
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe.safety_checker is None
    assert any("safety checker" in record.message and record.levelno == logging.WARNING for record in caplog.records)
