"""Clean and robust accuracy of a classifier with and without a feature-filter defense.

Two modes:

- ``non-adaptive``: the attack differentiates through the undefended classifier only;
  its adversarial images are then classified by both the undefended and the defended
  model.
- ``adaptive``: the attack differentiates through the defended model end to end (the
  filter is differentiable), which is the honest measure of a defense.

With both modes, ``worst-case`` rows count a defended image as robust only when it
survives both attacks. An adaptive attack that does worse than the transferred one is
a sign of gradient masking. It is logged as a warning, and the worst-case rows stay valid.

For every attack, mode and model the table reports accuracy with a bootstrap 95%
interval over images and the attack success rate: among the images the model
classifies correctly when clean, the share whose prediction is wrong after the attack.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from apps.adversarial.attacks import AttackConfig, perturbation_norms, run_attack
from mmono_features.progress import progress

logger = logging.getLogger(__name__)

__all__ = [
    "MODES",
    "AdversarialExamples",
    "EvaluationResult",
    "LabelledImages",
    "evaluate",
    "load_labelled_images",
    "run_evaluation",
]

MODES = ("non-adaptive", "adaptive")
TABLE_COLUMNS = [
    "attack",
    "name",
    "norm",
    "eps",
    "mode",
    "model",
    "n_images",
    "accuracy",
    "ci_low",
    "ci_high",
    "clean_accuracy",
    "success_rate",
    "n_clean_correct",
    "mean_linf",
    "max_linf",
    "mean_l2",
]


@dataclass
class AdversarialExamples:
    """Adversarial images of one attack and mode, with every model's predictions.

    Attributes
    ----------
    attack : AttackConfig
    mode : str
        ``non-adaptive`` or ``adaptive``.
    images : Tensor, shape (n_examples, 3, H, W)
        The first ``n_examples`` adversarial images, on the CPU.
    predictions : dict of str to LongTensor (n_images,)
        Predictions of each evaluated model (``undefended``/``defended``) on all images.
    embeddings : Tensor, shape (n_images, embed_dim)
        Raw image embeddings of all adversarial images (for the shift analysis).
    """

    attack: AttackConfig
    mode: str
    images: torch.Tensor
    predictions: dict[str, torch.Tensor]
    embeddings: torch.Tensor

    @property
    def key(self) -> str:
        return f"{self.attack.label} [{self.mode}]"


@dataclass
class EvaluationResult:
    """Everything :func:`run_evaluation` measured.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per (attack, mode, model) plus the clean rows; columns
        :data:`TABLE_COLUMNS`.
    labels : LongTensor, shape (n_images,)
    clean_images : Tensor, shape (n_examples, 3, H, W)
        The first clean images, for reports.
    clean_predictions : dict of str to LongTensor (n_images,)
    clean_embeddings : Tensor, shape (n_images, embed_dim)
    adversarial : list of AdversarialExamples
    """

    table: pd.DataFrame
    labels: torch.Tensor
    clean_images: torch.Tensor
    clean_predictions: dict[str, torch.Tensor]
    clean_embeddings: torch.Tensor
    adversarial: list[AdversarialExamples] = field(default_factory=list)


@dataclass
class LabelledImages:
    """Labelled images as classifier input.

    Attributes
    ----------
    images : Tensor, shape (n_images, 3, image_size, image_size)
        Pixels in [0, 1], resized and cropped as the backbone's preprocessing does.
    labels : LongTensor, shape (n_images,)
        Index into ``class_names``.
    class_names : list of str
        Every label of the data set, sorted; they fill the prompts.
    paths : list of str
        Source file of each image.
    n_skipped : int
        Files that could not be used (each logged with its reason).
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    paths: list[str]
    n_skipped: int = 0

    def split(self, fraction: float, seed: int = 0) -> tuple["LabelledImages", "LabelledImages"]:
        """Split into a held-out part of about ``fraction`` of the images and the rest."""
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction must be in (0, 1); got {fraction!r}.")
        n = len(self.labels)
        n_held_out = int(round(fraction * n))
        if n_held_out < 1 or n_held_out >= n:
            raise ValueError(f"a fraction of {fraction} of {n} images leaves one side empty; use more images.")
        order = np.random.default_rng(seed).permutation(n)
        held_out, rest = np.sort(order[:n_held_out]), np.sort(order[n_held_out:])
        return self._subset(held_out), self._subset(rest)

    def _subset(self, index: np.ndarray) -> "LabelledImages":
        rows = torch.as_tensor(index, dtype=torch.long)
        return LabelledImages(
            self.images[rows], self.labels[rows], self.class_names, [self.paths[i] for i in index], self.n_skipped
        )


def load_labelled_images(
    path: str | Any, backbone: Any, max_images: int | None = None, seed: int = 0, underscores_to_spaces: bool = True
) -> LabelledImages:
    """Read an image folder with class subfolders, or a CSV/JSONL with columns image,label.

    Images are resized and cropped with the backbone's preprocessing minus its
    normalisation (:func:`apps.adversarial.classifier.pixel_transform`). Unreadable files
    are skipped, each logged with its reason, and counted.

    Parameters
    ----------
    path : str or Path
    backbone : Backbone
    max_images : int, optional
        Evaluate a random subset of this many images (drawn with ``seed``).
    seed : int
    underscores_to_spaces : bool
        Turn folder names like ``golden_retriever`` into prompt words.
    """
    from apps.adversarial.classifier import pixel_transform
    from mmono_features.data import ImageLoadError, load_image, read_labelled_images

    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1; got {max_images!r}.")
    frame = read_labelled_images(path, underscores_to_spaces=underscores_to_spaces)
    class_names = sorted({str(label) for label in frame["label"] if isinstance(label, str) and label})
    if len(class_names) < 2:
        raise ValueError(
            f"{path} contains {len(class_names)} class(es) {class_names}; a classifier needs at least 2. "
            "Add a class subfolder or label."
        )
    skipped = 0
    if "skip" in frame.columns:
        unusable = frame["skip"].notna()
        for row in frame[unusable].itertuples():
            logger.warning("skipping row %d (%s): %s", row.row, row.image, row.skip)
        skipped += int(unusable.sum())
        frame = frame[~unusable]
    if max_images is not None and len(frame) > max_images:
        keep = np.sort(np.random.default_rng(seed).choice(len(frame), size=max_images, replace=False))
        frame = frame.iloc[keep]
    transform = pixel_transform(backbone)
    images, labels, paths = [], [], []
    index = {name: i for i, name in enumerate(class_names)}
    for row in progress(frame.itertuples(), total=len(frame), desc="loading images", unit="image"):
        try:
            picture = load_image(row.image)
        except ImageLoadError as error:
            logger.warning("skipping %s: %s", row.image, error.reason)
            skipped += 1
            continue
        images.append(transform(picture))
        labels.append(index[str(row.label)])
        paths.append(str(row.image))
    if not images:
        raise ValueError(f"none of the images listed by {path} could be loaded ({skipped} skipped); check the paths.")
    if skipped:
        logger.warning("skipped %d unusable image(s) of %s", skipped, path)
    return LabelledImages(torch.stack(images), torch.tensor(labels, dtype=torch.long), class_names, paths, skipped)


def _iter_batches(data: Any, batch_size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        images, labels = data
        labels = torch.as_tensor(labels, dtype=torch.long)
        if len(images) != len(labels):
            raise ValueError(f"images and labels differ in length: {len(images)} and {len(labels)}.")
        for start in range(0, len(images), batch_size):
            yield images[start : start + batch_size], labels[start : start + batch_size]
        return
    # Any iterable of (images, labels) batches, such as a DataLoader.
    for batch in data:
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise ValueError(
                f"each batch of data must be (images, labels); got {type(batch).__name__}. "
                "Pass (images, labels) tensors or a DataLoader yielding such pairs."
            )
        yield batch[0], torch.as_tensor(batch[1], dtype=torch.long)


def _bootstrap(values: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    from mmono_features.stats import bootstrap_ci

    if len(values) == 0:
        return float("nan"), float("nan")
    low, high = bootstrap_ci(values.astype(np.float64), statistic=np.mean, n_boot=n_boot, ci=0.95, seed=seed)
    return float(low), float(high)


@torch.no_grad()
def _predict(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model(images).argmax(dim=1).cpu()


def _check_modes(modes: Sequence[str], defense: nn.Module | None) -> tuple[str, ...]:
    modes = tuple(modes)
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"modes must be a non-empty subset of {MODES}; got {modes!r}.")
    if "adaptive" in modes and defense is None:
        raise ValueError("the adaptive mode attacks the defended model; pass a defense or use modes=('non-adaptive',).")
    return modes


def _attack_models(mode: str, classifier: nn.Module, defense: nn.Module | None) -> tuple[nn.Module, list[str]]:
    """Step helper: the model an attack differentiates through, and the models it is scored on."""
    if mode == "adaptive":
        return defense, ["defended"]
    return classifier, ["undefended"] + (["defended"] if defense is not None else [])


def run_evaluation(
    classifier: nn.Module,
    defense: nn.Module | None,
    data: Any,
    attacks: Sequence[AttackConfig],
    modes: Sequence[str] = MODES,
    batch_size: int = 32,
    seed: int = 0,
    n_boot: int = 1000,
    n_examples: int = 8,
) -> EvaluationResult:
    """Attack ``classifier`` (and ``defense``) on labelled images and measure accuracy.

    Parameters
    ----------
    classifier : ZeroShotClassifier
        Undefended model, images (batch, 3, H, W) in [0, 1] -> logits (batch, n_classes).
    defense : FeatureFilterDefense or None
        Defended model over the same classifier; None evaluates the classifier only.
    data : (Tensor (n, 3, H, W), LongTensor (n,)) or iterable of such batches
        Images in [0, 1] at the backbone's size and their labels.
    attacks : sequence of AttackConfig
    modes : sequence of str
        Subset of :data:`MODES`.
    batch_size : int
        Batch size when ``data`` is a pair of tensors.
    seed : int
        Seeds every attack (per batch and attack) and the bootstrap.
    n_boot : int
        Bootstrap resamples of the accuracy intervals.
    n_examples : int
        Number of leading images kept for reports.

    Returns
    -------
    EvaluationResult
    """
    if not attacks:
        raise ValueError("attacks is empty; pass at least one AttackConfig, e.g. AttackConfig('pgd').")
    modes = _check_modes(modes, defense)
    if defense is not None and getattr(defense, "classifier", classifier) is not classifier:
        raise ValueError("defense wraps another classifier; build it on the classifier passed here (build_defense(classifier, ...)).")
    models = {"undefended": classifier} | ({"defended": defense} if defense is not None else {})
    runs = [(attack, mode) for attack in attacks for mode in modes]

    # Step 1: run every batch through the clean models and every attack.
    collected = _collect(classifier, models, runs, _iter_batches(data, batch_size), seed, n_examples)

    # Step 2: turn the per-image correctness into the table.
    table = _summarise(collected, models, runs, n_boot, seed)
    adversarial = [
        AdversarialExamples(
            attack=attack,
            mode=mode,
            images=torch.cat(collected["adv_images"][i]) if collected["adv_images"][i] else torch.zeros(0),
            predictions={name: torch.cat(preds) for name, preds in collected["adv_pred"][i].items()},
            embeddings=torch.cat(collected["adv_z"][i]),
        )
        for i, (attack, mode) in enumerate(runs)
    ]
    return EvaluationResult(
        table=table,
        labels=collected["labels"],
        clean_images=torch.cat(collected["clean_images"]) if collected["clean_images"] else torch.zeros(0),
        clean_predictions={name: torch.cat(preds) for name, preds in collected["clean_pred"].items()},
        clean_embeddings=torch.cat(collected["clean_z"]),
        adversarial=adversarial,
    )


def _collect(
    classifier: nn.Module,
    models: dict[str, nn.Module],
    runs: list[tuple[AttackConfig, str]],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    seed: int,
    n_examples: int,
) -> dict[str, Any]:
    """Step helper: predictions, embeddings and perturbation norms, batch by batch."""
    out: dict[str, Any] = {
        "labels": [],
        "clean_images": [],
        "clean_pred": {name: [] for name in models},
        "clean_z": [],
        "adv_images": [[] for _ in runs],
        "adv_pred": [{name: [] for name in _attack_models(mode, classifier, models.get("defended"))[1]} for _, mode in runs],
        "adv_z": [[] for _ in runs],
        "linf": [[] for _ in runs],
        "l2": [[] for _ in runs],
    }
    n_kept_examples = 0
    for batch_index, (images, labels) in enumerate(progress(batches, desc="evaluating", unit="batch")):
        out["labels"].append(labels.cpu())
        take = max(0, min(n_examples - n_kept_examples, len(images)))
        out["clean_images"].append(images[:take].detach().cpu())
        with torch.no_grad():
            out["clean_z"].append(classifier.image_embeddings(images).cpu())
        for name, model in models.items():
            out["clean_pred"][name].append(_predict(model, images))
        for run_index, (attack, mode) in enumerate(runs):
            target, scored = _attack_models(mode, classifier, models.get("defended"))
            run_seed = seed + 100_003 * batch_index + 1_009 * run_index
            adversarial = run_attack(attack, target, images, labels, n_classes=classifier.n_classes, seed=run_seed)
            linf, l2 = perturbation_norms(images, adversarial)
            out["linf"][run_index].append(linf.cpu())
            out["l2"][run_index].append(l2.cpu())
            out["adv_images"][run_index].append(adversarial[:take].detach().cpu())
            with torch.no_grad():
                out["adv_z"][run_index].append(classifier.image_embeddings(adversarial).cpu())
            for name in scored:
                out["adv_pred"][run_index][name].append(_predict(models[name], adversarial))
        n_kept_examples += take
    if not out["labels"]:
        raise ValueError("data held no images; pass at least one labelled image.")
    out["labels"] = torch.cat(out["labels"])
    return out


def _summarise(
    collected: dict[str, Any],
    models: dict[str, nn.Module],
    runs: list[tuple[AttackConfig, str]],
    n_boot: int,
    seed: int,
) -> pd.DataFrame:
    """Step helper: accuracy, interval and success rate per (attack, mode, model)."""
    labels = collected["labels"].numpy()
    clean_correct = {name: torch.cat(p).numpy() == labels for name, p in collected["clean_pred"].items()}
    rows = []
    for name in models:
        correct = clean_correct[name]
        low, high = _bootstrap(correct, n_boot, seed)
        rows.append(
            {
                "attack": "none", "name": "none", "norm": None, "eps": 0.0, "mode": "clean", "model": name,
                "n_images": len(labels), "accuracy": float(correct.mean()), "ci_low": low, "ci_high": high,
                "clean_accuracy": float(correct.mean()), "success_rate": float("nan"),
                "n_clean_correct": int(correct.sum()), "mean_linf": 0.0, "max_linf": 0.0, "mean_l2": 0.0,
            }
        )
    for run_index, (attack, mode) in enumerate(runs):
        linf = torch.cat(collected["linf"][run_index]).numpy()
        l2 = torch.cat(collected["l2"][run_index]).numpy()
        for name, predictions in collected["adv_pred"][run_index].items():
            correct = torch.cat(predictions).numpy() == labels
            was_correct = clean_correct[name]
            flipped = was_correct & ~correct
            low, high = _bootstrap(correct, n_boot, seed)
            rows.append(
                {
                    "attack": attack.label, "name": attack.name, "norm": attack.norm,
                    "eps": float("nan") if attack.eps is None else attack.eps, "mode": mode, "model": name,
                    "n_images": len(labels), "accuracy": float(correct.mean()), "ci_low": low, "ci_high": high,
                    "clean_accuracy": float(was_correct.mean()),
                    "success_rate": float(flipped.sum() / was_correct.sum()) if was_correct.any() else float("nan"),
                    "n_clean_correct": int(was_correct.sum()), "mean_linf": float(linf.mean()),
                    "max_linf": float(linf.max()), "mean_l2": float(l2.mean()),
                }
            )
    rows.extend(_worst_case_rows(collected, runs, labels, clean_correct, n_boot, seed))
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def _worst_case_rows(
    collected: dict[str, Any],
    runs: list[tuple[AttackConfig, str]],
    labels: np.ndarray,
    clean_correct: dict[str, np.ndarray],
    n_boot: int,
    seed: int,
) -> list[dict[str, Any]]:
    """Step helper: the defended model's accuracy under the stronger of its two attacks, per image."""
    index = {(attack, mode): i for i, (attack, mode) in enumerate(runs)}
    rows = []
    for attack in dict.fromkeys(attack for attack, _ in runs):
        if (attack, "non-adaptive") not in index or (attack, "adaptive") not in index:
            continue
        i_transfer, i_adaptive = index[(attack, "non-adaptive")], index[(attack, "adaptive")]
        transfer = torch.cat(collected["adv_pred"][i_transfer]["defended"]).numpy() == labels
        adaptive = torch.cat(collected["adv_pred"][i_adaptive]["defended"]).numpy() == labels
        if adaptive.mean() > transfer.mean():
            logger.warning(
                "%s: the adaptive attack leaves the defended model more accurate (%.3f) than the transferred one "
                "(%.3f); the filter may mask gradients, so read the worst-case rows.",
                attack.label, adaptive.mean(), transfer.mean(),
            )
        correct = transfer & adaptive
        was_correct = clean_correct["defended"]
        linf = np.maximum(torch.cat(collected["linf"][i_transfer]).numpy(), torch.cat(collected["linf"][i_adaptive]).numpy())
        low, high = _bootstrap(correct, n_boot, seed)
        rows.append(
            {
                "attack": attack.label, "name": attack.name, "norm": attack.norm,
                "eps": float("nan") if attack.eps is None else attack.eps, "mode": "worst-case", "model": "defended",
                "n_images": len(labels), "accuracy": float(correct.mean()), "ci_low": low, "ci_high": high,
                "clean_accuracy": float(was_correct.mean()),
                "success_rate": float((was_correct & ~correct).sum() / was_correct.sum()) if was_correct.any() else float("nan"),
                "n_clean_correct": int(was_correct.sum()), "mean_linf": float("nan"), "max_linf": float(linf.max()),
                "mean_l2": float("nan"),
            }
        )
    return rows


def evaluate(
    classifier: nn.Module,
    defense: nn.Module | None,
    data: Any,
    attacks: Sequence[AttackConfig],
    modes: Sequence[str] = MODES,
    batch_size: int = 32,
    seed: int = 0,
    n_boot: int = 1000,
) -> pd.DataFrame:
    """Results table of :func:`run_evaluation` (columns :data:`TABLE_COLUMNS`), without the images."""
    result = run_evaluation(
        classifier, defense, data, attacks, modes=modes, batch_size=batch_size, seed=seed, n_boot=n_boot, n_examples=0
    )
    return result.table
