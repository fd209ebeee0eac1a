"""Prompt sets of the zero-shot tasks, and class embeddings built from them.

A prompt set is a JSON file::

    {
      "name": "gender",
      "templates": ["a photo of a {}.", "a close-up photo of a {}."],
      "classes": {"male": ["man", "male person"], "female": ["woman", "female person"]},
      "positive_label": "female",
      "label_column": "gender"
    }

Each class label gets the prompts ``template.format(wording)`` for every template and
every wording of that class. ``positive_label`` (optional) is the default label of the
one-vs-rest audit; ``label_column`` (optional) the default column holding the true
labels. A plain text file is also accepted: one class label per line (``#`` starts a
comment), used as its own wording with :data:`DEFAULT_TEMPLATES`.

The class embedding is the mean of the L2-normalised prompt embeddings, normalised
again (see :func:`class_embeddings`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = [
    "DEFAULT_TEMPLATES",
    "TASKS",
    "PromptSet",
    "class_embeddings",
    "default_prompt_set_path",
    "load_caption_pairs",
    "load_prompt_set",
]

TASKS = ("gender", "attribute")
"""Zero-shot tasks of the audit."""

DEFAULT_TEMPLATES = ("a photo of a {}.", "a close-up photo of a {}.", "a portrait of a {}.")
"""Templates used for prompt sets given as plain text."""


def assets_dir() -> Path:
    """Return ``assets/bias_audit`` of the repository."""
    return Path(__file__).resolve().parents[2] / "assets" / "bias_audit"


def default_prompt_set_path(task: str) -> Path:
    """Return the shipped prompt set of ``task`` (``gender`` or ``attribute``)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}; got {task!r}.")
    return assets_dir() / ("gender_prompts.json" if task == "gender" else "attribute_prompts.json")


@dataclass(frozen=True)
class PromptSet:
    """Classes of a zero-shot task and the prompts of each.

    Attributes
    ----------
    name : str
        Name of the set.
    labels : tuple of str
        Class labels, in output order.
    prompts : tuple of tuple of str
        ``prompts[c]`` are the prompts of class ``labels[c]``.
    positive_label : str or None
        Default positive label of the one-vs-rest audit.
    label_column : str or None
        Default column of the audit table holding true labels.
    source : str
        File the set was read from (``""`` when built in code).
    """

    name: str
    labels: tuple[str, ...]
    prompts: tuple[tuple[str, ...], ...]
    positive_label: str | None = None
    label_column: str | None = None
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if len(self.labels) < 2:
            raise ValueError(f"prompt set {self.name!r} needs at least 2 classes; got {list(self.labels)}.")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"prompt set {self.name!r} repeats a class label: {list(self.labels)}.")
        if len(self.prompts) != len(self.labels) or any(not p for p in self.prompts):
            raise ValueError(f"prompt set {self.name!r}: every class needs at least one prompt.")
        if self.positive_label is not None and self.positive_label not in self.labels:
            raise ValueError(
                f"positive_label {self.positive_label!r} is not a class of {self.name!r}; classes are {list(self.labels)}."
            )

    def flat_prompts(self) -> tuple[list[str], torch.Tensor]:
        """Return all prompts and the class index of each, a LongTensor (n_prompts,)."""
        texts = [p for prompts in self.prompts for p in prompts]
        index = torch.tensor([c for c, prompts in enumerate(self.prompts) for _ in prompts], dtype=torch.long)
        return texts, index

    def to_dict(self) -> dict:
        """Return a JSON-serialisable description (labels and prompts)."""
        return {
            "name": self.name,
            "source": self.source,
            "positive_label": self.positive_label,
            "label_column": self.label_column,
            "classes": {label: list(p) for label, p in zip(self.labels, self.prompts)},
        }


def load_prompt_set(path: str | os.PathLike) -> PromptSet:
    """Read a prompt set from JSON or plain text (see the module docstring).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        On a malformed file (the message names the field).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt set {path} not found; pass a .json or .txt file (see assets/bias_audit/).")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"prompt set {path} is not valid JSON: {error}") from error
        templates = data.get("templates", list(DEFAULT_TEMPLATES))
        classes = data.get("classes")
        if not isinstance(classes, dict) or not classes:
            raise ValueError(f"prompt set {path}: 'classes' must map each label to a list of wordings.")
        if not isinstance(templates, list) or not all(isinstance(t, str) and "{}" in t for t in templates):
            raise ValueError(f"prompt set {path}: 'templates' must be a list of strings, each with one '{{}}'.")
        labels, prompts = [], []
        for label, wordings in classes.items():
            if isinstance(wordings, str):
                wordings = [wordings]
            if not wordings or not all(isinstance(w, str) and w.strip() for w in wordings):
                raise ValueError(f"prompt set {path}: class {label!r} needs a non-empty list of wordings.")
            labels.append(str(label).strip().lower())
            prompts.append(tuple(t.format(w) for t in templates for w in wordings))
        return PromptSet(
            name=str(data.get("name", path.stem)),
            labels=tuple(labels),
            prompts=tuple(prompts),
            positive_label=data.get("positive_label"),
            label_column=data.get("label_column"),
            source=str(path),
        )
    lines = [line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines()]
    labels = [line for line in lines if line]
    return PromptSet(
        name=path.stem,
        labels=tuple(label.lower() for label in labels),
        prompts=tuple(tuple(t.format(label) for t in DEFAULT_TEMPLATES) for label in labels),
        source=str(path),
    )


def class_embeddings(prompt_z: torch.Tensor, class_index: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Average prompt embeddings per class.

    Parameters
    ----------
    prompt_z : Tensor, shape (n_prompts, d)
        Prompt embeddings (any scale).
    class_index : LongTensor, shape (n_prompts,)
        Class of each prompt.
    n_classes : int
        Number of classes.

    Returns
    -------
    Tensor, shape (n_classes, d)
        ``normalize(mean_p normalize(prompt_z[p]))`` over the prompts of each class.
    """
    unit = torch.nn.functional.normalize(prompt_z.float(), dim=1)
    sums = torch.zeros(n_classes, unit.shape[1], dtype=unit.dtype).index_add_(0, class_index, unit)
    counts = torch.bincount(class_index, minlength=n_classes).clamp_min(1).to(unit.dtype)
    return torch.nn.functional.normalize(sums / counts[:, None], dim=1)


@dataclass(frozen=True)
class CaptionPairs:
    """Captions that differ only in the sensitive word.

    Attributes
    ----------
    groups : tuple of (str, str)
        The group each side of a pair belongs to, e.g. ``("male", "female")``.
    pairs : tuple of (str, str)
        ``(caption of groups[0], caption of groups[1])``.
    """

    groups: tuple[str, str]
    pairs: tuple[tuple[str, str], ...]


def load_caption_pairs(path: str | os.PathLike | None = None) -> CaptionPairs:
    """Read gendered caption pairs (JSON ``{"groups": [a, b], "pairs": [[cap_a, cap_b], ...]}``).

    Defaults to ``assets/bias_audit/gender_caption_pairs.json``.
    """
    path = Path(path) if path is not None else assets_dir() / "gender_caption_pairs.json"
    if not path.is_file():
        raise FileNotFoundError(f"caption pairs {path} not found; pass a JSON file with 'groups' and 'pairs'.")
    data = json.loads(path.read_text(encoding="utf-8"))
    groups = data.get("groups")
    pairs = data.get("pairs")
    if not (isinstance(groups, list) and len(groups) == 2):
        raise ValueError(f"caption pairs {path}: 'groups' must list the two groups, e.g. ['male', 'female'].")
    if not isinstance(pairs, list) or len(pairs) < 2 or any(len(p) != 2 for p in pairs):
        raise ValueError(f"caption pairs {path}: 'pairs' must be a list of at least 2 [caption_a, caption_b].")
    return CaptionPairs(groups=(str(groups[0]).lower(), str(groups[1]).lower()), pairs=tuple((a, b) for a, b in pairs))
