"""Adversarial attacks through torchattacks, with budgets parsed and checked up front.

Supported attacks and their threat models:

========== ====== ==================================================================
name       norm   torchattacks class and budget
========== ====== ==================================================================
fgsm       L-inf  ``FGSM``: one signed-gradient step of size eps
pgd        L-inf  ``PGD``: ``steps`` steps of size ``alpha`` from a random start
pgdl2      L2     ``PGDL2``: as PGD in the L2 ball of radius eps
cw         L2     ``CW``: Carlini-Wagner L2, no budget (minimises the perturbation)
autoattack L-inf  ``AutoAttack`` (standard: APGD-CE, APGD-T, FAB-T, Square); slow
========== ====== ==================================================================

Defaults: L-inf eps 4/255 (1/255 is the usual weaker budget), L2 eps 0.5,
``alpha = eps / 4``, 10 steps.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from torch import nn

from mmono_features.progress import progress

logger = logging.getLogger(__name__)

__all__ = [
    "ATTACKS",
    "AttackConfig",
    "ModelStateChanged",
    "format_eps",
    "make_attack",
    "parse_eps",
    "perturbation_norms",
    "run_attack",
]

ATTACKS: dict[str, str] = {"fgsm": "Linf", "pgd": "Linf", "pgdl2": "L2", "cw": "L2", "autoattack": "Linf"}
"""Attack name -> norm of its threat model."""

DEFAULT_EPS: dict[str, float] = {"Linf": 4 / 255, "L2": 0.5}
AUTOATTACK_TARGET_CLASSES = 9


def parse_eps(text: str | float | int) -> float:
    """Parse a budget such as ``"4/255"``, ``"0.5"`` or ``8/255`` into a non-negative float.

    Raises
    ------
    ValueError
        For text that is not a number or a fraction, or a negative or non-finite value.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        raw = str(text).strip()
        try:
            if "/" in raw:
                numerator, denominator = raw.split("/", 1)
                value = float(numerator) / float(denominator)
            else:
                value = float(raw)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"eps {text!r} is not a number or a fraction; write it like '4/255' or '0.5'.") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"eps must be a finite number >= 0; got {text!r}.")
    return value


def format_eps(eps: float | None) -> str:
    """Write a budget as ``"k/255"`` when it is a whole number of 8-bit levels, else with %g."""
    if eps is None:
        return "none"
    levels = eps * 255
    if abs(levels - round(levels)) < 1e-6:
        return f"{round(levels)}/255"
    fraction = Fraction(eps).limit_denominator(1000)
    if abs(float(fraction) - eps) < 1e-9 and fraction.denominator != 1:
        return f"{fraction.numerator}/{fraction.denominator}"
    return f"{eps:g}"


@dataclass(frozen=True)
class AttackConfig:
    """One attack with its budget.

    Parameters
    ----------
    name : str
        One of :data:`ATTACKS`.
    eps : float, optional
        Budget in pixel units of [0, 1] images (L-inf or L2 radius). Defaults to
        4/255 for L-inf attacks and 0.5 for L2 ones; CW has none.
    alpha : float, optional
        Step size of PGD / PGDL2; ``eps / 4`` by default.
    steps : int
        Iterations of PGD, PGDL2 and CW.
    random_start : bool
        Start PGD / PGDL2 from a random point of the ball.
    cw_c : float
        Weight of the classification term of CW.
    cw_lr : float
        Learning rate of CW's Adam optimiser.
    autoattack_version : str
        ``standard``, ``plus`` or ``rand``.
    """

    name: str
    eps: float | None = None
    alpha: float | None = None
    steps: int = 10
    random_start: bool = True
    cw_c: float = 1.0
    cw_lr: float = 0.01
    autoattack_version: str = "standard"

    def __post_init__(self) -> None:
        name = str(self.name).lower()
        if name not in ATTACKS:
            raise ValueError(f"unknown attack {self.name!r}; valid attacks are {sorted(ATTACKS)}.")
        object.__setattr__(self, "name", name)
        if name == "cw":
            if self.eps is not None:
                logger.warning("CW minimises the L2 perturbation and has no budget; eps=%s is ignored.", self.eps)
            object.__setattr__(self, "eps", None)
        else:
            eps = DEFAULT_EPS[self.norm] if self.eps is None else parse_eps(self.eps)
            object.__setattr__(self, "eps", eps)
        if self.alpha is not None:
            alpha = parse_eps(self.alpha)
            if alpha <= 0:
                raise ValueError(f"alpha must be > 0; got {self.alpha!r}. Leave it unset for eps / 4.")
            object.__setattr__(self, "alpha", alpha)
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1; got {self.steps!r}.")
        if self.cw_c <= 0 or self.cw_lr <= 0:
            raise ValueError(f"cw_c and cw_lr must be > 0; got {self.cw_c!r} and {self.cw_lr!r}.")
        if self.autoattack_version not in ("standard", "plus", "rand"):
            raise ValueError(
                f"autoattack_version must be 'standard', 'plus' or 'rand'; got {self.autoattack_version!r}."
            )

    @property
    def norm(self) -> str:
        """``"Linf"`` or ``"L2"``."""
        return ATTACKS[self.name]

    @property
    def step_size(self) -> float | None:
        """Step size used by PGD / PGDL2: ``alpha``, or ``eps / 4`` when unset."""
        if self.name not in ("pgd", "pgdl2"):
            return None
        return self.alpha if self.alpha is not None else self.eps / 4

    @property
    def label(self) -> str:
        """Short name for tables, e.g. ``pgd eps=4/255``."""
        if self.name == "cw":
            return f"cw c={self.cw_c:g}"
        eps = format_eps(self.eps) if self.norm == "Linf" else f"{self.eps:g}"
        return f"{self.name} eps={eps}"

    def to_dict(self) -> dict[str, Any]:
        """Return the settings (with the effective step size) as a JSON-serialisable dict."""
        data = dataclasses.asdict(self)
        data.update(norm=self.norm, step_size=self.step_size, label=self.label)
        return data


def make_attack(config: AttackConfig, model: nn.Module, n_classes: int, seed: int = 0) -> Any:
    """Build the torchattacks object for ``config`` on ``model`` (images in [0, 1] -> logits).

    Parameters
    ----------
    config : AttackConfig
    model : nn.Module
        The model to attack; it must have at least one parameter (torchattacks reads the
        device from it).
    n_classes : int
        Number of classes (AutoAttack's targeted parts need it).
    seed : int
        Seed of AutoAttack's random parts.
    """
    import torchattacks

    if config.name == "fgsm":
        return torchattacks.FGSM(model, eps=config.eps)
    if config.name == "pgd":
        return torchattacks.PGD(
            model, eps=config.eps, alpha=config.step_size, steps=config.steps, random_start=config.random_start
        )
    if config.name == "pgdl2":
        return torchattacks.PGDL2(
            model, eps=config.eps, alpha=config.step_size, steps=config.steps, random_start=config.random_start
        )
    if config.name == "cw":
        return torchattacks.CW(model, c=config.cw_c, kappa=0, steps=config.steps, lr=config.cw_lr)
    attack = torchattacks.AutoAttack(
        model, norm=config.norm, eps=config.eps, version=config.autoattack_version, n_classes=n_classes, seed=seed
    )
    # torchattacks targets every other class in APGD-T and FAB-T (999 runs on ImageNet);
    # the AutoAttack paper targets the 9 classes with the highest logits.
    for part in getattr(getattr(attack, "_autoattack", None), "attacks", []):
        if hasattr(part, "n_target_classes"):
            part.n_target_classes = min(AUTOATTACK_TARGET_CLASSES, n_classes - 1)
    return attack


class ModelStateChanged(RuntimeError):
    """An attack changed a module's train/eval mode or a parameter's ``requires_grad``."""


def _model_state(model: nn.Module) -> tuple[tuple[bool, ...], tuple[bool, ...]]:
    return (
        tuple(module.training for module in model.modules()),
        tuple(parameter.requires_grad for parameter in model.parameters()),
    )


def _restore_state(model: nn.Module, state: tuple[tuple[bool, ...], tuple[bool, ...]]) -> None:
    for module, training in zip(model.modules(), state[0]):
        module.training = training
    for parameter, flag in zip(model.parameters(), state[1]):
        parameter.requires_grad_(flag)


def perturbation_norms(clean: torch.Tensor, adversarial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image L-inf and L2 norms of ``adversarial - clean``, each of shape (batch,)."""
    delta = (adversarial.float() - clean.float()).flatten(1)
    return delta.abs().amax(dim=1), delta.norm(dim=1)


def run_attack(
    config: AttackConfig,
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    n_classes: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Attack ``model`` on one batch and return the adversarial images.

    Parameters
    ----------
    config : AttackConfig
    model : nn.Module
        Maps images (batch, 3, H, W) in [0, 1] to logits (batch, n_classes).
    images : Tensor, shape (batch, 3, H, W)
        Clean pixels in [0, 1].
    labels : LongTensor, shape (batch,)
        True classes.
    n_classes : int, optional
        Defaults to ``model.n_classes``.
    seed : int
        Seeds the random start (PGD) and AutoAttack, in a forked random state that leaves
        the caller's unchanged.

    Returns
    -------
    Tensor, shape (batch, 3, H, W)
        Adversarial pixels in [0, 1], detached, on the device of ``images``.

    Raises
    ------
    ModelStateChanged
        If the attack left any module's mode or parameter's ``requires_grad`` changed
        (the state is restored before raising).
    """
    if images.ndim != 4 or labels.shape != images.shape[:1]:
        raise ValueError(
            f"images must be (batch, 3, H, W) and labels (batch,); got {tuple(images.shape)} and {tuple(labels.shape)}."
        )
    n_classes = int(n_classes if n_classes is not None else getattr(model, "n_classes"))
    device = next(model.parameters()).device
    before = _model_state(model)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        attack = make_attack(config, model, n_classes=n_classes, seed=seed)
        adversarial = attack(images.to(device), labels.to(device))
    after = _model_state(model)
    if after != before:
        _restore_state(model, before)
        raise ModelStateChanged(
            f"attack {config.label!r} changed the train/eval mode or requires_grad of {type(model).__name__}; "
            "the state was restored. Keep the attacked model's train() from touching its submodules."
        )
    return adversarial.detach().to(images.device)


def attack_in_batches(
    config: AttackConfig,
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 32,
    seed: int = 0,
) -> torch.Tensor:
    """Run :func:`run_attack` over ``images`` (n, 3, H, W) in batches; returns (n, 3, H, W)."""
    chunks = []
    starts = range(0, len(images), batch_size)
    for index, start in enumerate(progress(starts, total=len(starts), desc=config.label)):
        stop = start + batch_size
        chunks.append(run_attack(config, model, images[start:stop], labels[start:stop], seed=seed + index))
    return torch.cat(chunks) if chunks else images.clone()
