"""Feature-filter defense: suppress chosen dictionary latents of the image embedding.

The defended classifier computes, for pixels x in [0, 1],

    z = f_img(x);  z_n = prepare(z, "image");  z' = decode(a') + (z_n - decode(a)),
    a = encode(z_n),  a'_j = (1 - strength) * a_j for the suppressed latents j,

then classifies z' exactly as the undefended classifier classifies z. Every step is
differentiable, so adaptive attacks go through the filter. With ``strength = 0`` the
filter is skipped and the logits equal the undefended ones bit for bit.

The suppressed latents come from one of three sources: a modality group of a Scores
table (``ImgD`` by default), an explicit list, or the latents most shifted by an attack
on a held-out calibration split (:func:`select_shifted_latents`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from apps.adversarial.attacks import AttackConfig, attack_in_batches
from apps.adversarial.classifier import ZeroShotClassifier
from apps.adversarial.shift import image_latents, latent_shift

logger = logging.getLogger(__name__)

__all__ = ["FeatureFilterDefense", "ShiftedLatents", "build_defense", "load_defense_spec", "select_shifted_latents"]

VALID_GROUPS = ("ImgD", "TextD", "CrossD", "rare")


def _as_latent_list(latents: Sequence[int] | torch.Tensor, d_sae: int) -> list[int]:
    values = latents.tolist() if isinstance(latents, torch.Tensor) else list(latents)
    result = []
    for value in values:
        if isinstance(value, bool) or not float(value).is_integer():
            raise ValueError(f"latents must be integer indices; got {value!r}.")
        index = int(value)
        if not 0 <= index < d_sae:
            raise ValueError(f"latent {index} is outside [0, {d_sae}) for a dictionary with d_sae={d_sae}.")
        result.append(index)
    if len(set(result)) != len(result):
        raise ValueError(f"latents must not repeat; got {result}.")
    return sorted(result)


def _uncenter(z: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """Map centred normalised embeddings back to unit directions of the raw space.

    ``prepare`` with centring computes ``w = u - c`` from a unit vector ``u`` and
    normalises ``w``. Given a direction ``e`` of ``w``, ``u = s e + c`` with the
    ``s > 0`` that makes ``||u|| = 1``: s = -(e.c) + sqrt((e.c)^2 + 1 - ||c||^2).
    """
    e = F.normalize(z, dim=-1)
    c = center.to(z)
    ec = e @ c
    s = -ec + torch.sqrt(ec.square() + 1.0 - c.dot(c))
    return s.unsqueeze(-1) * e + c


class FeatureFilterDefense(nn.Module):
    """A zero-shot classifier whose image embedding passes through a latent filter.

    Parameters
    ----------
    classifier : ZeroShotClassifier
        The undefended classifier; it is shared, not copied.
    dictionary : mmono_features.dictionary.Dictionary
        Trained on the classifier's backbone (``d_in == embed_dim``).
    latents : sequence of int or LongTensor
        Indices of the latents to suppress.
    strength : float
        In [0, 1]: 0 leaves the classifier unchanged (exactly), 1 zeroes the latents.
    source : dict, optional
        Where the latents came from (group and scores file, explicit list, or the
        calibration that selected them); saved with the defense.
    keep_error : bool
        Keep the dictionary's reconstruction error, so that only the edit changes z.
    """

    def __init__(
        self,
        classifier: ZeroShotClassifier,
        dictionary: Any,
        latents: Sequence[int] | torch.Tensor,
        strength: float = 1.0,
        source: dict[str, Any] | None = None,
        keep_error: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(strength, (int, float)) or not math.isfinite(strength) or not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be a number in [0, 1] (0 = off, 1 = zeroed); got {strength!r}.")
        embed_dim = int(classifier.class_embeddings.shape[1])
        if dictionary.d_in != embed_dim:
            raise ValueError(
                f"the dictionary has d_in={dictionary.d_in} but the classifier's backbone has embed_dim={embed_dim}; "
                "use a dictionary trained on this backbone's embeddings."
            )
        self.classifier = classifier
        self.dictionary = dictionary
        self.latents = _as_latent_list(latents, dictionary.d_sae)
        if not self.latents:
            logger.warning("the defense suppresses no latents: it is the undefended classifier.")
        self.strength = float(strength)
        self.keep_error = bool(keep_error)
        self.source = dict(source or {"kind": "latents"})
        self._edit = None
        if self.active:
            from mmono_features.intervene import LatentEdit

            self._edit = LatentEdit.suppress(self.latents, self.strength)

    @property
    def active(self) -> bool:
        """Whether the filter changes anything (some latents and a strength above 0)."""
        return bool(self.latents) and self.strength > 0.0

    @property
    def n_classes(self) -> int:
        return self.classifier.n_classes

    def train(self, mode: bool = True) -> "FeatureFilterDefense":
        """Set this module's flag only: the backbone and the dictionary stay in eval mode."""
        self.training = bool(mode)
        return self

    def filter_embeddings(self, z: torch.Tensor) -> torch.Tensor:
        """Filter raw image embeddings (batch, embed_dim) into embeddings of the same shape.

        The output is in the dictionary's normalised space, because the cosine classifier
        ignores scale. With a centred dictionary it is mapped back to raw directions.
        """
        if not self.active:
            return z
        from mmono_features.intervene import intervene

        prepared = self.dictionary.prepare(z, "image")
        edited = intervene(self.dictionary, prepared, self._edit, keep_error=self.keep_error)
        if getattr(self.dictionary.config, "center", False):
            edited = _uncenter(edited, self.dictionary.image_center)
        return edited

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Defended logits (batch, n_classes) for pixels (batch, 3, H, W) in [0, 1]."""
        z = self.classifier.image_embeddings(images)
        return self.classifier.logits_from_embeddings(self.filter_embeddings(z))

    def to_dict(self) -> dict[str, Any]:
        """Return the defense's settings as a JSON-serialisable dict."""
        return {
            "latents": list(self.latents),
            "n_latents": len(self.latents),
            "strength": self.strength,
            "keep_error": self.keep_error,
            "source": self.source,
            "dictionary": {
                "kind": self.dictionary.config.kind,
                "d_in": self.dictionary.d_in,
                "d_sae": self.dictionary.d_sae,
                "center": bool(getattr(self.dictionary.config, "center", False)),
                "backbone": dict(getattr(self.dictionary.config, "backbone", {}) or {}),
            },
            "classifier": {"backbone": self.classifier.backbone_name, "class_names": list(self.classifier.class_names)},
        }

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, default=_json_default) + "\n", encoding="utf-8")
        return path


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def load_defense_spec(path: str | Path) -> dict[str, Any]:
    """Read a defense JSON written by :meth:`FeatureFilterDefense.save`.

    Rebuild the defense with ``FeatureFilterDefense(classifier, dictionary,
    spec["latents"], spec["strength"], source=spec["source"])``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"defense file {path} does not exist; it is written as defense.json by `mmono defend`.")
    spec = json.loads(path.read_text(encoding="utf-8"))
    for key in ("latents", "strength"):
        if key not in spec:
            raise ValueError(f"defense file {path} has no {key!r} field; it was not written by FeatureFilterDefense.save.")
    return spec


@dataclass
class ShiftedLatents:
    """Latents selected by their shift under an attack on calibration images.

    Attributes
    ----------
    latents : list of int
        The ``n_latents`` most shifted latents, most shifted first.
    table : pandas.DataFrame
        The full :func:`apps.adversarial.shift.latent_shift` table of the calibration run.
    attack : dict
        The calibration attack's settings.
    n_images : int
        Number of calibration images.
    """

    latents: list[int]
    table: pd.DataFrame
    attack: dict[str, Any]
    n_images: int

    def to_source(self) -> dict[str, Any]:
        """Description of the selection for :attr:`FeatureFilterDefense.source`."""
        head = self.table.head(len(self.latents))
        return {
            "kind": "shifted",
            "attack": self.attack,
            "n_calibration_images": self.n_images,
            "mean_abs_shift": {int(row.latent): float(row.mean_abs_shift) for row in head.itertuples()},
        }


def select_shifted_latents(
    classifier: ZeroShotClassifier,
    dictionary: Any,
    images: torch.Tensor,
    labels: torch.Tensor,
    attack: AttackConfig,
    n_latents: int = 32,
    batch_size: int = 32,
    seed: int = 0,
) -> ShiftedLatents:
    """Pick the latents that an attack on the undefended classifier moves most.

    Attacks the held-out calibration ``images`` (n, 3, H, W) in [0, 1] with
    ``labels`` (n,), encodes clean and adversarial image embeddings with ``dictionary``
    and keeps the ``n_latents`` latents with the largest mean |a_adv - a_clean|. Use
    images that are not evaluated afterwards, or the selection uses the test set.
    """
    if not isinstance(n_latents, int) or not 1 <= n_latents <= dictionary.d_sae:
        raise ValueError(f"n_latents must be an integer in [1, {dictionary.d_sae}] (d_sae); got {n_latents!r}.")
    if len(images) == 0:
        raise ValueError("no calibration images; pass a held-out split with at least one image.")
    adversarial = attack_in_batches(attack, classifier, images, labels, batch_size=batch_size, seed=seed)
    with torch.no_grad():
        clean_z = torch.cat([classifier.image_embeddings(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
        adv_z = torch.cat(
            [classifier.image_embeddings(adversarial[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        )
    table = latent_shift(image_latents(dictionary, clean_z), image_latents(dictionary, adv_z))
    latents = [int(v) for v in table["latent"].head(n_latents)]
    logger.info("selected the %d latents most shifted by %s on %d calibration images", n_latents, attack.label, len(images))
    return ShiftedLatents(latents=latents, table=table, attack=attack.to_dict(), n_images=int(len(images)))


def build_defense(
    classifier: ZeroShotClassifier,
    dictionary: Any,
    scores: Any | None = None,
    group: str | None = "ImgD",
    latents: Sequence[int] | torch.Tensor | None = None,
    strength: float = 1.0,
    shifted: ShiftedLatents | None = None,
) -> FeatureFilterDefense:
    """Build a :class:`FeatureFilterDefense` from one source of latents.

    Exactly one source is used, in this order: ``shifted`` (from
    :func:`select_shifted_latents`), ``latents`` (explicit indices), or ``group`` of
    ``scores`` (a :class:`mmono_features.modality.Scores`).

    Raises
    ------
    ValueError
        For an unknown group, a group without scores, or scores of another dictionary.
    """
    if shifted is not None:
        return FeatureFilterDefense(classifier, dictionary, shifted.latents, strength, source=shifted.to_source())
    if latents is not None:
        return FeatureFilterDefense(classifier, dictionary, latents, strength, source={"kind": "latents"})
    if group not in VALID_GROUPS:
        raise ValueError(f"group must be one of {VALID_GROUPS}; got {group!r}.")
    if scores is None:
        raise ValueError(f"group {group!r} needs a Scores table (scores=..., --scores FILE) to know its latents.")
    n_scored = len(scores.table)
    if n_scored != dictionary.d_sae:
        raise ValueError(
            f"the scores have {n_scored} latents but the dictionary has d_sae={dictionary.d_sae}; "
            "pass the scores computed for this dictionary (mmono score)."
        )
    chosen = scores.latents(group)
    source = {"kind": "group", "group": group, "rule": dict(getattr(scores, "rule", {}) or {})}
    return FeatureFilterDefense(classifier, dictionary, chosen, strength, source=source)
