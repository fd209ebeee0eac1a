"""Group-ablation check: zero-shot accuracy with each modality group removed.

For a labelled image set, class prompts are built from the ImageNet-style templates that
open_clip ships. Images and class-prompt embeddings go through the dictionary, and each
group (ImgD, TextD, CrossD) is zeroed in both before classifying by cosine similarity. The same is done for random latent sets of the same size, so that a drop
can be judged against removing that many latents at random.

Steps:

1. read the labelled images and embed them (bad files are skipped and counted);
2. embed the class prompts, averaged over templates;
3. classify with no edit, with each group removed, and with random sets removed;
4. tabulate accuracy with a bootstrap interval over images, and the random baseline's
   mean and 2.5-97.5 percentile interval over draws.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mmono_features.intervene import LatentEdit, intervene
from mmono_features.modality import GROUPS
from mmono_features.stats import bootstrap_ci

logger = logging.getLogger(__name__)


def default_templates() -> list[Callable[[str], str]]:
    """Return open_clip's short list of ImageNet prompt templates."""
    from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES

    return list(SIMPLE_IMAGENET_TEMPLATES)


@dataclass(frozen=True)
class LabelledEmbeddings:
    """Image embeddings of a labelled set and the class-prompt embeddings.

    Attributes
    ----------
    images : Tensor, shape (n_images, d), raw
    labels : LongTensor, shape (n_images,), index into ``class_names``
    class_embeddings : Tensor, shape (n_classes, d), raw (mean of normalised templates)
    class_names : list of str
    n_skipped : int
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_embeddings: torch.Tensor
    class_names: list[str]
    n_skipped: int


def embed_labelled_images(
    backbone,
    data_path: str | Path,
    templates: Sequence[Callable[[str], str]] | None = None,
    batch_size: int = 64,
    underscores_to_spaces: bool = True,
) -> LabelledEmbeddings:
    """Embed a labelled image folder or table and its zero-shot class prompts (steps 1-2)."""
    from mmono_features.data import read_labelled_images
    from mmono_features.images import ImageLoadError, load_image
    from mmono_features.progress import progress

    table = read_labelled_images(data_path, underscores_to_spaces=underscores_to_spaces)
    if "skip" in table:
        usable = table[table["skip"].isna()]
    else:
        usable = table
    class_names = sorted(usable["label"].astype(str).unique())
    if len(class_names) < 2:
        raise ValueError(f"{data_path} has {len(class_names)} class(es); zero-shot accuracy needs at least two.")
    index = {name: i for i, name in enumerate(class_names)}

    pixels, labels, skipped = [], [], len(table) - len(usable)
    for path, label in progress(zip(usable["image"], usable["label"]), total=len(usable), desc="images"):
        try:
            image = load_image(path)
        except ImageLoadError as error:
            logger.warning("skipped %s: %s", path, error)
            skipped += 1
            continue
        pixels.append(backbone.preprocess(image))
        labels.append(index[str(label)])
    if not pixels:
        raise ValueError(f"no readable image in {data_path}.")
    chunks = [backbone.encode_images(torch.stack(pixels[i : i + batch_size])).cpu() for i in range(0, len(pixels), batch_size)]

    templates = list(templates) if templates is not None else default_templates()
    class_embeddings = []
    for name in class_names:
        prompts = backbone.encode_texts([template(name) for template in templates]).cpu()
        prompts = prompts / prompts.norm(dim=1, keepdim=True)
        class_embeddings.append(prompts.mean(dim=0))
    if skipped:
        logger.warning("%d of %d labelled images were skipped", skipped, len(table))
    return LabelledEmbeddings(torch.cat(chunks), torch.tensor(labels), torch.stack(class_embeddings), class_names, skipped)


def zero_shot_correct(dictionary, data: LabelledEmbeddings, edit: LatentEdit) -> np.ndarray:
    """Return a boolean (n_images,) array: is each image classified correctly after ``edit``."""
    with torch.no_grad():
        images = intervene(dictionary, dictionary.prepare(data.images, "image"), edit)
        classes = intervene(dictionary, dictionary.prepare(data.class_embeddings, "text"), edit)
        images = images / images.norm(dim=1, keepdim=True).clamp_min(1e-12)
        classes = classes / classes.norm(dim=1, keepdim=True).clamp_min(1e-12)
        predictions = (images @ classes.T).argmax(dim=1)
    return (predictions == data.labels).numpy()


def group_ablation_table(
    dictionary,
    scores,
    data: LabelledEmbeddings,
    n_random: int = 10,
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Accuracy with no edit, each group removed, and random sets of each group's size (steps 3-4).

    Returns
    -------
    DataFrame with one row per condition: condition, n_latents, accuracy, ci_low,
    ci_high, random_mean, random_low, random_high (the random columns only for groups).
    """
    if n_random < 1:
        raise ValueError(f"n_random must be at least 1; got {n_random}.")
    generator = np.random.default_rng(seed)
    rows = []
    baseline = zero_shot_correct(dictionary, data, LatentEdit())
    low, high = bootstrap_ci(baseline.astype(float), n_boot=n_boot, seed=seed)
    rows.append({"condition": "none", "n_latents": 0, "accuracy": baseline.mean(), "ci_low": low, "ci_high": high})
    for group in GROUPS:
        latents = scores.latents(group).tolist()
        correct = zero_shot_correct(dictionary, data, LatentEdit.suppress(latents))
        low, high = bootstrap_ci(correct.astype(float), n_boot=n_boot, seed=seed)
        random_accuracy = []
        for _ in range(n_random):
            drawn = generator.choice(dictionary.d_sae, size=len(latents), replace=False).tolist()
            random_accuracy.append(zero_shot_correct(dictionary, data, LatentEdit.suppress(drawn)).mean())
        rows.append(
            {
                "condition": f"remove {group}",
                "n_latents": len(latents),
                "accuracy": correct.mean(),
                "ci_low": low,
                "ci_high": high,
                "random_mean": float(np.mean(random_accuracy)),
                "random_low": float(np.percentile(random_accuracy, 2.5)),
                "random_high": float(np.percentile(random_accuracy, 97.5)),
            }
        )
    return pd.DataFrame(rows)
