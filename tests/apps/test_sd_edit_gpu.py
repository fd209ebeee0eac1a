"""Real SD 1.5 with OpenAI ViT-L-14 on a GPU (marked gpu and slow; weights must be cached)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


@pytest.fixture(scope="module")
def sd15():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from mmono_features.backbone import BackboneLoadError, load_backbone

    from apps.sd_edit.pipeline import PipelineConfig, PipelineLoadError, load_pipeline

    try:
        pipe = load_pipeline(PipelineConfig(device="cuda", dtype="fp16"))
        backbone = load_backbone("ViT-L-14", pretrained="openai", device="cuda")
    except (PipelineLoadError, BackboneLoadError) as error:
        pytest.skip(f"SD 1.5 or ViT-L-14/openai weights are not cached: {error}")
    return pipe, backbone


def test_sd15_text_encoder_is_vit_l14_text_tower(sd15):
    from apps.sd_edit.consistency import check_text_tower

    pipe, backbone = sd15
    result = check_text_tower(pipe, backbone)
    assert result.cosine > 0.999


def test_sd15_steering_keeps_fp16_shape(sd15):
    from apps.sd_edit.generate import encode_prompt
    from apps.sd_edit.steering import SteeringConfig, SteeringSpace, steer_prompt_embeds
    from mmono_features.dictionary.topk import TopKConfig, TopKSAE

    pipe, backbone = sd15
    dictionary = TopKSAE(TopKConfig(kind="topk", d_in=backbone.embed_dim, d_sae=256, k=16, backbone=backbone.identity())).eval()
    space = SteeringSpace.from_model(backbone.model)
    encoded = encode_prompt(pipe, "a photo of a house by a lake")
    steered, _ = steer_prompt_embeds(encoded.prompt_embeds, encoded.eot, space, dictionary, SteeringConfig(latents=(3,)), 2.0)
    assert steered.shape == (1, 77, 768)
    assert steered.dtype == torch.float16
    assert steered.device.type == "cuda"
    changed = (steered != encoded.prompt_embeds).any(dim=-1)[0].nonzero().flatten().tolist()
    assert changed == [int(encoded.eot[0])]
