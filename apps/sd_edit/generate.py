"""Generating before/after images with steered ``prompt_embeds``, and the whole edit run.

Every image of a sweep is drawn with a fresh CPU ``torch.Generator`` seeded with the same
seed, so images differ only by the edit. Strength 0 leaves ``prompt_embeds`` untouched, so
it reproduces the unedited image pixel for pixel.

:func:`run_edit` is the flow behind ``mmono edit``:

1. load the pipeline, the open_clip model and the dictionary;
2. check that they belong together (:mod:`apps.sd_edit.consistency`);
3. select the features (ids, names from the scores table, or a group);
4. encode the prompt once and generate one image per strength;
5. measure CLIP scores and the edited latents' activations on each image;
6. write the images, a labelled grid and ``edit.json``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from apps.sd_edit.consistency import eot_positions, tokenize_for_pipeline
from apps.sd_edit.steering import SteeringConfig, SteeringSpace, check_prompt_embeds, steer_prompt_embeds

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling settings shared by every image of a sweep.

    Attributes
    ----------
    num_inference_steps : int
        Denoising steps.
    guidance_scale : float
        Classifier-free guidance scale; at most 1 switches guidance (and the negative
        prompt) off, as in diffusers.
    seed : int
        Seed of the fresh CPU generator of every image.
    height, width : int or None
        Image size in pixels; None uses the pipeline's default.
    """

    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    seed: int = 0
    height: int | None = None
    width: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.num_inference_steps, int) or self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer; got {self.num_inference_steps!r}.")
        if not math.isfinite(float(self.guidance_scale)) or self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0; got {self.guidance_scale!r}.")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 8 or value % 8):
                raise ValueError(f"{name} must be a positive multiple of 8 pixels (or None for the pipeline's default); got {value!r}.")


@dataclass
class EncodedPrompt:
    """A prompt encoded by the pipeline, ready for steering.

    Attributes
    ----------
    prompt_embeds : Tensor, shape (1, seq_len, width)
    negative_prompt_embeds : Tensor of shape (1, seq_len, width), or None without guidance
    eot : LongTensor, shape (1,)
        End-of-text position of the prompt.
    """

    prompt: str
    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None
    eot: torch.Tensor


def uses_guidance(pipeline: Any, guidance_scale: float) -> bool:
    """Whether diffusers will run classifier-free guidance at ``guidance_scale``."""
    return guidance_scale > 1 and getattr(pipeline.unet.config, "time_cond_proj_dim", None) is None


def encode_prompt(
    pipeline: Any,
    prompt: str,
    negative_prompt: str | None = None,
    guidance_scale: float = 7.5,
    negative_prompt_embeds: torch.Tensor | None = None,
) -> EncodedPrompt:
    """Encode ``prompt`` (and the negative prompt) as the pipeline would.

    Parameters
    ----------
    pipeline : diffusers.StableDiffusionPipeline
    prompt : str
    negative_prompt : str, optional
        Ignored without guidance; mutually exclusive with ``negative_prompt_embeds``.
    guidance_scale : float
    negative_prompt_embeds : Tensor, shape (1, seq_len, width), optional
        Precomputed negative embeddings, checked for shape and dtype.

    Returns
    -------
    EncodedPrompt
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty string; got {prompt!r}.")
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("pass negative_prompt or negative_prompt_embeds, not both.")
    seq_len, width, dtype = text_shape(pipeline)
    if negative_prompt_embeds is not None:
        check_prompt_embeds(negative_prompt_embeds, seq_len, width, dtype, "negative_prompt_embeds")
        negative_prompt_embeds = negative_prompt_embeds.to(pipeline.device)
    guidance = uses_guidance(pipeline, guidance_scale)
    with torch.no_grad():
        prompt_embeds, negative = pipeline.encode_prompt(
            prompt,
            pipeline.device,
            1,
            guidance,
            negative_prompt=negative_prompt,
            negative_prompt_embeds=negative_prompt_embeds,
        )
    eot = eot_positions(tokenize_for_pipeline(pipeline, [prompt]), int(pipeline.tokenizer.eos_token_id))
    return EncodedPrompt(prompt=prompt, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative if guidance else None, eot=eot)


def text_shape(pipeline: Any) -> tuple[int, int, torch.dtype]:
    """Return ``(seq_len, width, dtype)`` of the pipeline's ``prompt_embeds``."""
    return int(pipeline.tokenizer.model_max_length), int(pipeline.text_encoder.config.hidden_size), pipeline.text_encoder.dtype


def generate_image(
    pipeline: Any,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor | None = None,
    config: GenerationConfig | None = None,
):
    """Generate one image from ``prompt_embeds`` with a fresh CPU generator.

    Parameters
    ----------
    pipeline : diffusers.StableDiffusionPipeline
    prompt_embeds : Tensor, shape (1, seq_len, width)
        In the text encoder's dtype.
    negative_prompt_embeds : Tensor, shape (1, seq_len, width), optional
        None with guidance means the empty prompt, as in diffusers.
    config : GenerationConfig

    Returns
    -------
    image : PIL.Image.Image
    nsfw : bool or None
        The safety checker's verdict (None when the pipeline has none).
    """
    config = config or GenerationConfig()
    seq_len, width, dtype = text_shape(pipeline)
    check_prompt_embeds(prompt_embeds, seq_len, width, dtype)
    if negative_prompt_embeds is not None:
        check_prompt_embeds(negative_prompt_embeds, seq_len, width, dtype, "negative_prompt_embeds")
        if negative_prompt_embeds.shape != prompt_embeds.shape:
            raise ValueError(
                f"negative_prompt_embeds must have the shape of prompt_embeds {tuple(prompt_embeds.shape)}; "
                f"got {tuple(negative_prompt_embeds.shape)}."
            )
    # A CPU generator gives the same initial noise on every device.
    generator = torch.Generator("cpu").manual_seed(config.seed)
    with torch.no_grad():
        output = pipeline(
            prompt_embeds=prompt_embeds.to(pipeline.device),
            negative_prompt_embeds=None if negative_prompt_embeds is None else negative_prompt_embeds.to(pipeline.device),
            num_inference_steps=config.num_inference_steps,
            guidance_scale=config.guidance_scale,
            height=config.height,
            width=config.width,
            generator=generator,
            output_type="pil",
        )
    flags = getattr(output, "nsfw_content_detected", None)
    nsfw = None if flags is None else bool(flags[0])
    if nsfw:
        logger.warning("the safety checker flagged an image (seed %d); diffusers returned it blacked out.", config.seed)
    return output.images[0], nsfw


@dataclass
class SweepImage:
    """One image of a strength sweep.

    Attributes
    ----------
    strength : float
    image : PIL.Image.Image
    nsfw : bool or None
    delta_norm : float
        L2 norm of the hidden-space change added at each steered token (0 for strength 0).
    prompt_embeds : Tensor, shape (1, seq_len, width)
        The (steered) conditioning the image was drawn from, on the CPU.
    """

    strength: float
    image: Any
    nsfw: bool | None
    delta_norm: float
    prompt_embeds: torch.Tensor


def sweep(
    pipeline: Any,
    encoded: EncodedPrompt,
    space: SteeringSpace,
    dictionary: Any,
    steering: SteeringConfig,
    strengths: Sequence[float],
    config: GenerationConfig | None = None,
) -> list[SweepImage]:
    """Generate one image per strength, all from the same seed.

    Returns
    -------
    list of SweepImage
        In the order of ``strengths``.
    """
    from mmono_features.progress import progress

    config = config or GenerationConfig()
    if not strengths:
        raise ValueError("strengths must hold at least one value (e.g. 0,1,2,4).")
    results = []
    for strength in progress(list(strengths), total=len(strengths), desc="sd edit", unit="image"):
        steered, delta = steer_prompt_embeds(encoded.prompt_embeds, encoded.eot, space, dictionary, steering, float(strength))
        image, nsfw = generate_image(pipeline, steered, encoded.negative_prompt_embeds, config)
        norm = float(delta.norm(dim=-1).max())
        logger.info("strength %g: hidden change norm %.4g", strength, norm)
        results.append(SweepImage(strength=float(strength), image=image, nsfw=nsfw, delta_norm=norm, prompt_embeds=steered.detach().cpu()))
    return results


def image_grid(images: Sequence[Any], labels: Sequence[str] | None = None, columns: int | None = None, min_cell: int = 128):
    """Lay images out in a labelled grid.

    Parameters
    ----------
    images : sequence of PIL.Image.Image
        Same size each.
    labels : sequence of str, optional
        One caption per image, drawn under it.
    columns : int, optional
        Defaults to one row.
    min_cell : int
        Smaller images are enlarged (nearest neighbour) to at least this side so that
        labels stay readable.

    Returns
    -------
    PIL.Image.Image (RGB)
    """
    from PIL import Image, ImageDraw

    if not images:
        raise ValueError("image_grid needs at least one image.")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"labels must have one entry per image ({len(images)}); got {len(labels)}.")
    columns = columns or len(images)
    width, height = images[0].size
    factor = max(1, math.ceil(min_cell / max(1, min(width, height))))
    cell_w, cell_h = width * factor, height * factor
    label_h = 18 if labels is not None else 0
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * cell_w, rows * (cell_h + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for index, image in enumerate(images):
        if image.size != (width, height):
            raise ValueError(f"image {index} has size {image.size}, the first has {(width, height)}; grid cells must match.")
        x, y = (index % columns) * cell_w, (index // columns) * (cell_h + label_h)
        grid.paste(image.convert("RGB").resize((cell_w, cell_h), Image.NEAREST), (x, y))
        if labels is not None:
            draw.text((x + 4, y + cell_h + 3), str(labels[index]), fill="black")
    return grid


@dataclass(frozen=True)
class EditConfig:
    """Everything ``mmono edit`` needs; see :func:`run_edit`.

    Attributes
    ----------
    prompt : str
    features : tuple of str
        Latent ids or feature names (repeatable ``--feature``).
    strengths : tuple of float
        Strengths of the sweep; 0 (the unedited image) is put first when missing.
    pipeline : str
        Hub id or local folder.
    model, pretrained, checkpoint : str
        The open_clip model the dictionary was trained on.
    dictionary : str
        Dictionary folder.
    out : str
        Output folder.
    scores : str, optional
        Scores table (needed for names and groups).
    group : str, optional
    mode : {"add", "suppress"}
    token_position : {"eot", "after-eot", "all"}
    negative_prompt : str, optional
    generation : GenerationConfig
    scheduler : str, optional
    device, dtype : str
    safety_checker : bool
    probe : str
        Prompt of the text tower check.
    """

    prompt: str
    dictionary: str
    out: str
    features: tuple[str, ...] = ()
    strengths: tuple[float, ...] = (2.0,)
    pipeline: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    model: str = "ViT-L-14"
    pretrained: str | None = "openai"
    checkpoint: str | None = None
    scores: str | None = None
    group: str | None = None
    mode: str = "add"
    token_position: str = "eot"
    negative_prompt: str | None = None
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    scheduler: str | None = None
    device: str = "auto"
    dtype: str = "fp32"
    safety_checker: bool = True
    probe: str | None = None

    def __post_init__(self) -> None:
        from apps.sd_edit.steering import GROUP_NAMES, MODES, TOKEN_POSITIONS

        # Checked here, before any model is loaded.
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {self.mode!r}.")
        if self.token_position not in TOKEN_POSITIONS:
            raise ValueError(f"token_position must be one of {TOKEN_POSITIONS} (--token-position); got {self.token_position!r}.")
        if self.group is not None and self.group not in GROUP_NAMES:
            raise ValueError(f"group must be one of {GROUP_NAMES} (--group); got {self.group!r}.")
        if not self.features and self.group is None:
            raise ValueError("no feature selected: pass --feature NAME_OR_ID (repeatable) or --group ImgD|TextD|CrossD.")
        if (self.group is not None or any(not str(f).strip().isdigit() for f in self.features)) and self.scores is None:
            raise ValueError("feature names and --group need the scores table: pass --scores FILE, or give latent ids.")
        strengths = tuple(float(s) for s in self.strengths)
        if not strengths or not all(math.isfinite(s) for s in strengths):
            raise ValueError(f"strengths must be finite numbers; got {self.strengths!r}.")
        if self.mode == "suppress" and not all(0.0 <= s <= 1.0 for s in strengths):
            raise ValueError(f"with suppression each strength is the fraction removed, in [0, 1]; got {strengths}.")
        if 0.0 not in strengths:
            strengths = (0.0,) + strengths
        object.__setattr__(self, "strengths", strengths)
        object.__setattr__(self, "features", tuple(str(f) for f in self.features))


def _prompt_activations(encoded: EncodedPrompt, space: SteeringSpace, dictionary: Any, latents: Sequence[int]) -> dict[str, float]:
    """Activation of each latent on the prompt's joint embedding (its EOT hidden state projected)."""
    hidden = encoded.prompt_embeds.detach()[torch.arange(encoded.eot.shape[0]), encoded.eot.to(encoded.prompt_embeds.device)]
    with torch.no_grad():
        z = dictionary.prepare(space.to_joint(hidden), "text")
        activations = dictionary.encode(z)[0, list(latents)].float().cpu()
    return {str(j): float(value) for j, value in zip(latents, activations)}


def run_edit(config: EditConfig) -> dict[str, Any]:
    """Run a whole edit: load, check, steer, generate, measure and write.

    Writes into ``config.out``: ``strength-<s>.png`` per strength, ``grid.png`` (labelled
    with the strengths) and ``edit.json`` (settings, identities, the consistency check,
    the selected features and one record per image).

    Returns
    -------
    dict
        The content of ``edit.json``.
    """
    from mmono_features.backbone import load_backbone
    from mmono_features.dictionary import load_dictionary

    from apps.sd_edit.consistency import PROBE_PROMPT, check_dictionary_backbone, check_text_tower
    from apps.sd_edit.measure import measure_images
    from apps.sd_edit.pipeline import PipelineConfig, load_pipeline, pipeline_identity
    from apps.sd_edit.steering import select_features

    out = Path(config.out)

    # 1. Load the three parts.
    pipeline = load_pipeline(
        PipelineConfig(
            source=config.pipeline,
            device=config.device,
            dtype=config.dtype,
            scheduler=config.scheduler,
            safety_checker=config.safety_checker,
        )
    )
    backbone = load_backbone(config.model, pretrained=config.pretrained, checkpoint=config.checkpoint, device=str(pipeline.device))
    dictionary = load_dictionary(config.dictionary, device="cpu")

    # 2. Refuse parts that do not belong together.
    check_dictionary_backbone(dictionary, backbone)
    tower = check_text_tower(pipeline, backbone, probe=config.probe or PROBE_PROMPT)

    # 3. Select the features.
    scores = None
    if config.scores is not None:
        from mmono_features.modality import Scores

        scores = Scores.load(config.scores)
        scores.check_dictionary(dictionary)
    selected = select_features(config.features, scores=scores, group=config.group, d_sae=dictionary.d_sae)
    if len(selected) > 16 and config.mode == "add":
        logger.warning("amplifying %d latents at once: their directions add up, so keep the strength small.", len(selected))
    steering = SteeringConfig(latents=tuple(f.latent for f in selected), mode=config.mode, token_position=config.token_position)
    space = SteeringSpace.from_model(backbone.model)

    # 4. Encode once and generate one image per strength.
    encoded = encode_prompt(pipeline, config.prompt, negative_prompt=config.negative_prompt, guidance_scale=config.generation.guidance_scale)
    prompt_activations = _prompt_activations(encoded, space, dictionary, steering.latents)
    if config.mode == "suppress" and not any(value > 0 for value in prompt_activations.values()):
        logger.warning("none of the %d selected latents is active on the prompt: suppression changes nothing.", len(selected))
    images = sweep(pipeline, encoded, space, dictionary, steering, config.strengths, config.generation)

    # 5. Measure.
    feature_texts = [f.name for f in selected if f.name]
    measurements = measure_images(
        backbone, dictionary, [item.image for item in images], config.prompt, feature_texts, list(steering.latents)
    )

    # 6. Write.
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for item, measured in zip(images, measurements):
        filename = f"strength-{item.strength:g}.png"
        item.image.save(out / filename)
        changed = (item.prompt_embeds != encoded.prompt_embeds.cpu()).any(dim=-1)[0].nonzero().flatten().tolist()
        records.append(
            {
                "strength": item.strength,
                "file": filename,
                "nsfw": item.nsfw,
                "hidden_change_norm": item.delta_norm,
                "changed_tokens": changed,
                **measured,
            }
        )
    verb = "suppress " if config.mode == "suppress" else "+"
    labels = ["before" if item.strength == 0 else f"{verb}{item.strength:g}" for item in images]
    grid = image_grid([item.image for item in images], labels)
    grid.save(out / "grid.png")
    summary = {
        "prompt": config.prompt,
        "negative_prompt": config.negative_prompt,
        "features": [f.to_dict() for f in selected],
        "mode": config.mode,
        "token_position": config.token_position,
        "strength_units": (
            "activation added to each latent in the dictionary's normalised space (norm sqrt(embed_dim))"
            if config.mode == "add"
            else "fraction of each latent's activation removed"
        ),
        "strengths": list(config.strengths),
        "eot_position": int(encoded.eot[0]),
        "prompt_activations": prompt_activations,
        "generation": asdict(config.generation),
        "pipeline": pipeline_identity(pipeline, config.pipeline),
        "backbone": backbone.identity(),
        "dictionary": {"path": str(config.dictionary), **dictionary.config.to_dict()},
        "scores": config.scores,
        "group": config.group,
        "text_tower_check": tower.to_dict(),
        "text_projection_condition_number": space.condition_number,
        "images": records,
        "grid": "grid.png",
    }
    (out / "edit.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    logger.info("wrote %d images, grid.png and edit.json to %s", len(images), out)
    return summary
