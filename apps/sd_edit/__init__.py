"""Stable Diffusion editing by steering the prompt along sparse dictionary features.

The dictionary must be trained on the open_clip model whose text tower the pipeline uses
(ViT-L-14 / openai for SD 1.x); :mod:`apps.sd_edit.consistency` checks this and refuses a
mismatch. Imports are lazy: diffusers and transformers load only when a function needs them.
"""

from apps.sd_edit.consistency import ConsistencyError, check_dictionary_backbone, check_text_tower
from apps.sd_edit.generate import EditConfig, GenerationConfig, encode_prompt, generate_image, image_grid, run_edit, sweep
from apps.sd_edit.pipeline import PipelineConfig, PipelineLoadError, load_pipeline
from apps.sd_edit.steering import SteeringConfig, SteeringSpace, select_features, steer_prompt_embeds

__all__ = [
    "ConsistencyError",
    "EditConfig",
    "GenerationConfig",
    "PipelineConfig",
    "PipelineLoadError",
    "SteeringConfig",
    "SteeringSpace",
    "check_dictionary_backbone",
    "check_text_tower",
    "encode_prompt",
    "generate_image",
    "image_grid",
    "load_pipeline",
    "run_edit",
    "select_features",
    "steer_prompt_embeds",
    "sweep",
]
