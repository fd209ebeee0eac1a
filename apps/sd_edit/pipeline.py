"""Loading a Stable Diffusion pipeline through diffusers: hub id or local folder.

The pipeline is a plain ``diffusers.StableDiffusionPipeline`` (SD 1.x layout: a
``transformers.CLIPTextModel`` text encoder and a ``CLIPTokenizer``). Loading picks the
device and dtype once, swaps the scheduler when asked, and keeps the safety checker on
unless the caller turns it off explicitly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

DEFAULT_PIPELINE = "stable-diffusion-v1-5/stable-diffusion-v1-5"

# name -> diffusers scheduler class name; each is built with from_config(pipeline's config).
SCHEDULERS: dict[str, str] = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "lms": "LMSDiscreteScheduler",
}

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class PipelineLoadError(RuntimeError):
    """Raised when a pipeline's weights cannot be found or loaded."""


@dataclass(frozen=True)
class PipelineConfig:
    """Settings for loading a Stable Diffusion pipeline.

    Attributes
    ----------
    source : str
        Hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``) or a local folder written
        by ``save_pretrained``.
    device : str
        ``auto``, ``cpu``, ``cuda[:i]`` or ``mps``.
    dtype : str
        ``fp32``, ``fp16`` or ``bf16``; half precision is rejected on the CPU.
    scheduler : str or None
        One of :data:`SCHEDULERS`, or None to keep the pipeline's own.
    safety_checker : bool
        Keep the pipeline's safety checker (default). Turning it off is logged at WARNING.
    local_files_only : bool
        Never reach the hub; always true for a local folder.
    """

    source: str = DEFAULT_PIPELINE
    device: str = "auto"
    dtype: str = "fp32"
    scheduler: str | None = None
    safety_checker: bool = True
    local_files_only: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ValueError(f"source must be a hub id or a local folder; got {self.source!r}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}; got {self.dtype!r}.")
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {tuple(SCHEDULERS)} (or None for the pipeline's own); got {self.scheduler!r}.")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Return the torch dtype for ``dtype`` on ``device``; half precision on the CPU is rejected."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}; got {dtype!r}.")
    if device.type == "cpu" and dtype != "fp32":
        raise ValueError(
            f"dtype {dtype!r} is not supported on the CPU (many half-precision kernels are missing or slow there); "
            "use --dtype fp32, or a CUDA device with --device cuda."
        )
    return DTYPES[dtype]


def _is_local(source: str) -> bool:
    # A hub id is "owner/name"; anything that exists on disk, starts like a path or has
    # more than one slash is treated as a folder.
    path = Path(source).expanduser()
    return path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source


def load_pipeline(config: PipelineConfig | None = None, **overrides: Any):
    """Load a ``StableDiffusionPipeline`` with the settings of ``config``.

    Parameters
    ----------
    config : PipelineConfig, optional
        Defaults to ``PipelineConfig()`` (SD 1.5 from the hub).
    **overrides
        Fields of :class:`PipelineConfig` replacing those of ``config``.

    Returns
    -------
    diffusers.StableDiffusionPipeline
        On the chosen device and dtype, progress bar following :mod:`mmono_features.progress`.

    Raises
    ------
    FileNotFoundError
        A local folder that does not exist or has no ``model_index.json``.
    PipelineLoadError
        Weights that cannot be downloaded or read; the message names the source and how
        to pass a local folder.
    ValueError
        A bad device, dtype or scheduler, or a pipeline without a CLIP text encoder.
    """
    from dataclasses import replace

    from diffusers import StableDiffusionPipeline

    from mmono_features.backbone import resolve_device
    from mmono_features.progress import progress_enabled

    config = replace(config or PipelineConfig(), **overrides)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)

    local = _is_local(config.source)
    source: str | Path = config.source
    if local:
        source = Path(config.source).expanduser()
        if not (source / "model_index.json").is_file():
            raise FileNotFoundError(
                f"pipeline folder {source} has no model_index.json; pass a folder written by "
                "StableDiffusionPipeline.save_pretrained, or a hub id such as "
                f"{DEFAULT_PIPELINE!r}."
            )

    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": local or config.local_files_only}
    if not config.safety_checker:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
        logger.warning("the safety checker of %s is disabled: generated images are not filtered.", config.source)
    try:
        pipeline = StableDiffusionPipeline.from_pretrained(source, **kwargs)
    except (OSError, EnvironmentError, ValueError) as error:
        raise PipelineLoadError(
            f"could not load the Stable Diffusion pipeline {config.source!r}: {type(error).__name__}: {error}. "
            "Download it on a machine with internet access (diffusers caches it under ~/.cache/huggingface), "
            "or save it with StableDiffusionPipeline.save_pretrained(DIR) and pass that local folder "
            "with --pipeline DIR."
        ) from error

    if config.safety_checker and getattr(pipeline, "safety_checker", None) is None:
        logger.info("pipeline %s has no safety checker; generated images are not filtered.", config.source)
    _check_text_encoder(pipeline, config.source)
    if config.scheduler is not None:
        pipeline.scheduler = build_scheduler(config.scheduler, pipeline.scheduler.config)
    pipeline = pipeline.to(device)
    pipeline.set_progress_bar_config(disable=not progress_enabled(), leave=False)
    return pipeline


def build_scheduler(name: str, scheduler_config: Any):
    """Build scheduler ``name`` (a key of :data:`SCHEDULERS`) from another scheduler's config."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; valid names are {sorted(SCHEDULERS)}.")
    scheduler_class = getattr(diffusers, SCHEDULERS[name])
    return scheduler_class.from_config(scheduler_config)


def _check_text_encoder(pipeline: Any, source: str) -> None:
    encoder = getattr(pipeline, "text_encoder", None)
    tokenizer = getattr(pipeline, "tokenizer", None)
    if encoder is None or tokenizer is None or not hasattr(encoder, "config") or not hasattr(encoder.config, "hidden_size"):
        raise ValueError(
            f"pipeline {source!r} has no CLIP text encoder and tokenizer; feature steering needs an SD 1.x-style "
            "pipeline (text_encoder: transformers.CLIPTextModel)."
        )


def pipeline_identity(pipeline: Any, source: str) -> dict[str, Any]:
    """Describe a loaded pipeline for logs and ``edit.json``: source, text width, scheduler, dtype."""
    encoder = pipeline.text_encoder
    return {
        "source": str(source),
        "text_encoder": type(encoder).__name__,
        "text_hidden_size": int(encoder.config.hidden_size),
        "text_layers": int(encoder.config.num_hidden_layers),
        "hidden_act": str(getattr(encoder.config, "hidden_act", "")),
        "scheduler": type(pipeline.scheduler).__name__,
        "dtype": str(encoder.dtype).replace("torch.", ""),
        "device": str(pipeline.device),
        "safety_checker": getattr(pipeline, "safety_checker", None) is not None,
    }
