"""Steering ``prompt_embeds`` along dictionary features.

The dictionary lives in the normalised joint space of an open_clip model: a raw text
embedding ``t`` (embed_dim,) becomes ``z = sqrt(D) * u / ||u||`` with ``u = t / ||t|| - c``
(``c`` the text mean when the dictionary was trained with centring, else 0). The pipeline
conditions on the text tower's hidden states ``h`` (width,), and at the end-of-text (EOT)
token ``t = h @ P (+ b)`` with ``P = text_projection`` of shape (width, embed_dim).

A change ``dz`` in the normalised space is carried back in three steps:

1. ``dt = dz * ||t|| * ||u|| / sqrt(D)``: the inverse of the normalisation's scale at
   ``t`` (the normalisation removes the component of ``dt`` along ``t``, so only this
   scale matters to first order);
2. ``dh = dt @ pinv(P)``, shape (width,): the smallest hidden change whose projection is
   ``dt`` (exactly ``dt`` when ``P`` has full column rank, as for ViT-L-14: 768 x 768);
3. ``prompt_embeds[:, EOT] += dh`` (or from EOT on, or at every token).

Two edits produce ``dz``:

- **add** (amplify): ``dz = alpha * sum_j d_j`` with ``d_j`` latent j's unit decoder
  direction. ``alpha`` is then the activation added to each latent (for a decoder with
  unit rows), in units of the normalised space, whose vectors have norm sqrt(D);
- **suppress**: ``dz = latent_delta(dictionary, LatentEdit.suppress(latents, alpha), a)``
  with ``a`` the prompt's latents, i.e. ``decode(a') - decode(a)``; ``alpha = 1`` zeroes
  the chosen latents, ``alpha in (0, 1)`` scales them by ``1 - alpha``.

Strength 0 returns ``prompt_embeds`` unchanged, bit for bit.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from apps.sd_edit.consistency import text_projection

logger = logging.getLogger(__name__)

TOKEN_POSITIONS = ("eot", "after-eot", "all")
MODES = ("add", "suppress")
GROUP_NAMES = ("ImgD", "TextD", "CrossD")


@dataclass(frozen=True)
class SelectedFeature:
    """A latent chosen for steering, with the name and group the scores table gives it."""

    latent: int
    name: str = ""
    group: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"latent": self.latent, "name": self.name, "group": self.group}


@dataclass(frozen=True)
class SteeringConfig:
    """Steering settings: the latents, the edit and the tokens it reaches.

    Attributes
    ----------
    latents : tuple of int
        Latent ids to steer (at least one).
    mode : {"add", "suppress"}
        Amplify along the decoder directions, or suppress the prompt's activations.
    token_position : {"eot", "after-eot", "all"}
        Tokens of ``prompt_embeds`` that receive the hidden-space change: the end-of-text
        token only, it and every later (padding) token, or every token.
    """

    latents: tuple[int, ...]
    mode: str = "add"
    token_position: str = "eot"

    def __post_init__(self) -> None:
        latents = tuple(int(j) for j in self.latents)
        if not latents or any(j < 0 for j in latents):
            raise ValueError(f"latents must be one or more non-negative latent ids; got {self.latents!r}.")
        object.__setattr__(self, "latents", latents)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {self.mode!r}.")
        if self.token_position not in TOKEN_POSITIONS:
            raise ValueError(f"token_position must be one of {TOKEN_POSITIONS}; got {self.token_position!r}.")


@dataclass
class SteeringSpace:
    """The linear map between the text tower's hidden space and the joint space.

    Attributes
    ----------
    projection : Tensor, shape (width, embed_dim), float32
        ``text_projection`` of the open_clip model.
    bias : Tensor of shape (embed_dim,) or None
    pinv : Tensor, shape (embed_dim, width), float32
        Moore-Penrose pseudo-inverse of ``projection`` (computed in float64).
    """

    projection: torch.Tensor
    bias: torch.Tensor | None
    pinv: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.projection = self.projection.detach().float().cpu()
        self.bias = None if self.bias is None else self.bias.detach().float().cpu()
        self.pinv = torch.linalg.pinv(self.projection.double()).float()
        rank = int(torch.linalg.matrix_rank(self.projection.double()))
        if rank < self.projection.shape[1]:
            logger.warning(
                "text_projection has rank %d < embed_dim %d: steering keeps only the part of each direction "
                "inside its row space.",
                rank,
                self.projection.shape[1],
            )

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "SteeringSpace":
        """Build the space of an open_clip model from its ``text_projection``."""
        projection, bias = text_projection(model)
        return cls(projection=projection, bias=bias)

    @property
    def condition_number(self) -> float:
        """Ratio of the largest to the smallest singular value of ``projection``.

        The pseudo-inverse scales joint-space changes by up to this ratio over the
        smallest gain, so a large value means a small joint change can need a large
        hidden change.
        """
        singular = torch.linalg.svdvals(self.projection.double())
        return float(singular.max() / singular.min().clamp_min(1e-300))

    @property
    def width(self) -> int:
        return int(self.projection.shape[0])

    @property
    def embed_dim(self) -> int:
        return int(self.projection.shape[1])

    def to_joint(self, hidden: torch.Tensor) -> torch.Tensor:
        """Project hidden states (..., width) to raw joint embeddings (..., embed_dim), float32."""
        joint = hidden.float().cpu() @ self.projection
        return joint if self.bias is None else joint + self.bias

    def to_hidden(self, delta_joint: torch.Tensor) -> torch.Tensor:
        """Map joint-space changes (..., embed_dim) to hidden-space changes (..., width), float32."""
        return delta_joint.float().cpu() @ self.pinv


def normalisation_scale(dictionary: Any, t: torch.Tensor) -> torch.Tensor:
    """Return ``||t|| * ||t/||t|| - c|| / sqrt(D)`` per row: raw change per unit of normalised change.

    Parameters
    ----------
    dictionary : Dictionary
        Supplies the text centre ``c`` when ``config.center``.
    t : Tensor, shape (batch, D)
        Raw text embeddings.

    Returns
    -------
    Tensor, shape (batch, 1)
    """
    norm = t.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    unit = t / norm
    if getattr(dictionary.config, "center", False):
        unit = unit - dictionary.text_center.detach().float().cpu()
    return norm * unit.norm(dim=-1, keepdim=True) / math.sqrt(t.shape[-1])


def joint_delta(dictionary: Any, t: torch.Tensor, config: SteeringConfig, strength: float) -> torch.Tensor:
    """Compute the change of the raw joint text embedding that a steering edit requests.

    Parameters
    ----------
    dictionary : Dictionary
    t : Tensor, shape (batch, embed_dim)
        Raw joint text embeddings of the prompts (EOT hidden state projected).
    config : SteeringConfig
    strength : float
        ``alpha`` of the module notes.

    Returns
    -------
    Tensor, shape (batch, embed_dim), float32 on the CPU
    """
    from mmono_features.intervene import LatentEdit, latent_delta

    t = t.float().cpu()
    _check_latents(config.latents, dictionary.d_sae)
    with torch.no_grad():
        if config.mode == "add":
            directions = dictionary.decoder_directions().detach().float().cpu()[list(config.latents)]
            dz = strength * directions.sum(dim=0, keepdim=True).expand_as(t)
        else:
            z = dictionary.prepare(t.to(_device_of(dictionary)), "text")
            latents = dictionary.encode(z)
            edit = LatentEdit.suppress(list(config.latents), strength=strength)
            dz = latent_delta(dictionary, edit, latents).float().cpu()
    return dz * normalisation_scale(dictionary, t)


def _device_of(module: Any) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _check_latents(latents: Sequence[int], d_sae: int) -> None:
    bad = [j for j in latents if not 0 <= j < d_sae]
    if bad:
        raise ValueError(f"latent ids {bad} are out of range: the dictionary has d_sae={d_sae} latents (ids 0..{d_sae - 1}).")


def check_prompt_embeds(prompt_embeds: Any, seq_len: int, width: int, dtype: torch.dtype, argument: str = "prompt_embeds") -> None:
    """Raise ValueError unless ``prompt_embeds`` is a (batch, seq_len, width) tensor of ``dtype``.

    The message names the expected shape, e.g. ``(batch, 77, 768)`` for SD 1.x.
    """
    expected = f"(batch, {seq_len}, {width})"
    if not isinstance(prompt_embeds, torch.Tensor):
        raise ValueError(f"{argument} must be a torch.Tensor of shape {expected}; got {type(prompt_embeds).__name__}.")
    if prompt_embeds.ndim != 3 or tuple(prompt_embeds.shape[1:]) != (seq_len, width) or prompt_embeds.shape[0] < 1:
        raise ValueError(
            f"{argument} must have shape {expected} (the text encoder's last_hidden_state); got {tuple(prompt_embeds.shape)}."
        )
    if prompt_embeds.dtype != dtype:
        raise ValueError(
            f"{argument} must have dtype {dtype} (the text encoder's dtype) and shape {expected}; got {prompt_embeds.dtype}. "
            f"Cast it with .to({dtype})."
        )


def token_mask(eot: torch.Tensor, seq_len: int, token_position: str) -> torch.Tensor:
    """Return a (batch, seq_len) bool mask of the tokens that receive the steering change.

    Parameters
    ----------
    eot : LongTensor, shape (batch,)
        End-of-text position of each prompt.
    """
    if token_position not in TOKEN_POSITIONS:
        raise ValueError(f"token_position must be one of {TOKEN_POSITIONS}; got {token_position!r}.")
    positions = torch.arange(seq_len).unsqueeze(0)
    eot = eot.cpu().unsqueeze(1)
    if token_position == "eot":
        return positions == eot
    if token_position == "after-eot":
        return positions >= eot
    return torch.ones(eot.shape[0], seq_len, dtype=torch.bool)


def steer_prompt_embeds(
    prompt_embeds: torch.Tensor,
    eot: torch.Tensor,
    space: SteeringSpace,
    dictionary: Any,
    config: SteeringConfig,
    strength: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add the hidden-space steering change of ``config`` to ``prompt_embeds``.

    Parameters
    ----------
    prompt_embeds : Tensor, shape (batch, seq_len, width)
        The text encoder's ``last_hidden_state`` for the prompts (dtype and device kept).
    eot : LongTensor, shape (batch,)
        End-of-text position of each prompt.
    space : SteeringSpace
    dictionary : Dictionary
    config : SteeringConfig
    strength : float
        Finite; 0 returns ``prompt_embeds`` itself, unchanged bit for bit.

    Returns
    -------
    steered : Tensor, shape (batch, seq_len, width)
        Same dtype and device as ``prompt_embeds``; only the masked tokens differ.
    delta_hidden : Tensor, shape (batch, width), float32 on the CPU
        The change added at each masked token (zeros for strength 0).
    """
    if not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.ndim != 3:
        raise ValueError(
            f"prompt_embeds must be a tensor of shape (batch, seq_len, {space.width}); got {tuple(getattr(prompt_embeds, 'shape', ()))}."
        )
    check_prompt_embeds(prompt_embeds, prompt_embeds.shape[1], space.width, prompt_embeds.dtype)
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise ValueError(f"strength must be a finite number; got {strength!r}.")
    if eot.shape != (prompt_embeds.shape[0],):
        raise ValueError(f"eot must have shape ({prompt_embeds.shape[0]},), one position per prompt; got {tuple(eot.shape)}.")
    batch, seq_len, width = prompt_embeds.shape
    if strength == 0:
        return prompt_embeds, torch.zeros(batch, width)

    rows = torch.arange(batch)
    hidden_eot = prompt_embeds.detach()[rows, eot.to(prompt_embeds.device)].float().cpu()
    t = space.to_joint(hidden_eot)
    delta_hidden = space.to_hidden(joint_delta(dictionary, t, config, float(strength)))

    mask = token_mask(eot, seq_len, config.token_position)
    change = mask.unsqueeze(-1).float() * delta_hidden.unsqueeze(1)
    steered = prompt_embeds.clone()
    # Add in float32 and cast once, so that fp16 prompts lose no more than one rounding.
    masked = mask.to(prompt_embeds.device)
    updated = prompt_embeds.float() + change.to(prompt_embeds.device)
    steered[masked] = updated[masked].to(prompt_embeds.dtype)
    return steered, delta_hidden


def select_features(
    features: Sequence[str | int] = (), scores: Any = None, group: str | None = None, d_sae: int | None = None
) -> list[SelectedFeature]:
    """Resolve feature names, latent ids and a modality group into latents.

    Parameters
    ----------
    features : sequence of str or int
        Each an integer latent id (``12`` or ``"12"``) or a feature name from the ``name``
        column of ``scores.table``. Names match case-insensitively, and every latent with
        that name is taken.
    scores : mmono_features.modality.Scores, optional
        Needed for names and groups; also supplies the names of latents given by id.
    group : {"ImgD", "TextD", "CrossD"}, optional
        Add every latent of this group.
    d_sae : int, optional
        Number of latents, to check ids.

    Returns
    -------
    list of SelectedFeature
        In the order given, without duplicates.

    Raises
    ------
    ValueError
        Nothing selected, an unknown name (with a few valid ones listed), an id out of
        range, or a name or group without a scores table.
    """
    table = None if scores is None else scores.table
    names_by_latent: dict[int, tuple[str, str]] = {}
    if table is not None:
        for latent, name, grp in zip(table["latent"].tolist(), table["name"].tolist(), table["group"].tolist()):
            names_by_latent[int(latent)] = (str(name or ""), str(grp or ""))

    chosen: list[int] = []
    for feature in features:
        text = str(feature).strip()
        if text.lstrip("-").isdigit():
            latent = int(text)
            if latent < 0 or (d_sae is not None and latent >= d_sae):
                raise ValueError(
                    f"feature {feature!r} is not a latent id of this dictionary (d_sae={d_sae}: ids 0..{(d_sae or 1) - 1})."
                )
            chosen.append(latent)
            continue
        if table is None:
            raise ValueError(f"feature {feature!r} is a name; pass the scores table (--scores FILE) to look names up, or give a latent id.")
        matches = [latent for latent, (name, _) in names_by_latent.items() if name.lower() == text.lower() and name]
        if not matches:
            known = sorted({name for name, _ in names_by_latent.values() if name})
            hint = f"some known names: {known[:10]}" if known else "the scores table has no names yet (run feature naming)"
            raise ValueError(f"no latent is named {feature!r} in the scores table; {hint}. A latent id works too.")
        chosen.extend(sorted(matches))

    if group is not None:
        if group not in GROUP_NAMES:
            raise ValueError(f"group must be one of {GROUP_NAMES}; got {group!r}.")
        if scores is None:
            raise ValueError(f"group {group!r} needs the scores table (--scores FILE) that assigns latents to groups.")
        members = [int(j) for j in scores.latents(group).tolist()]
        if not members:
            raise ValueError(f"group {group!r} has no latents in this scores table.")
        chosen.extend(members)

    if not chosen:
        raise ValueError("no feature selected: pass --feature NAME_OR_ID (repeatable) or --group ImgD|TextD|CrossD.")
    if d_sae is not None:
        _check_latents(chosen, d_sae)
    unique = list(dict.fromkeys(chosen))
    return [SelectedFeature(latent=j, name=names_by_latent.get(j, ("", ""))[0], group=names_by_latent.get(j, ("", ""))[1]) for j in unique]
