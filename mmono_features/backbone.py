"""Loading of open_clip backbones: a pretrained tag, a local checkpoint, or a project model.

Three sources give the same :class:`Backbone`:

- an open_clip model name with a pretrained tag (``ViT-B-32`` / ``laion2b_s34b_b79k`` by
  default), fetched through open_clip's own download and cache;
- an open_clip model name with a local checkpoint file (``.safetensors``, ``.bin``,
  ``.pt``), loaded with ``weights_only`` so that no pickled code runs;
- a project model: ``mmono-tiny`` (the tiny architecture, random weights, for tests) or
  ``mmono-shapes`` (the same architecture trained on the synthetic shapes world, weights
  under ``assets/shapes_world``).

The backbone is always in eval mode with its parameters frozen. Applications that need
gradients with respect to the input image still get them, because only the parameters
are frozen.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEVICES = ("auto", "cpu", "cuda", "mps")

_CONFIG_DIR = Path(__file__).parent / "model_configs"


def assets_dir() -> Path:
    """Return the project's ``assets/`` folder (``MMONO_ASSETS`` overrides the checkout's)."""
    override = os.environ.get("MMONO_ASSETS")
    path = Path(override) if override else Path(__file__).resolve().parents[1] / "assets"
    if not path.is_dir():
        raise FileNotFoundError(
            f"mmono's assets folder was not found at {path}. Install mmono from a checkout "
            "with `pip install -e .`, or set MMONO_ASSETS to the checkout's assets/ folder."
        )
    return path


@dataclass(frozen=True)
class _ProjectModel:
    """A model that mmono defines itself: a config in model_configs/ and optional weights."""

    config: str
    weights: str | None  # path inside assets/, None for random initialisation
    description: str


PROJECT_MODELS: dict[str, _ProjectModel] = {
    "mmono-tiny": _ProjectModel("mmono-tiny.json", None, "tiny architecture, random weights"),
    "mmono-shapes": _ProjectModel(
        "mmono-shapes.json",
        "shapes_world/model.safetensors",
        "tiny architecture trained on the synthetic shapes world",
    ),
}

_CONFIGS_REGISTERED = False


def _register_project_configs() -> None:
    # open_clip keeps a registry of model configs; adding our folder registers the
    # project's models without touching open_clip's files.
    global _CONFIGS_REGISTERED
    if _CONFIGS_REGISTERED:
        return
    import open_clip

    open_clip.add_model_config(_CONFIG_DIR)
    _CONFIGS_REGISTERED = True


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"mps"`` into a usable device.

    ``"auto"`` picks CUDA, then MPS, then the CPU. Asking for a device that is not
    available raises ValueError.
    """
    if isinstance(device, torch.device):
        device = str(device)
    kind = device.split(":")[0]
    if kind not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES} (optionally with an index, e.g. 'cuda:1'); got {device!r}.")
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available; use --device cpu or auto.")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} was requested but MPS is not available; use --device cpu or auto.")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """Return the dtype for ``precision`` on ``device``; half precision on the CPU is rejected."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}; got {precision!r}.")
    if device.type == "cpu" and precision != "fp32":
        raise ValueError(
            f"precision {precision!r} is not supported on the CPU (half-precision matrix products "
            "there are slow and lose accuracy); use --precision fp32, or a CUDA device."
        )
    return PRECISIONS[precision]


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Return the hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


class BackboneLoadError(RuntimeError):
    """Raised when a backbone's weights cannot be downloaded, found or loaded."""


@dataclass
class Backbone:
    """An open_clip model with its preprocessing and tokenizer, ready for extraction.

    Attributes
    ----------
    model : open_clip.CLIP
        In eval mode, parameters with ``requires_grad=False``.
    preprocess : callable
        open_clip's eval transform, PIL image -> tensor of shape (3, image_size, image_size).
    tokenizer : callable
        The tokenizer that matches ``model``.
    """

    model: torch.nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Any
    name: str
    pretrained: str | None
    checkpoint_sha256: str | None
    device: torch.device
    precision: str
    description: str = ""
    random_weights: bool = False
    truncated_captions: int = field(default=0, repr=False)

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[1]) if _has_text_projection(self.model) else int(
            self.model.visual.output_dim
        )

    @property
    def context_length(self) -> int:
        return int(getattr(self.tokenizer, "context_length", None) or self.model.context_length)

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def image_mean(self) -> tuple[float, float, float]:
        return tuple(float(x) for x in self._normalize_transform().mean)

    @property
    def image_std(self) -> tuple[float, float, float]:
        return tuple(float(x) for x in self._normalize_transform().std)

    def _normalize_transform(self):
        from torchvision.transforms import Normalize

        for transform in getattr(self.preprocess, "transforms", []):
            if isinstance(transform, Normalize):
                return transform
        raise RuntimeError(f"the preprocessing of {self.name} has no Normalize step: {self.preprocess}")

    def identity(self) -> dict[str, Any]:
        """Return the fields that identify the weights: name, pretrained tag, checkpoint hash."""
        return {
            "name": self.name,
            "pretrained": self.pretrained,
            "checkpoint_sha256": self.checkpoint_sha256,
            "embed_dim": self.embed_dim,
            "random_weights": self.random_weights,
        }

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        """Tokenize captions to a (batch, context_length) LongTensor on the CPU.

        Captions longer than the context length are truncated by the tokenizer; this logs
        a warning with their count.
        """
        captions = list(captions)
        n_truncated = sum(length > self.context_length for length in self._token_lengths(captions))
        if n_truncated:
            # The first truncation of a backbone is a warning. Later ones are counted in
            # truncated_captions and logged at DEBUG, so a large run does not flood the log.
            first = self.truncated_captions == 0
            self.truncated_captions += n_truncated
            logger.log(
                logging.WARNING if first else logging.DEBUG,
                "%d of %d captions are longer than the context length of %s (%d tokens) and were truncated "
                "(%d so far; see Backbone.truncated_captions).",
                n_truncated,
                len(captions),
                self.name,
                self.context_length,
                self.truncated_captions,
            )
        return self.tokenizer(captions)

    def _token_lengths(self, captions: list[str]) -> list[int]:
        # Lengths include the start and end tokens. open_clip's SimpleTokenizer exposes
        # encode(); Hugging Face tokenizers are wrapped with a .tokenizer attribute.
        if hasattr(self.tokenizer, "encode"):
            return [len(self.tokenizer.encode(text)) + 2 for text in captions]
        inner = getattr(self.tokenizer, "tokenizer", None)
        if inner is not None:
            return [len(ids) for ids in inner(captions)["input_ids"]]
        return [0 for _ in captions]

    def _autocast(self):
        enabled = self.device.type == "cuda" and self.precision != "fp32"
        return torch.autocast(device_type=self.device.type, dtype=self.dtype, enabled=enabled)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Embed preprocessed images.

        Parameters
        ----------
        pixels : Tensor, shape (batch, 3, image_size, image_size)
            Output of :attr:`preprocess`, stacked.

        Returns
        -------
        Tensor, shape (batch, embed_dim), float32, not normalised.
        """
        with torch.inference_mode(), self._autocast():
            features = self.model.encode_image(pixels.to(self.device, non_blocking=True))
        return features.float()

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embed token ids of shape (batch, context_length) to (batch, embed_dim) float32."""
        with torch.inference_mode(), self._autocast():
            features = self.model.encode_text(tokens.to(self.device, non_blocking=True))
        return features.float()

    def encode_texts(self, captions: Sequence[str]) -> torch.Tensor:
        """Embed captions to (batch, embed_dim) float32, not normalised."""
        return self.encode_tokens(self.tokenize(captions))


def _has_text_projection(model: torch.nn.Module) -> bool:
    projection = getattr(model, "text_projection", None)
    return isinstance(projection, torch.Tensor) and projection.ndim == 2


def list_backbones() -> list[str]:
    """Return the names accepted by :func:`load_backbone`: open_clip's and the project's."""
    import open_clip

    _register_project_configs()
    return sorted(set(open_clip.list_models()) | set(PROJECT_MODELS))


def load_backbone(
    name: str = DEFAULT_MODEL,
    pretrained: str | None = DEFAULT_PRETRAINED,
    checkpoint: str | Path | None = None,
    device: str | torch.device = "auto",
    precision: str = "fp32",
    seed: int = 0,
) -> Backbone:
    """Load an open_clip backbone for extraction.

    Parameters
    ----------
    name : str
        open_clip model name (``ViT-B-32``, ``ViT-L-14``, ...) or a project model
        (``mmono-tiny``, ``mmono-shapes``).
    pretrained : str or None
        open_clip pretrained tag; ignored for project models and when ``checkpoint`` is given.
    checkpoint : path, optional
        Local weights file for ``name``'s architecture; takes precedence over ``pretrained``.
    device : str
        ``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda[:i]`` or ``mps``.
    precision : str
        ``fp32``, ``fp16`` or ``bf16``; half precision runs under autocast on CUDA and is
        rejected on the CPU.
    seed : int
        Seed of the random initialisation of ``mmono-tiny``.

    Raises
    ------
    ValueError
        Unknown model name or tag, invalid device or precision.
    BackboneLoadError
        Weights that cannot be downloaded, found or loaded. The message explains how to pass a
        local file.
    """
    _register_project_configs()
    torch_device = resolve_device(device)
    resolve_precision(precision, torch_device)

    known = list_backbones()
    if name not in known:
        raise ValueError(
            f"unknown backbone {name!r}. Valid names are open_clip's models (see "
            f"open_clip.list_models()) and the project's {sorted(PROJECT_MODELS)}."
        )

    if name in PROJECT_MODELS:
        return _load_project_model(name, torch_device, precision, seed)
    if checkpoint is not None:
        return _load_local_checkpoint(name, Path(checkpoint), torch_device, precision)
    return _load_pretrained_tag(name, pretrained, torch_device, precision)


def _finish(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def _load_project_model(name: str, device: torch.device, precision: str, seed: int) -> Backbone:
    import open_clip

    spec = PROJECT_MODELS[name]
    # Random initialisation draws from the global generator; fork it so that loading a
    # model neither depends on nor changes the caller's random state.
    with torch.random.fork_rng(devices=[]), _drop_root_warning("No pretrained weights loaded"):
        torch.manual_seed(seed)
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    sha = None
    if spec.weights is not None:
        weights = assets_dir() / spec.weights
        if not weights.is_file():
            raise BackboneLoadError(
                f"the weights of project model {name!r} were not found at {weights}. They ship with the "
                "checkout's assets/; reinstall from a full clone, or retrain them with "
                "`python -m evaluation.train_shapes_clip`."
            )
        _load_weights_file(model, weights, name, None)
        sha = file_sha256(weights)
    else:
        logger.warning("%s has random weights (seed %d): its features mean nothing about real data.", name, seed)
    return Backbone(
        model=_finish(model, device),
        preprocess=preprocess,
        tokenizer=open_clip.get_tokenizer(name),
        name=name,
        pretrained=None if spec.weights is None else "mmono",
        checkpoint_sha256=sha if sha else f"random-init-seed-{seed}",
        device=device,
        precision=precision,
        description=spec.description,
        random_weights=spec.weights is None,
    )


class _drop_root_warning:
    """Context manager that hides root-logger records starting with ``prefix``.

    open_clip warns that no pretrained weights were loaded whenever a model is built
    without a tag, even when mmono loads trained weights right after. mmono logs its own
    warning for models that keep random weights.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefix)

    def __enter__(self):
        logging.getLogger().addFilter(self)
        return self

    def __exit__(self, *exc_info) -> None:
        logging.getLogger().removeFilter(self)


def _load_weights_file(model: torch.nn.Module, path: Path, name: str, pretrained: str | None) -> None:
    import open_clip

    try:
        # open_clip reads .safetensors with safetensors and other files with
        # torch.load(weights_only=True), so no pickled code runs.
        open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
    except Exception as error:  # the message of any loader failure is passed on with the fix
        raise BackboneLoadError(
            f"could not load weights for model {name!r} from {path}: {type(error).__name__}: {str(error).rstrip('.')}. "
            "The file must hold a state dict of this architecture (safetensors, or a torch "
            "file loadable with weights_only=True)."
        ) from error


def _load_local_checkpoint(name: str, path: Path, device: torch.device, precision: str) -> Backbone:
    import open_clip

    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} for model {name!r} does not exist; pass an existing file.")
    with _drop_root_warning("No pretrained weights loaded"):
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    _load_weights_file(model, path, name, None)
    return Backbone(
        model=_finish(model, device),
        preprocess=preprocess,
        tokenizer=open_clip.get_tokenizer(name),
        name=name,
        pretrained=None,
        checkpoint_sha256=file_sha256(path),
        device=device,
        precision=precision,
        description=f"local checkpoint {path.name}",
    )


def _load_pretrained_tag(name: str, pretrained: str | None, device: torch.device, precision: str) -> Backbone:
    import open_clip

    if not pretrained:
        raise ValueError(
            f"model {name!r} needs a pretrained tag or a checkpoint file; pass pretrained=TAG "
            "(--pretrained) or checkpoint=PATH (--checkpoint), or use the project model 'mmono-tiny'."
        )
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise ValueError(f"unknown pretrained tag {pretrained!r} for model {name!r}; valid tags are {tags}.")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    except Exception as error:  # network, cache and hub errors all end here with the fix
        raise BackboneLoadError(
            f"could not load the weights of {name!r} with pretrained tag {pretrained!r}: "
            f"{type(error).__name__}: {str(error).rstrip('.')}. Download them on a machine with internet access "
            "(they are cached under ~/.cache/huggingface), or pass a local weights file with "
            "--checkpoint PATH (checkpoint=PATH in Python)."
        ) from error
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    return Backbone(
        model=_finish(model, device),
        preprocess=preprocess,
        tokenizer=open_clip.get_tokenizer(name),
        name=name,
        pretrained=pretrained,
        checkpoint_sha256=cfg.get("sha256") or None,
        device=device,
        precision=precision,
        description=f"open_clip {name} / {pretrained}",
    )


def load_backbone_from_identity(identity: dict[str, Any], device: str | torch.device = "auto", checkpoint: str | Path | None = None) -> Backbone:
    """Reload the backbone that a store or dictionary records in its identity.

    Project models and pretrained tags reload by name; a local checkpoint must be passed
    again as ``checkpoint``, and its hash must match the recorded one.
    """
    name = identity.get("name")
    if not name:
        raise ValueError(f"the identity {identity} names no backbone.")
    recorded = identity.get("checkpoint_sha256") or ""
    if name == "mmono-tiny":
        seed = int(recorded.rsplit("-", 1)[-1]) if recorded.startswith("random-init-seed-") else 0
        return load_backbone(name, device=device, seed=seed)
    if name in PROJECT_MODELS:
        return load_backbone(name, device=device)
    if checkpoint is None and not identity.get("pretrained"):
        raise ValueError(
            f"backbone {name!r} was loaded from a local checkpoint (sha256 {recorded[:12]}...); pass the same file with --checkpoint."
        )
    backbone = load_backbone(name, identity.get("pretrained"), checkpoint, device=device)
    if checkpoint is not None and recorded and backbone.checkpoint_sha256 != recorded:
        raise ValueError(f"checkpoint {checkpoint} has sha256 {backbone.checkpoint_sha256}, but the recorded one is {recorded}.")
    return backbone
