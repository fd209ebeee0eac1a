"""A CLIP zero-shot classifier as a differentiable ``nn.Module`` over images in [0, 1].

Attack libraries such as torchattacks perturb pixels in [0, 1] and expect the model to
normalise them itself. :class:`ZeroShotClassifier` does so with the backbone's own mean
and standard deviation. Its logits on ``pixels`` therefore equal those of the extraction
pipeline on ``backbone.preprocess(image)``. Resizing and cropping stay with the caller:
:func:`pixel_transform` gives the backbone's preprocessing without its normalisation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_TEMPLATES", "ZeroShotClassifier", "build_classifier", "default_templates", "pixel_transform"]

Template = Union[str, Callable[[str], str]]

# Fallback when open_clip's metadata module is missing: short ImageNet-style prompts.
_FALLBACK_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a bad photo of the {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "art of the {}.",
)


def default_templates() -> tuple[Template, ...]:
    """Return open_clip's short ImageNet template list, or a built-in one without it."""
    try:
        from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES
    except ImportError:
        return _FALLBACK_TEMPLATES
    return tuple(SIMPLE_IMAGENET_TEMPLATES)


DEFAULT_TEMPLATES = _FALLBACK_TEMPLATES
"""Built-in templates, each a format string with one ``{}`` for the class name."""


def _fill(template: Template, name: str) -> str:
    if callable(template):
        return str(template(name))
    if "{}" not in template and "{c}" not in template:
        raise ValueError(f"template {template!r} has no '{{}}' or '{{c}}' field for the class name; add one.")
    return template.replace("{c}", "{}").format(name)


def pixel_transform(backbone: Any) -> Callable[[Any], torch.Tensor]:
    """Return ``backbone.preprocess`` without its Normalize step: PIL -> (3, H, W) in [0, 1].

    The geometric steps (resize, centre crop, RGB conversion) are the extraction's own, so
    ``ZeroShotClassifier(pixel_transform(b)(image))`` passes the encoder the same input
    as ``b.preprocess(image)``.
    """
    from torchvision.transforms import Compose, Normalize

    steps = getattr(backbone.preprocess, "transforms", None)
    if steps is None:
        raise ValueError(
            f"backbone.preprocess of {backbone.name!r} is not a torchvision Compose ({backbone.preprocess!r}); "
            "resize images to (3, image_size, image_size) in [0, 1] yourself."
        )
    return Compose([step for step in steps if not isinstance(step, Normalize)])


class ZeroShotClassifier(nn.Module):
    """Zero-shot CLIP classifier: images in [0, 1] -> logits over class prompts.

    ``logits = logit_scale * cos(f_img(normalise(x)), c_k)``, where ``c_k`` is the class
    embedding of class ``k``: the mean over templates of the L2-normalised text embeddings
    of its prompts, L2-normalised again.

    Parameters
    ----------
    backbone : mmono_features.backbone.Backbone
        Its ``model`` is registered as a submodule but never switched to train mode and
        its parameters' ``requires_grad`` flags are never changed.
    class_names : sequence of str
        One name per class, in label order.
    templates : sequence of str or callable, optional
        Prompt templates (``"a photo of a {}."`` or ``lambda c: ...``); the
        defaults are open_clip's short ImageNet list (:func:`default_templates`).
    class_embeddings : Tensor, shape (n_classes, embed_dim), optional
        Ready class embeddings (for example image prototypes) used instead of prompts.
    batch_size : int
        Batch size of the text encoder.

    Notes
    -----
    Input images must already have the backbone's size (``backbone.image_size``);
    :func:`pixel_transform` resizes and crops as the extraction does. The image encoder
    is called directly (not ``backbone.encode_images``, which runs under inference mode)
    so that gradients with respect to the pixels flow.
    """

    def __init__(
        self,
        backbone: Any,
        class_names: Sequence[str],
        templates: Sequence[Template] | None = None,
        class_embeddings: torch.Tensor | None = None,
        batch_size: int = 256,
    ) -> None:
        super().__init__()
        class_names = [str(name) for name in class_names]
        if len(class_names) < 2:
            raise ValueError(f"class_names must hold at least 2 classes; got {class_names!r}.")
        if len(set(class_names)) != len(class_names):
            raise ValueError(f"class_names must be distinct; got {class_names!r}.")
        self.clip = backbone.model
        self.backbone_name = backbone.name
        self.image_size = int(backbone.image_size)
        self.class_names = class_names
        self._device_type = backbone.device.type
        self._autocast_dtype = backbone.dtype
        self.templates = tuple(templates) if templates is not None else default_templates()
        if class_embeddings is None:
            class_embeddings = _prompt_embeddings(backbone, class_names, self.templates, batch_size)
        else:
            if class_embeddings.shape != (len(class_names), backbone.embed_dim):
                raise ValueError(
                    f"class_embeddings must have shape ({len(class_names)}, {backbone.embed_dim}) "
                    f"(n_classes, embed_dim); got {tuple(class_embeddings.shape)}."
                )
            class_embeddings = F.normalize(class_embeddings.detach().float(), dim=-1)
        device = backbone.device
        self.register_buffer("class_embeddings", class_embeddings.to(device))
        scale = backbone.model.logit_scale.detach().float().exp() if hasattr(backbone.model, "logit_scale") else 100.0
        self.register_buffer("logit_scale", torch.as_tensor(scale, dtype=torch.float32, device=device).reshape(()))
        self.register_buffer("mean", torch.tensor(backbone.image_mean, dtype=torch.float32, device=device).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(backbone.image_std, dtype=torch.float32, device=device).view(1, 3, 1, 1))

    @property
    def n_classes(self) -> int:
        return int(self.class_embeddings.shape[0])

    def train(self, mode: bool = True) -> "ZeroShotClassifier":
        """Set this module's flag only: the backbone always stays in eval mode.

        Attack libraries call ``model.train()``/``model.eval()`` around an attack; the
        CLIP model's dropout and normalisation layers must not follow.
        """
        self.training = bool(mode)
        return self

    def check_pixels(self, images: torch.Tensor) -> None:
        """Raise ValueError unless ``images`` is (batch, 3, image_size, image_size) in [0, 1]."""
        expected = (3, self.image_size, self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images must have shape (batch, {', '.join(map(str, expected))}); got {tuple(images.shape)}. "
                "Resize and crop with apps.adversarial.pixel_transform(backbone)."
            )
        if images.numel():
            low, high = float(images.detach().min()), float(images.detach().max())
            if low < 0.0 or high > 1.0:
                raise ValueError(
                    f"images must be pixels in [0, 1]; got values in [{low:.4g}, {high:.4g}]. Pass unnormalised "
                    "pixels (e.g. torchvision ToTensor output); the classifier normalises them itself."
                )

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Raw image embeddings (batch, embed_dim), float32, differentiable w.r.t. ``images``."""
        self.check_pixels(images)
        pixels = (images.to(self.mean.device).float() - self.mean) / self.std
        enabled = self._device_type == "cuda" and self._autocast_dtype != torch.float32
        with torch.autocast(device_type=self._device_type, dtype=self._autocast_dtype, enabled=enabled):
            features = self.clip.encode_image(pixels)
        return features.float()

    def logits_from_embeddings(self, z: torch.Tensor) -> torch.Tensor:
        """Logits (batch, n_classes) = logit_scale * cos(z, class_embeddings) for raw ``z`` (batch, embed_dim)."""
        return self.logit_scale * F.normalize(z.float(), dim=-1) @ self.class_embeddings.T

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Map pixels (batch, 3, H, W) in [0, 1] to logits (batch, n_classes)."""
        return self.logits_from_embeddings(self.image_embeddings(images))


def _prompt_embeddings(
    backbone: Any, class_names: Sequence[str], templates: Sequence[Template], batch_size: int
) -> torch.Tensor:
    if not templates:
        raise ValueError("templates is empty; pass at least one template such as 'a photo of a {}.'.")
    prompts = [_fill(template, name) for name in class_names for template in templates]
    chunks = [backbone.encode_texts(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
    # encode_texts runs under inference mode; clone() makes a normal tensor usable in autograd.
    text = F.normalize(torch.cat(chunks).float().clone(), dim=-1)
    text = text.view(len(class_names), len(templates), -1).mean(dim=1)
    return F.normalize(text, dim=-1)


def build_classifier(
    backbone: Any,
    class_names: Sequence[str],
    templates: Sequence[Template] | None = None,
    class_embeddings: torch.Tensor | None = None,
) -> ZeroShotClassifier:
    """Build a :class:`ZeroShotClassifier` on ``backbone`` for ``class_names``.

    Parameters
    ----------
    backbone : Backbone
        From :func:`mmono_features.backbone.load_backbone`.
    class_names : sequence of str
        Class names, in label order; they fill the prompt templates.
    templates : sequence of str or callable, optional
        Prompt templates; open_clip's short ImageNet list by default.
    class_embeddings : Tensor, shape (n_classes, embed_dim), optional
        Class embeddings to use instead of prompts.
    """
    classifier = ZeroShotClassifier(backbone, class_names, templates=templates, class_embeddings=class_embeddings)
    logger.info(
        "zero-shot classifier on %s: %d classes, %d templates", backbone.name, classifier.n_classes, len(classifier.templates)
    )
    return classifier
