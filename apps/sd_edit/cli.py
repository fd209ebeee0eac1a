"""The ``mmono edit`` command: steer a Stable Diffusion prompt along dictionary features.

With SD 1.5 on a GPU, the dictionary comes from OpenAI ViT-L-14, whose text tower is SD
1.5's text encoder::

    mmono extract pairs.csv --out store-l14 --model ViT-L-14 --pretrained openai --device cuda
    mmono train store-l14 --out dict-l14 --kind topk --d-sae 16384 --k 32 --device cuda
    mmono score store-l14 dict-l14 --out scores-l14.csv --device cuda
    mmono edit --prompt "a photo of a house by a lake" --feature snow --sweep 0,2,4,8 \\
        --pipeline stable-diffusion-v1-5/stable-diffusion-v1-5 --model ViT-L-14 --pretrained openai \\
        --dictionary dict-l14 --scores scores-l14.csv --out edit-house --steps 30 --guidance 7.5 \\
        --seed 0 --scheduler dpm++ --device cuda --dtype fp16
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional

import typer

logger = logging.getLogger(__name__)


def _parse_strengths(strength: Optional[float], sweep: Optional[str], suppress: bool) -> tuple[float, ...]:
    if sweep:
        try:
            values = tuple(float(part) for part in sweep.split(",") if part.strip())
        except ValueError:
            raise ValueError(f"--sweep must be comma-separated numbers like 0,1,2,4; got {sweep!r}.") from None
        if not values:
            raise ValueError(f"--sweep must hold at least one number; got {sweep!r}.")
        return values
    if strength is None:
        strength = 1.0 if suppress else 2.0
    return (float(strength),)


def edit(
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text prompt of the image."),
    feature: Optional[List[str]] = typer.Option(None, "--feature", "-f", help="Latent id or feature name from --scores (repeatable)."),
    strength: Optional[float] = typer.Option(
        None, "--strength", help="Steering strength: activation added per latent (default 2), or with --suppress the fraction removed (default 1)."
    ),
    sweep: Optional[str] = typer.Option(None, "--sweep", help="Comma-separated strengths, e.g. 0,1,2,4 (overrides --strength)."),
    pipeline: str = typer.Option(
        "stable-diffusion-v1-5/stable-diffusion-v1-5", "--pipeline", help="diffusers hub id or a local folder from save_pretrained."
    ),
    model: str = typer.Option("ViT-L-14", "--model", help="open_clip model the dictionary was trained on (its text tower must be the pipeline's)."),
    pretrained: Optional[str] = typer.Option("openai", "--pretrained", help="open_clip pretrained tag of --model."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Local weights file for --model; overrides --pretrained."),
    dictionary: Path = typer.Option(..., "--dictionary", help="Dictionary folder (config.json + model.safetensors)."),
    scores: Optional[Path] = typer.Option(None, "--scores", help="Scores table (CSV or parquet) for feature names and groups."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: images, grid.png, edit.json."),
    group: Optional[str] = typer.Option(None, "--group", help="Steer every latent of ImgD, TextD or CrossD (needs --scores)."),
    suppress: bool = typer.Option(False, "--suppress", help="Suppress the features in the prompt instead of amplifying them."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="Negative prompt (used with guidance > 1)."),
    steps: int = typer.Option(30, "--steps", help="Denoising steps."),
    guidance: float = typer.Option(7.5, "--guidance", help="Classifier-free guidance scale."),
    seed: int = typer.Option(0, "--seed", help="Seed of every image (same noise before and after the edit)."),
    height: Optional[int] = typer.Option(None, "--height", help="Image height in pixels (multiple of 8; default: the pipeline's)."),
    width: Optional[int] = typer.Option(None, "--width", help="Image width in pixels (multiple of 8; default: the pipeline's)."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="ddim, pndm, euler, euler-a, dpm++ or lms (default: the pipeline's)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda[:i] or mps."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, fp16 or bf16 (half precision only on a GPU)."),
    no_safety_checker: bool = typer.Option(False, "--no-safety-checker", help="Disable the pipeline's safety checker (logged)."),
    token_position: str = typer.Option("eot", "--token-position", help="eot, after-eot or all: tokens of prompt_embeds that are steered."),
) -> None:
    """Generate before/after images of PROMPT with chosen dictionary features amplified or suppressed."""
    from apps.sd_edit.consistency import ConsistencyError
    from apps.sd_edit.generate import EditConfig, GenerationConfig, run_edit
    from apps.sd_edit.pipeline import PipelineLoadError

    try:
        config = EditConfig(
            prompt=prompt,
            features=tuple(feature or ()),
            strengths=_parse_strengths(strength, sweep, suppress),
            pipeline=pipeline,
            model=model,
            pretrained=pretrained,
            checkpoint=None if checkpoint is None else str(checkpoint),
            dictionary=str(dictionary),
            scores=None if scores is None else str(scores),
            out=str(out),
            group=group,
            mode="suppress" if suppress else "add",
            token_position=token_position,
            negative_prompt=negative_prompt,
            generation=GenerationConfig(num_inference_steps=steps, guidance_scale=guidance, seed=seed, height=height, width=width),
            scheduler=scheduler,
            device=device,
            dtype=dtype,
            safety_checker=not no_safety_checker,
        )
        summary = run_edit(config)
    except ConsistencyError as error:
        typer.echo(f"error: rejected: {error}", err=True)
        raise typer.Exit(code=2) from None
    except (ValueError, FileNotFoundError, PipelineLoadError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=2) from None

    for record in summary["images"]:
        features = ", ".join(f"{name} {value:.1f}" for name, value in record["clip_score_features"].items())
        activations = ", ".join(f"#{j} {value:.3g}" for j, value in record["activations"].items())
        typer.echo(
            f"strength {record['strength']:g}: CLIP score prompt {record['clip_score_prompt']:.1f}"
            + (f"; features {features}" if features else "")
            + f"; activations {activations} -> {Path(out) / record['file']}"
        )
    typer.echo(f"grid -> {Path(out) / 'grid.png'}; settings and measurements -> {Path(out) / 'edit.json'}")


def register(app: typer.Typer) -> None:
    """Add the ``edit`` command to the ``mmono`` typer app."""
    app.command("edit")(edit)
