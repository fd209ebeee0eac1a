"""The bias audit as one call: :func:`run_audit` with an :class:`AuditConfig`.

Steps (each a helper below):

1. load inputs: the audit table, the prompt set, the backbone, the dictionary, the scores;
2. embed: images (bad files are counted skips) and prompts, normalised as the dictionary
   was trained;
3. predict: zero-shot labels from cosine similarities;
4. metrics: fairlearn metrics per sensitive group, with stratified bootstrap intervals;
5. ablations: the same metrics after removing each modality group's latents, and random
   sets of the same size drawn from the grouped (ImgD, TextD, CrossD) latents;
6. latents: latents associated with the sensitive attribute on images and caption pairs;
7. write outputs: ``audit.json``, ``metrics.csv``, ``audit.html``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from apps.bias_audit.ablation import ABLATE_FROM, Ablation, random_latent_sets, zero_shot_logits
from apps.bias_audit.inputs import LAYOUTS, AuditTable, label_values, read_audit_table
from apps.bias_audit.latents import (
    Association,
    caption_association,
    group_distribution,
    image_association,
    latent_columns,
)
from apps.bias_audit.metrics import (
    DISPARITIES,
    GROUP_METRICS,
    UNKNOWN_GROUP,
    GroupMetrics,
    bootstrap_replicates,
    compute_group_metrics,
)
from apps.bias_audit.tasks import TASKS, CaptionPairs, PromptSet, default_prompt_set_path, load_caption_pairs, load_prompt_set
from mmono_features.backbone import DEFAULT_MODEL, DEFAULT_PRETRAINED

logger = logging.getLogger(__name__)

__all__ = ["AuditConfig", "AuditResult", "run_audit"]

MODALITY_GROUPS = ("ImgD", "TextD", "CrossD")


@dataclass(frozen=True)
class AuditConfig:
    """Settings of one audit; the CLI ``mmono bias-audit`` has an option for each.

    Parameters
    ----------
    data : path
        Audit table (CSV/TSV/JSONL, or a CelebA / FairFace label file with ``layout``).
    dictionary : path
        Dictionary checkpoint folder.
    scores : path
        Scores table of the dictionary (``.csv`` or ``.parquet``, from ``mmono score``).
    out : path
        Output folder.
    model, pretrained, checkpoint
        Backbone, as in :func:`mmono_features.backbone.load_backbone`.
    sensitive : str
        Sensitive column (``gender``, ``race``, ``age``, ...).
    task : {"gender", "attribute"}
        Zero-shot task.
    positive_labels : tuple of str
        Labels audited one-vs-rest; empty: the prompt set's ``positive_label``; ``("all",)``:
        every label.
    label_column : str, optional
        Column with the true labels; default: the prompt set's ``label_column`` if present.
    prompts : path, optional
        Prompt set replacing the shipped one of ``task``.
    caption_pairs : path, optional
        Caption pairs replacing ``assets/bias_audit/gender_caption_pairs.json``; used
        when the sensitive attribute is gender (or when given explicitly).
    layout : {"plain", "celeba", "fairface"}
    unknown : {"keep", "reject"}
        Treatment of missing sensitive values.
    image_root : path, optional
        Folder the image paths are relative to (default: the table's folder).
    ablate_from : {"image", "prompt", "both"}
    n_random : int
        Random latent sets per modality group, each of the group's size, drawn from the
        grouped latents (rare latents excluded).
    n_boot : int
        Bootstrap replicates of every interval.
    ci : float
        Interval coverage.
    top : int
        Number of associated latents listed.
    n_examples : int
        Example images shown per listed latent.
    device, precision, seed, batch_size
        Runtime settings.
    """

    data: str
    dictionary: str
    scores: str
    out: str
    model: str = DEFAULT_MODEL
    pretrained: str | None = DEFAULT_PRETRAINED
    checkpoint: str | None = None
    sensitive: str = "gender"
    task: str = "gender"
    positive_labels: tuple[str, ...] = ()
    label_column: str | None = None
    prompts: str | None = None
    caption_pairs: str | None = None
    layout: str = "plain"
    unknown: str = "keep"
    image_root: str | None = None
    ablate_from: str = "both"
    n_random: int = 5
    n_boot: int = 1000
    ci: float = 0.95
    top: int = 20
    n_examples: int = 4
    device: str = "auto"
    precision: str = "fp32"
    seed: int = 0
    batch_size: int = 64

    def __post_init__(self) -> None:
        for name in ("data", "dictionary", "scores", "out", "checkpoint", "prompts", "caption_pairs", "image_root"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, name, os.fspath(value))
        object.__setattr__(self, "positive_labels", tuple(str(p).strip().lower() for p in self.positive_labels))
        choices = {"task": TASKS, "layout": LAYOUTS, "unknown": ("keep", "reject"), "ablate_from": ABLATE_FROM}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}; got {getattr(self, name)!r}.")
        for name, low in (("n_random", 0), ("n_boot", 0), ("top", 1), ("n_examples", 0), ("batch_size", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}; got {value!r}.")
        if not 0 < self.ci < 1:
            raise ValueError(f"ci must be in (0, 1); got {self.ci!r}.")

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-serialisable dict."""
        data = dataclasses.asdict(self)
        data["positive_labels"] = list(self.positive_labels)
        return data


@dataclass
class AuditResult:
    """Everything an audit found; :mod:`apps.bias_audit.report` writes it out.

    Attributes
    ----------
    config : AuditConfig
    table : AuditTable
        The validated input (before image skips).
    prompt_set : PromptSet
    skipped : list of dict
        ``{"row", "path", "reason"}`` of every image that could not be used.
    predictions : pandas.DataFrame
        One row per loaded image: ``row``, ``image``, ``group``, ``y_true``, ``y_pred`` and one
        ``logit_<label>`` column of cosine logits per class.
    metrics : dict of str to dict of str to GroupMetrics
        ``metrics[ablation][positive_label]``, ablations ``none``, each modality group,
        and ``random:<group>`` (random draws pooled, see :attr:`random_draws`).
    random_draws : dict of str to list of GroupMetrics lists
        Per random baseline, the metrics of each draw (``{label: GroupMetrics}`` per draw).
    ablations : list of Ablation
    image_association, caption_association : Association or None
    distributions : dict of str to pandas.DataFrame
        Modality-group counts of the listed latents (``image`` and ``caption`` lists).
    latent_examples : dict of int to list of str
        Paths of the top-activating audit images of each listed latent.
    scores_table : pandas.DataFrame
    backbone_identity, dictionary_config : dict
    outputs : dict of str to str
        Paths written (``json``, ``csv``, ``html``).
    """

    config: AuditConfig
    table: AuditTable
    prompt_set: PromptSet
    skipped: list[dict]
    predictions: pd.DataFrame
    metrics: dict[str, dict[str, GroupMetrics]]
    random_draws: dict[str, list[dict[str, GroupMetrics]]]
    ablations: list[Ablation]
    image_association: Association | None
    caption_association: Association | None
    distributions: dict[str, pd.DataFrame]
    latent_examples: dict[int, list[str]]
    scores_table: pd.DataFrame
    backbone_identity: dict[str, Any] = field(default_factory=dict)
    dictionary_config: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)

    @property
    def positive_labels(self) -> list[str]:
        return list(self.metrics["none"])

    def metrics_frame(self) -> pd.DataFrame:
        """Long table of every metric: ablation, positive_label, scope, group, metric, value, ci_low, ci_high."""
        frames = [
            gm.to_frame(ablation=name, positive_label=label)[
                ["ablation", "positive_label", "scope", "group", "metric", "value", "ci_low", "ci_high"]
            ]
            for name, by_label in self.metrics.items()
            for label, gm in by_label.items()
        ]
        return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------- step 1


@dataclass
class _Inputs:
    table: AuditTable
    prompt_set: PromptSet
    positive_labels: list[str]
    y_true_all: list[str | None] | None
    caption_pairs: CaptionPairs | None
    backbone: Any
    dictionary: Any
    scores: Any


def _load_inputs(config: AuditConfig) -> _Inputs:
    """Step 1: read and check every input before any model work."""
    from mmono_features.backbone import load_backbone
    from mmono_features.dictionary import load_dictionary
    from mmono_features.modality import Scores

    table = read_audit_table(
        config.data, sensitive=config.sensitive, layout=config.layout, unknown=config.unknown, image_root=config.image_root
    )
    prompt_path = config.prompts or default_prompt_set_path(config.task)
    prompt_set = load_prompt_set(prompt_path)

    if config.positive_labels == ("all",):
        positive = list(prompt_set.labels)
    elif config.positive_labels:
        positive = list(config.positive_labels)
    elif prompt_set.positive_label:
        positive = [prompt_set.positive_label]
    else:
        raise ValueError(
            f"prompt set {prompt_path} names no positive_label; pass --positive-label with one of "
            f"{list(prompt_set.labels)} (or 'all')."
        )
    unknown_labels = [p for p in positive if p not in prompt_set.labels]
    if unknown_labels:
        raise ValueError(
            f"--positive-label {unknown_labels} not among the classes of {prompt_path}: {list(prompt_set.labels)}."
        )

    label_column = config.label_column or prompt_set.label_column
    y_true = None
    if label_column and label_column in table.frame.columns:
        y_true = label_values(table, label_column)
    elif config.label_column:
        raise ValueError(
            f"--label-column {config.label_column!r} not in {config.data}; columns are {list(table.frame.columns)}."
        )
    else:
        logger.warning(
            "no true labels (column %r absent): accuracy and true/false positive rates are NaN; "
            "selection rates are still audited.", label_column,
        )

    caption_pairs = None
    if config.caption_pairs is not None or config.sensitive == "gender":
        caption_pairs = load_caption_pairs(config.caption_pairs)

    dictionary = load_dictionary(config.dictionary)
    scores = Scores.load(config.scores)
    scores.check_dictionary(dictionary)
    backbone = load_backbone(
        config.model, pretrained=config.pretrained, checkpoint=config.checkpoint,
        device=config.device, precision=config.precision, seed=config.seed,
    )
    if backbone.embed_dim != dictionary.d_in:
        raise ValueError(
            f"dictionary d_in={dictionary.d_in} does not match {config.model!r} embed_dim={backbone.embed_dim}; "
            "pass the backbone the dictionary was trained on."
        )
    trained_on = dict(dictionary.config.backbone or {})
    identity = backbone.identity()
    if trained_on.get("name") and trained_on.get("name") != identity.get("name"):
        raise ValueError(
            f"the dictionary was trained on {trained_on.get('name')!r} embeddings, not {identity.get('name')!r}; "
            "pass --model with the dictionary's backbone."
        )
    if trained_on.get("checkpoint_sha256") and trained_on.get("checkpoint_sha256") != identity.get("checkpoint_sha256"):
        logger.warning("the backbone weights differ from those the dictionary was trained on (checkpoint hash).")
    dictionary = dictionary.to(backbone.device).eval()
    return _Inputs(table, prompt_set, positive, y_true, caption_pairs, backbone, dictionary, scores)


# --------------------------------------------------------------------------- step 2


@dataclass
class _Embeddings:
    image_z: torch.Tensor  # (n_kept, d_in), normalised for the dictionary
    kept_positions: np.ndarray  # (n_kept,) positions in table.frame of the loaded images
    skipped: list[dict]
    prompt_z: torch.Tensor  # (n_prompts, d_in), normalised
    class_index: torch.Tensor  # (n_prompts,)


def _embed(inputs: _Inputs, config: AuditConfig) -> _Embeddings:
    """Step 2: embed images (counted skips) and prompts."""
    from mmono_features.data import ImageLoadError, load_image
    from mmono_features.progress import progress

    backbone, dictionary = inputs.backbone, inputs.dictionary
    frame = inputs.table.frame
    skipped: list[dict] = []
    chunks, kept_positions = [], []
    batch, batch_positions = [], []

    def flush() -> None:
        if batch:
            pixels = torch.stack(batch).to(backbone.device)
            chunks.append(backbone.encode_images(pixels).float().cpu())
            kept_positions.extend(batch_positions)
            batch.clear()
            batch_positions.clear()

    for position, (row, path) in progress(
        enumerate(zip(frame["row"].tolist(), frame["image"].tolist())), total=len(frame), desc="embed images"
    ):
        try:
            if not path:
                raise ImageLoadError("image path is empty", path)
            image = load_image(path)
        except ImageLoadError as error:
            skipped.append({"row": int(row), "path": str(path), "reason": error.reason})
            continue
        batch.append(backbone.preprocess(image))
        batch_positions.append(position)
        if len(batch) == config.batch_size:
            flush()
    flush()
    if skipped:
        logger.warning("skipped %d of %d images that could not be loaded (listed in audit.json).", len(skipped), len(frame))
    if not kept_positions:
        raise ValueError(f"none of the {len(frame)} images of {config.data} could be loaded; see the skip reasons.")

    raw_images = torch.cat(chunks)
    texts, class_index = inputs.prompt_set.flat_prompts()
    raw_prompts = torch.cat(
        [backbone.encode_texts(texts[i : i + config.batch_size]).float().cpu() for i in range(0, len(texts), config.batch_size)]
    )
    with torch.no_grad():
        image_z = dictionary.prepare(raw_images.to(backbone.device), "image").float().cpu()
        prompt_z = dictionary.prepare(raw_prompts.to(backbone.device), "text").float().cpu()
    return _Embeddings(image_z, np.asarray(kept_positions, dtype=np.int64), skipped, prompt_z, class_index)


# --------------------------------------------------------------------------- step 3


def _predict(inputs: _Inputs, emb: _Embeddings, latents: tuple[int, ...], ablate_from: str) -> np.ndarray:
    """Step 3: zero-shot labels (n_kept,) after removing ``latents``."""
    labels = np.asarray(inputs.prompt_set.labels, dtype=object)
    logits = zero_shot_logits(
        inputs.dictionary, emb.image_z, emb.prompt_z, emb.class_index, len(labels),
        latents=latents, ablate_from=ablate_from,
    )
    return labels[logits.argmax(1).numpy()]


def _predictions_frame(inputs: _Inputs, emb: _Embeddings, y_true, y_pred) -> pd.DataFrame:
    frame = inputs.table.frame.iloc[emb.kept_positions][["row", "image", "group"]].reset_index(drop=True)
    frame["y_true"] = y_true
    frame["y_pred"] = y_pred
    logits = zero_shot_logits(None, emb.image_z, emb.prompt_z, emb.class_index, len(inputs.prompt_set.labels))
    for c, label in enumerate(inputs.prompt_set.labels):
        frame[f"logit_{label}"] = logits[:, c].numpy()
    return frame


# --------------------------------------------------------------------------- step 4


def _metrics(y_true, y_pred, groups, labels: list[str], replicates, config: AuditConfig, warn: bool) -> dict[str, GroupMetrics]:
    """Step 4: fairlearn metrics of one set of predictions, for each positive label."""
    return {
        label: compute_group_metrics(y_true, y_pred, groups, label, replicates=replicates, ci=config.ci, warn=warn)
        for label in labels
    }


# --------------------------------------------------------------------------- step 5


def _ablations(inputs: _Inputs, config: AuditConfig) -> list[Ablation]:
    """Step 5a: the latent sets to remove (each modality group, then random sets)."""
    out = []
    for group in MODALITY_GROUPS:
        latents = tuple(int(i) for i in inputs.scores.latents(group).tolist())
        if not latents:
            logger.warning("modality group %s has no latents in %s; its ablation equals the baseline.", group, config.scores)
        out.append(Ablation(name=group, latents=latents, group=group))
    # Random sets come from the grouped (non-rare) latents: most rare latents are silent,
    # and removing silent latents changes nothing.
    # NOTE: a group that contains most grouped latents (often CrossD) overlaps its own random
    # sets heavily, so its random baseline is close to the group ablation itself.
    pool = sorted(i for ablation in out for i in ablation.latents)
    for group_ablation in list(out):
        size = len(group_ablation.latents)
        if size == 0:
            continue
        draws = random_latent_sets(inputs.dictionary.d_sae, size, config.n_random, config.seed, pool=pool)
        for draw, latents in enumerate(draws):
            out.append(Ablation(name=f"random:{group_ablation.group}", latents=latents, group=group_ablation.group, draw=draw))
    return out


def _pool_draws(draws: list[dict[str, GroupMetrics]], ci: float) -> dict[str, GroupMetrics]:
    """Mean of the draws' point estimates; interval over the pooled bootstrap replicates of all draws."""
    pooled = {}
    alpha = (1 - ci) / 2

    def interval(values: list[np.ndarray]) -> tuple[float, float]:
        samples = np.concatenate(values) if values else np.empty(0)
        samples = samples[~np.isnan(samples)]
        if samples.size == 0:
            return float("nan"), float("nan")
        low, high = np.quantile(samples, [alpha, 1 - alpha])
        return float(low), float(high)

    def mean(values: list[float]) -> float:
        values = np.asarray(values, dtype=float)
        return float(np.nanmean(values)) if (~np.isnan(values)).any() else float("nan")

    for label in draws[0]:
        runs = [d[label] for d in draws]
        by_group = runs[0].by_group.copy()
        for group in by_group.index:
            for metric in GROUP_METRICS:
                by_group.loc[group, metric] = mean([r.by_group.loc[group, metric] for r in runs])
                low, high = interval([r.samples.get((group, metric), np.empty(0)) for r in runs])
                by_group.loc[group, f"{metric}_low"], by_group.loc[group, f"{metric}_high"] = low, high
        overall, disparities = {}, {}
        for metric in GROUP_METRICS:
            overall[metric] = mean([r.overall[metric] for r in runs])
            overall[f"{metric}_low"], overall[f"{metric}_high"] = interval([r.samples.get(("all", metric), np.empty(0)) for r in runs])
        for name in DISPARITIES:
            disparities[name] = mean([r.disparities[name] for r in runs])
            disparities[f"{name}_low"], disparities[f"{name}_high"] = interval(
                [r.samples.get(("between_groups", name), np.empty(0)) for r in runs]
            )
        pooled[label] = GroupMetrics(label, by_group, overall, disparities, undefined=list(runs[0].undefined))
    return pooled


def _run_ablations(inputs, emb, ablations, y_true, groups, labels, replicates, config):
    """Step 5b: metrics after each ablation; random draws pooled per group."""
    from mmono_features.progress import progress

    metrics: dict[str, dict[str, GroupMetrics]] = {}
    draws: dict[str, list[dict[str, GroupMetrics]]] = {}
    for ablation in progress(ablations, total=len(ablations), desc="ablations"):
        y_pred = _predict(inputs, emb, ablation.latents, config.ablate_from)
        result = _metrics(y_true, y_pred, groups, labels, replicates, config, warn=False)
        if ablation.is_random:
            draws.setdefault(ablation.name, []).append(result)
        else:
            metrics[ablation.name] = result
    for name, runs in draws.items():
        metrics[name] = _pool_draws(runs, config.ci)
    return metrics, draws


# --------------------------------------------------------------------------- step 6


def _encoded_blocks(dictionary, z: torch.Tensor, batch_size: int = 4096):
    """Return a callable yielding the latents of ``z`` (n, d_in) as numpy blocks (n_block, d_sae)."""
    device = next(iter(dictionary.parameters()), torch.empty(0)).device

    def blocks():
        with torch.no_grad():
            for start in range(0, len(z), batch_size):
                yield dictionary.encode(z[start : start + batch_size].to(device)).float().cpu().numpy()

    return blocks


def _latents(inputs: _Inputs, emb: _Embeddings, groups: np.ndarray, config: AuditConfig):
    """Step 6: associated latents on images and caption pairs, their groups and example images."""
    dictionary = inputs.dictionary
    image_blocks = _encoded_blocks(dictionary, emb.image_z)
    known = sorted({g for g in groups.tolist() if g != UNKNOWN_GROUP})
    image_assoc = None
    if len(known) >= 2:
        image_assoc = image_association(
            image_blocks, groups, top=config.top, n_boot=config.n_boot, ci=config.ci, seed=config.seed,
            min_active=min(5, max(1, len(groups) // 10)),
        )
    else:
        logger.warning("only %d known sensitive group(s) among the loaded images; no image association.", len(known))

    caption_assoc = None
    if inputs.caption_pairs is not None:
        pairs = inputs.caption_pairs
        sides = []
        for side in ([a for a, _ in pairs.pairs], [b for _, b in pairs.pairs]):
            with torch.no_grad():
                raw = inputs.backbone.encode_texts(side).float()
                z = dictionary.prepare(raw.to(next(iter(dictionary.parameters())).device), "text")
            sides.append(np.concatenate(list(_encoded_blocks(dictionary, z)())))
        caption_assoc = caption_association(
            sides[0], sides[1], groups=pairs.groups, top=config.top, n_boot=config.n_boot, ci=config.ci, seed=config.seed,
        )

    table = inputs.scores.table.set_index("latent")
    group_of = table["group"]
    distributions = {}
    listed_all: list[int] = []
    for name, assoc in (("image", image_assoc), ("caption", caption_assoc)):
        if assoc is None:
            continue
        listed = assoc.top["latent"].drop_duplicates().to_numpy()
        distributions[name] = group_distribution(listed, group_of, group_of)
        listed_all.extend(int(i) for i in listed if int(i) not in listed_all)
    examples: dict[int, list[str]] = {}
    if listed_all and config.n_examples:
        paths = inputs.table.frame["image"].to_numpy()[emb.kept_positions]
        columns = latent_columns(image_blocks, np.asarray(listed_all))
        for j, latent in enumerate(listed_all):
            order = np.argsort(-columns[:, j], kind="stable")[: config.n_examples]
            examples[latent] = [str(paths[i]) for i in order if columns[i, j] > 0]
    return image_assoc, caption_assoc, distributions, examples


# --------------------------------------------------------------------------- entry


def run_audit(config: AuditConfig) -> AuditResult:
    """Run the whole audit and write ``audit.json``, ``metrics.csv`` and ``audit.html``.

    Parameters
    ----------
    config : AuditConfig

    Returns
    -------
    AuditResult
        With ``outputs`` naming the files written.
    """
    from apps.bias_audit.report import write_outputs

    torch.manual_seed(config.seed)
    # 1. load inputs
    inputs = _load_inputs(config)
    # 2. embed
    emb = _embed(inputs, config)
    groups = inputs.table.frame["group"].to_numpy(dtype=object)[emb.kept_positions]
    y_true = None if inputs.y_true_all is None else [inputs.y_true_all[i] for i in emb.kept_positions]
    # 3. predict
    y_pred = _predict(inputs, emb, (), config.ablate_from)
    # 4. metrics
    replicates = bootstrap_replicates(groups, n_boot=config.n_boot, seed=config.seed)
    metrics = {"none": _metrics(y_true, y_pred, groups, inputs.positive_labels, replicates, config, warn=True)}
    # 5. ablations
    ablations = _ablations(inputs, config)
    ablated, draws = _run_ablations(inputs, emb, ablations, y_true, groups, inputs.positive_labels, replicates, config)
    metrics.update(ablated)
    # 6. latents
    image_assoc, caption_assoc, distributions, examples = _latents(inputs, emb, groups, config)
    result = AuditResult(
        config=config,
        table=inputs.table,
        prompt_set=inputs.prompt_set,
        skipped=emb.skipped,
        predictions=_predictions_frame(inputs, emb, y_true, y_pred),
        metrics=metrics,
        random_draws=draws,
        ablations=ablations,
        image_association=image_assoc,
        caption_association=caption_assoc,
        distributions=distributions,
        latent_examples=examples,
        scores_table=inputs.scores.table,
        backbone_identity=inputs.backbone.identity(),
        dictionary_config=inputs.dictionary.config.to_dict(),
    )
    # 7. write outputs
    result.outputs = write_outputs(result, config.out)
    return result
