from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

from mmono_features.backbone import (
    BackboneLoadError,
    list_backbones,
    load_backbone,
    resolve_device,
    resolve_precision,
)


def test_tiny_backbone_shapes(tiny_backbone):
    assert tiny_backbone.embed_dim == 64
    assert tiny_backbone.image_size == 32
    assert tiny_backbone.context_length == 77
    images = tiny_backbone.encode_images(torch.rand(3, 3, 32, 32))
    texts = tiny_backbone.encode_texts(["a cat", "a dog", "a red square"])
    assert images.shape == (3, 64)
    assert texts.shape == (3, 64)
    assert images.dtype == torch.float32


def test_backbone_eval_and_frozen(tiny_backbone):
    assert not tiny_backbone.model.training
    assert all(not p.requires_grad for p in tiny_backbone.model.parameters())


def test_tiny_seed_is_deterministic():
    a = load_backbone("mmono-tiny", device="cpu", seed=3)
    b = load_backbone("mmono-tiny", device="cpu", seed=3)
    c = load_backbone("mmono-tiny", device="cpu", seed=4)
    pixels = torch.rand(2, 3, 32, 32)
    assert torch.equal(a.encode_images(pixels), b.encode_images(pixels))
    assert not torch.equal(a.encode_images(pixels), c.encode_images(pixels))


def test_loading_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_backbone("mmono-tiny", device="cpu")
    assert torch.equal(torch.rand(3), expected)


def test_truncation_warning_counts(caplog):
    backbone = load_backbone("mmono-tiny", device="cpu")
    long_caption = "word " * 100
    with caplog.at_level(logging.WARNING, logger="mmono_features.backbone"):
        tokens = backbone.tokenize(["short", long_caption, long_caption])
        backbone.tokenize([long_caption])
    assert tokens.shape == (3, 77)
    assert "2 of 3 captions" in caplog.text
    # Later truncations are counted, not repeated as warnings.
    assert "1 of 1 captions" not in caplog.text
    assert backbone.truncated_captions == 3


def test_preprocess_mean_std(tiny_backbone):
    assert len(tiny_backbone.image_mean) == 3
    assert tiny_backbone.image_std[0] > 0


def test_local_checkpoint_round_trip(tmp_path, tiny_backbone):
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_backbone.model.state_dict().items()}, str(path))
    # mmono-tiny's architecture registered in open_clip loads through the local-file path.
    reloaded = load_backbone("mmono-tiny", device="cpu", seed=99)
    assert reloaded.checkpoint_sha256 == "random-init-seed-99"
    import open_clip

    open_clip.load_checkpoint(reloaded.model, str(path), weights_only=True)
    pixels = torch.rand(2, 3, 32, 32)
    assert torch.allclose(reloaded.encode_images(pixels), tiny_backbone.encode_images(pixels))


def test_open_clip_model_from_local_file(tmp_path):
    import open_clip

    model = open_clip.create_model("RN50", pretrained=None)
    path = tmp_path / "rn50.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    backbone = load_backbone("RN50", checkpoint=path, device="cpu")
    assert backbone.pretrained is None
    assert len(backbone.checkpoint_sha256) == 64
    assert backbone.identity()["name"] == "RN50"


def test_bad_checkpoint_message_names_model(tmp_path):
    path = tmp_path / "wrong.safetensors"
    save_file({"nonsense": torch.zeros(2)}, str(path))
    with pytest.raises(BackboneLoadError, match="RN50"):
        load_backbone("RN50", checkpoint=path, device="cpu")


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_backbone("RN50", checkpoint=tmp_path / "absent.pt", device="cpu")


def test_unknown_model_lists_choices():
    with pytest.raises(ValueError, match="mmono-tiny"):
        load_backbone("ViT-Nonsense", device="cpu")


def test_unknown_tag_lists_tags():
    with pytest.raises(ValueError, match="laion2b_s34b_b79k"):
        load_backbone("ViT-B-32", pretrained="no-such-tag", device="cpu")


def test_half_precision_rejected_on_cpu():
    with pytest.raises(ValueError, match="fp32"):
        resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(ValueError, match="bf16"):
        load_backbone("mmono-tiny", device="cpu", precision="bf16")


def test_device_validation():
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="tpu"):
        resolve_device("tpu")


def test_registry_lists_project_models():
    names = list_backbones()
    assert "mmono-tiny" in names
    assert "ViT-B-32" in names


def test_offline_download_error_says_how_to_fix():
    # conftest sets HF_HUB_OFFLINE=1, so the download fails at once, as it does for a
    # user without internet access and without a cached copy.
    with pytest.raises(BackboneLoadError) as info:
        load_backbone("ViT-B-32", pretrained="laion2b_s34b_b79k", device="cpu")
    message = str(info.value)
    assert "ViT-B-32" in message
    assert "laion2b_s34b_b79k" in message
    assert "--checkpoint" in message
