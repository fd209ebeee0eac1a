"""Base class, config and registry shared by every dictionary kind.

A dictionary maps a normalised embedding z of shape (batch, d_in) to non-negative
latents of shape (batch, d_sae) and back. One dictionary is trained on image and text
embeddings together, so every latent can fire on both modalities.

Checkpoint format: a folder with ``config.json`` (the config, including ``kind``, the
normalisation and the backbone identity) and ``model.safetensors`` (the state dict).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmono_features.embeddings import check_modality, normalize_embeddings
from mmono_features.fileio import atomic_write

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass(frozen=True)
class DictionaryConfig:
    """Fields every dictionary kind has; each kind subclasses it with its own.

    Attributes
    ----------
    kind : str
        Registry key of the dictionary kind (``topk``, ``relu``, ...).
    d_in : int
        Width of the embeddings (the backbone's ``embed_dim``).
    d_sae : int
        Number of latents.
    center : bool
        Whether each modality's mean is removed before normalisation (the means are
        stored in the checkpoint). Off by default, because it erases the modality gap.
    backbone : dict
        Identity of the backbone whose embeddings the dictionary was trained on.
    seed : int
        Seed of the initialisation.
    """

    kind: str
    d_in: int
    d_sae: int
    center: bool = False
    backbone: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer; got {value!r}.")

    def to_dict(self) -> dict[str, Any]:
        """Return the config as a JSON-serialisable dict."""
        data = dataclasses.asdict(self)
        return {key: list(value) if isinstance(value, tuple) else value for key, value in data.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DictionaryConfig":
        """Build the config of the right kind from a dict; unknown keys raise ValueError."""
        dictionary_class = get_dictionary_class(data.get("kind", ""))
        config_class = dictionary_class.config_class
        names = {f.name for f in dataclasses.fields(config_class)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown keys {unknown} in a {data['kind']!r} dictionary config; valid keys are {sorted(names)}.")
        values = {}
        for f in dataclasses.fields(config_class):
            if f.name in data:
                value = data[f.name]
                values[f.name] = tuple(value) if isinstance(value, list) else value
        return config_class(**values)


_REGISTRY: dict[str, type["Dictionary"]] = {}


def register_dictionary(kind: str):
    """Class decorator adding a :class:`Dictionary` subclass to the registry under ``kind``."""

    def decorate(cls: type["Dictionary"]) -> type["Dictionary"]:
        if kind in _REGISTRY and _REGISTRY[kind] is not cls:
            raise ValueError(f"dictionary kind {kind!r} is already registered by {_REGISTRY[kind].__name__}.")
        cls.kind = kind
        _REGISTRY[kind] = cls
        return cls

    return decorate


def get_dictionary_class(kind: str) -> type["Dictionary"]:
    """Return the class registered under ``kind``; an unknown kind lists the valid ones."""
    _import_kinds()
    if kind not in _REGISTRY:
        raise ValueError(f"unknown dictionary kind {kind!r}; valid kinds are {sorted(_REGISTRY)}.")
    return _REGISTRY[kind]


def list_kinds() -> list[str]:
    """Return the registered dictionary kinds."""
    _import_kinds()
    return sorted(_REGISTRY)


def _import_kinds() -> None:
    # Importing the package registers every kind (each module decorates its class).
    import mmono_features.dictionary  # noqa: F401


class Dictionary(nn.Module):
    """A sparse non-negative dictionary over normalised joint embeddings.

    Subclasses implement :meth:`encode`, :meth:`decode` and :meth:`decoder_directions`
    and set ``config_class``.
    """

    kind: ClassVar[str] = ""
    config_class: ClassVar[type[DictionaryConfig]] = DictionaryConfig

    def __init__(self, config: DictionaryConfig) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise ValueError(f"{type(self).__name__} needs a {self.config_class.__name__}; got {type(config).__name__}.")
        self.config = config
        # Means of the L2-normalised embeddings per modality, used only when config.center.
        self.register_buffer("image_center", torch.zeros(config.d_in))
        self.register_buffer("text_center", torch.zeros(config.d_in))

    @property
    def d_in(self) -> int:
        return self.config.d_in

    @property
    def d_sae(self) -> int:
        return self.config.d_sae

    def prepare(self, z: torch.Tensor, modality: str) -> torch.Tensor:
        """Normalise raw backbone embeddings (batch, d_in) as this dictionary was trained."""
        check_modality(modality)
        center = None
        if self.config.center:
            center = self.image_center if modality == "image" else self.text_center
        return normalize_embeddings(z, center=center)

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """Map normalised embeddings (batch, d_in) to non-negative latents (batch, d_sae)."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Map latents (batch, d_sae) back to embeddings (batch, d_in)."""
        raise NotImplementedError

    def decoder_directions(self) -> torch.Tensor:
        """Return each latent's unit-norm direction in the normalised joint space, (d_sae, d_in)."""
        raise NotImplementedError

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(z_hat, latents)`` for normalised embeddings ``z`` of shape (batch, d_in)."""
        latents = self.encode(z)
        return self.decode(latents), latents

    def check_input(self, z: torch.Tensor) -> None:
        """Raise ValueError unless ``z`` has shape (batch, d_in)."""
        if z.ndim != 2 or z.shape[1] != self.d_in:
            raise ValueError(f"expected embeddings of shape (batch, {self.d_in}); got {tuple(z.shape)}.")

    def fingerprint(self) -> str:
        """Return a short SHA-256 of the config and weights, recorded by the scores of this dictionary."""
        import hashlib

        digest = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode("utf-8"))
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode("utf-8"))
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def save_pretrained(self, path: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into the folder ``path``.

        Each file is written under a temporary name and renamed, so a crash never leaves
        a half-written checkpoint.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()}
        atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(state, str(tmp), metadata={"kind": self.kind}))
        text = json.dumps(self.config.to_dict(), indent=2, sort_keys=True) + "\n"
        atomic_write(path / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "Dictionary":
        """Load a dictionary saved by :meth:`save_pretrained`; the kind comes from its config."""
        path = Path(path)
        config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
        for required in (config_path, weights_path):
            if not required.is_file():
                raise FileNotFoundError(
                    f"{required} not found: a dictionary folder contains {CONFIG_NAME} and {WEIGHTS_NAME} "
                    "(written by `mmono train` or save_pretrained)."
                )
        config = DictionaryConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8")))
        dictionary_class = get_dictionary_class(config.kind)
        if cls is not Dictionary and not issubclass(dictionary_class, cls):
            raise ValueError(f"{path} contains a {config.kind!r} dictionary, not a {cls.__name__}; load it with load_dictionary.")
        dictionary = dictionary_class(config)
        dictionary.load_state_dict(load_file(str(weights_path)), strict=True)
        return dictionary.to(device).eval()


def load_dictionary(path: str | Path, device: str | torch.device = "cpu") -> Dictionary:
    """Load any dictionary checkpoint folder; see :meth:`Dictionary.from_pretrained`."""
    return Dictionary.from_pretrained(path, device=device)

