"""Check Modality Dominance groups against the known factors of the shapes world.

The shapes world (:mod:`mmono_features.shapes_world`) has shared factors (drawn and
written), image-only factors (drawn, never written) and text-only factors (written,
never drawn). This module runs the whole mmono pipeline on it and reports which
group the latents tied to each kind of factor fall in:

1. generate pairs and write them as a manifest;
2. embed them with a backbone (``mmono-shapes`` by default) into a feature store;
3. train a TopK dictionary on the image and text embeddings;
4. score every latent's Modality Dominance Score and assign ImgD / TextD / CrossD;
5. relate each latent to the factors. For latent ``j``, factor ``f`` and modality ``m``,
   the association is the correlation ratio ``eta^2`` of the latent's activations on
   modality ``m`` grouped by the labels of ``f``. A latent's association with ``f`` is
   the larger of its two modalities. Its factor is the factor of largest association,
   provided it reaches ``min_association``;
6. for each factor type, report the share of its scored latents in each group, with
   bootstrap intervals over latents.

Beside the dictionary, a linear probe on the raw embeddings of each modality shows
which factors the backbone encodes at all (``probe.csv``). A factor the backbone drops
cannot have latents, whatever the dictionary does.

The hypothesis is shared -> CrossD, image_only -> ImgD, text_only -> TextD; the table
reports what the model encodes, whether or not that holds.

Command line: ``mmono shapes-truth --out runs/shapes-truth``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import typer

from mmono_features.fileio import json_safe
from mmono_features.shapes_world import FACTOR_TYPES, write_shapes_dataset

logger = logging.getLogger(__name__)

__all__ = ["ShapesTruthConfig", "ShapesTruthResult", "correlation_ratio", "linear_probe_accuracy", "register", "run_shapes_truth"]

FACTOR_KINDS = ("shared", "image_only", "text_only")
EXPECTED_GROUP = {"shared": "CrossD", "image_only": "ImgD", "text_only": "TextD"}
GROUP_ORDER = ("CrossD", "ImgD", "TextD")


@dataclass(frozen=True)
class ShapesTruthConfig:
    """Settings of :func:`run_shapes_truth`.

    Attributes
    ----------
    n_pairs : int
        Generated pairs (>= 50).
    seed : int
        Seed of the pairs, the dictionary and the bootstrap. The default differs from
        the seed of the pairs ``mmono-shapes`` was trained on (0), so the pairs are new
        to the model.
    d_sae, k : int
        Latents of the TopK dictionary and active latents per embedding.
    model : str
        Backbone name for :func:`mmono_features.backbone.load_backbone`.
    n_steps, batch_size, lr : int, int, float
        Dictionary training steps, embeddings per step and learning rate.
    min_association : float
        Smallest correlation ratio that ties a latent to a factor, in (0, 1].
    min_active : int
        Pairs a latent must be active on to get a group (else "rare").
    rule, group_k : str, float
        Grouping rule of :func:`mmono_features.modality.assign_groups` and its ``k``.
    n_boot : int
        Bootstrap replicates of the MDS intervals and of the shares.
    device : str
        Device of the backbone and the dictionary.
    """

    n_pairs: int = 4000
    seed: int = 2000
    d_sae: int = 256
    k: int = 8
    model: str = "mmono-shapes"
    n_steps: int = 1500
    batch_size: int = 1024
    lr: float = 1e-3
    min_association: float = 0.15
    min_active: int = 20
    rule: str = "std"
    group_k: float = 1.0
    n_boot: int = 1000
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name, low in (("n_pairs", 50), ("d_sae", 2), ("k", 1), ("n_steps", 1), ("batch_size", 2), ("n_boot", 1), ("min_active", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}; got {value!r}.")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer; got {self.seed!r}.")
        if self.k > self.d_sae:
            raise ValueError(f"k must not exceed d_sae; got k={self.k}, d_sae={self.d_sae}. Lower k or raise d_sae.")
        if not 0 < self.min_association <= 1:
            raise ValueError(f"min_association must be in (0, 1]; got {self.min_association!r}.")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive; got {self.lr!r}.")


@dataclass
class ShapesTruthResult:
    """Tables and report of one :func:`run_shapes_truth` run.

    Attributes
    ----------
    summary : DataFrame
        One row per (factor_type, group): ``factor_type, group, n_scored, count, share,
        ci_low, ci_high, expected``; written to ``shapes_truth.csv``.
    by_factor : DataFrame
        The same per factor (``factor`` column added); ``shapes_truth_factors.csv``.
    latents : DataFrame
        One row per latent: ``latent, mds, ci_low, ci_high, n_active, group, factor,
        factor_type, association, modality`` and ``eta2_<factor>`` for every factor;
        ``latents.csv``.
    probe : DataFrame
        One row per (factor, modality): ``factor, factor_type, modality, accuracy,
        chance``, the held-out accuracy of a linear probe on the normalised raw
        embeddings; ``probe.csv``.
    report : dict
        Settings, counts and file paths; ``shapes_truth.json``.
    """

    summary: pd.DataFrame
    by_factor: pd.DataFrame
    latents: pd.DataFrame
    probe: pd.DataFrame
    report: dict[str, Any]


def correlation_ratio(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Correlation ratio ``eta^2`` of each column of ``values`` grouped by ``labels``.

    ``eta^2 = sum_g n_g (mean_g - mean)^2 / sum_i (x_i - mean)^2``: the share of the
    variance of ``x`` explained by the group means, in [0, 1]. A column with zero
    variance gets 0.

    Parameters
    ----------
    values : ndarray, shape (n, m)
        One variable per column (here, a latent's activations over pairs).
    labels : ndarray, shape (n,)
        Group label of each row.

    Returns
    -------
    ndarray, shape (m,)
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or len(labels) != values.shape[0]:
        raise ValueError(f"values must be (n, m) with n = len(labels); got {values.shape} and {len(labels)} labels.")
    _, codes = np.unique(np.asarray(labels), return_inverse=True)
    n_groups = codes.max() + 1 if len(codes) else 0
    mean = values.mean(axis=0)
    counts = np.bincount(codes, minlength=n_groups).astype(np.float64)
    sums = np.zeros((n_groups, values.shape[1]))
    np.add.at(sums, codes, values)
    group_means = sums / counts[:, None]
    between = (counts[:, None] * (group_means - mean) ** 2).sum(axis=0)
    total = ((values - mean) ** 2).sum(axis=0)
    out = np.zeros(values.shape[1])
    nonzero = total > 1e-12 * max(1.0, float(np.abs(values).max(initial=0.0))) ** 2
    out[nonzero] = between[nonzero] / total[nonzero]
    return np.clip(out, 0.0, 1.0)


def linear_probe_accuracy(z: np.ndarray, labels: np.ndarray, seed: int = 0, test_fraction: float = 0.25, ridge: float = 1e-2) -> float:
    """Held-out accuracy of a linear probe that reads ``labels`` from ``z``.

    The probe is ridge regression onto one-hot labels (closed form, with a bias),
    fitted on a random ``1 - test_fraction`` of the rows and scored by argmax on the
    rest.

    Parameters
    ----------
    z : ndarray, shape (n, d)
        Embeddings.
    labels : ndarray, shape (n,)
        Class of each row (at least two classes).
    seed : int
        Seed of the train/test split.
    test_fraction : float
        Share of rows held out, in (0, 1).
    ridge : float
        L2 penalty of the regression, >= 0.

    Returns
    -------
    float
        Share of held-out rows whose class is predicted correctly.
    """
    z = np.asarray(z, dtype=np.float64)
    labels = np.asarray(labels)
    if z.ndim != 2 or len(labels) != len(z):
        raise ValueError(f"z must be (n, d) with n = len(labels); got {z.shape} and {len(labels)} labels.")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction!r}.")
    classes, codes = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"labels must have at least two classes; got {classes.tolist()}.")
    order = np.random.default_rng(seed).permutation(len(z))
    n_test = max(1, int(round(test_fraction * len(z))))
    test, train = order[:n_test], order[n_test:]

    features = np.hstack([z, np.ones((len(z), 1))])
    targets = np.eye(len(classes))[codes]
    gram = features[train].T @ features[train] + ridge * np.eye(features.shape[1])
    weights = np.linalg.solve(gram, features[train].T @ targets[train])
    predicted = (features[test] @ weights).argmax(axis=1)
    return float((predicted == codes[test]).mean())


def _probe(store, metadata: pd.DataFrame, seed: int) -> pd.DataFrame:
    rows = []
    for modality in ("image", "text"):
        z = store.embeddings(modality, normalize=True).numpy()
        for factor, factor_type in FACTOR_TYPES.items():
            labels = metadata[factor].astype(str).to_numpy()
            rows.append(
                {
                    "factor": factor,
                    "factor_type": factor_type,
                    "modality": modality,
                    "accuracy": linear_probe_accuracy(z, labels, seed=seed),
                    "chance": 1.0 / len(np.unique(labels)),
                }
            )
    return pd.DataFrame(rows)


def _associate(image_latents: np.ndarray, text_latents: np.ndarray, metadata: pd.DataFrame, min_association: float) -> pd.DataFrame:
    """Per latent: eta^2 with every factor (best modality), the best factor and its type."""
    columns: dict[str, Any] = {}
    best_modality: dict[str, np.ndarray] = {}
    for factor in FACTOR_TYPES:
        labels = metadata[factor].astype(str).to_numpy()
        eta_image = correlation_ratio(image_latents, labels)
        eta_text = correlation_ratio(text_latents, labels)
        columns[f"eta2_{factor}"] = np.maximum(eta_image, eta_text)
        best_modality[factor] = np.where(eta_image >= eta_text, "image", "text")
    eta = np.stack([columns[f"eta2_{f}"] for f in FACTOR_TYPES], axis=1)  # (d_sae, n_factors)
    factors = np.array(list(FACTOR_TYPES))
    best = eta.argmax(axis=1)
    association = eta[np.arange(len(best)), best]
    tied = association >= min_association
    table = pd.DataFrame(
        {
            "factor": np.where(tied, factors[best], ""),
            "factor_type": np.where(tied, [FACTOR_TYPES[f] for f in factors[best]], ""),
            "association": association,
            "modality": [best_modality[factors[b]][j] for j, b in enumerate(best)],
            **columns,
        }
    )
    return table


def _shares(latents: pd.DataFrame, key: str, keys: list[str], n_boot: int, seed: int) -> pd.DataFrame:
    """Share of each group among scored latents, per value of ``key``, with bootstrap intervals."""
    from mmono_features.stats import bootstrap_ci

    rows = []
    for value in keys:
        chosen = latents[(latents[key] == value) & latents["group"].isin(GROUP_ORDER)]
        groups = chosen["group"].to_numpy()
        for group in GROUP_ORDER:
            hits = (groups == group).astype(np.float64)
            if len(hits) == 0:
                share, low, high = np.nan, np.nan, np.nan
            else:
                share = float(hits.mean())
                low, high = bootstrap_ci(hits, np.mean, n_boot=n_boot, seed=seed) if len(hits) > 1 else (share, share)
            factor_type = value if key == "factor_type" else FACTOR_TYPES[value]
            rows.append(
                {
                    key: value,
                    "group": group,
                    "n_scored": int(len(hits)),
                    "count": int(hits.sum()),
                    "share": share,
                    "ci_low": float(low),
                    "ci_high": float(high),
                    "expected": EXPECTED_GROUP[factor_type] == group,
                }
            )
    return pd.DataFrame(rows)


def run_shapes_truth(
    out_dir: str | Path,
    n_pairs: int = 4000,
    seed: int = 2000,
    d_sae: int = 256,
    k: int = 8,
    **options: Any,
) -> ShapesTruthResult:
    """Run the pipeline on the shapes world and relate MDS groups to the known factors.

    Parameters
    ----------
    out_dir : str or Path
        Output folder: ``data/`` (images and manifest), ``store/``, ``dictionary/``,
        ``scores.csv``, ``latents.csv``, ``shapes_truth.csv``,
        ``shapes_truth_factors.csv`` and ``shapes_truth.json``.
    n_pairs, seed, d_sae, k
        See :class:`ShapesTruthConfig`.
    **options
        Other fields of :class:`ShapesTruthConfig` (``model``, ``n_steps``,
        ``min_association``, ``n_boot``, ...).

    Returns
    -------
    ShapesTruthResult
    """
    names = {f.name for f in dataclasses.fields(ShapesTruthConfig)} - {"n_pairs", "seed", "d_sae", "k"}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ValueError(f"unknown options {unknown}; valid options are {sorted(names)}.")
    config = ShapesTruthConfig(n_pairs=n_pairs, seed=seed, d_sae=d_sae, k=k, **options)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    store = _embed(out, config)
    dictionary, history = _train(store, config)
    dictionary.save_pretrained(out / "dictionary")
    scores, image_latents, text_latents = _score(dictionary, store, config)
    scores.save(out / "scores.csv")

    metadata = store.metadata()
    association = _associate(image_latents, text_latents, metadata, config.min_association)
    latents = pd.concat(
        [scores.table[["latent", "mds", "ci_low", "ci_high", "n_active", "group"]].reset_index(drop=True), association],
        axis=1,
    )
    summary = _shares(latents, "factor_type", list(FACTOR_KINDS), config.n_boot, config.seed)
    by_factor = _shares(latents, "factor", list(FACTOR_TYPES), config.n_boot, config.seed)
    by_factor.insert(1, "factor_type", [FACTOR_TYPES[f] for f in by_factor["factor"]])
    probe = _probe(store, metadata, config.seed)
    latents.to_csv(out / "latents.csv", index=False)
    summary.to_csv(out / "shapes_truth.csv", index=False)
    by_factor.to_csv(out / "shapes_truth_factors.csv", index=False)
    probe.to_csv(out / "probe.csv", index=False)

    report = _report(config, latents, summary, probe, scores, history, store, time.perf_counter() - start)
    (out / "shapes_truth.json").write_text(json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
    logger.info("shapes truth written to %s", out)
    return ShapesTruthResult(summary=summary, by_factor=by_factor, latents=latents, probe=probe, report=report)


def _embed(out: Path, config: ShapesTruthConfig):
    from mmono_features.backbone import load_backbone
    from mmono_features.extract import extract

    manifest = write_shapes_dataset(out / "data", config.n_pairs, config.seed)
    backbone = load_backbone(config.model, device=config.device, seed=config.seed)
    return extract(backbone, manifest, out / "store", batch_size=256, shard_size=4096, num_workers=0, overwrite=True)


def _train(store, config: ShapesTruthConfig):
    from mmono_features.dictionary import TrainConfig, make_config, train_dictionary

    dictionary_config = make_config("topk", d_in=store.d, d_sae=config.d_sae, k=config.k, seed=config.seed)
    train_config = TrainConfig(
        lr=config.lr,
        batch_size=min(config.batch_size, 2 * store.n_pairs),
        n_steps=config.n_steps,
        warmup_steps=min(100, config.n_steps // 10),
        seed=config.seed,
        device=config.device,
        log_every=max(1, config.n_steps // 5),
    )
    result = train_dictionary(store, dictionary_config, train_config)
    return result.dictionary, result.history


def _score(dictionary, store, config: ShapesTruthConfig):
    from mmono_features.modality import assign_groups, encode_pairs, modality_dominance

    image_latents, text_latents = encode_pairs(dictionary, store)
    table = modality_dominance(image_latents, text_latents, min_active=config.min_active, n_boot=config.n_boot, seed=config.seed)
    scores = assign_groups(table, rule=config.rule, k=config.group_k)
    return scores, image_latents.numpy(), text_latents.numpy()


def _report(config, latents, summary, probe, scores, history, store, seconds) -> dict[str, Any]:
    scored = latents["group"].isin(GROUP_ORDER)
    tied = latents["factor"] != ""
    diagonal = summary[summary["expected"]]
    last = history[-1] if history else {}
    return {
        "config": dataclasses.asdict(config),
        "factor_types": FACTOR_TYPES,
        "expected_group": EXPECTED_GROUP,
        "association": "correlation ratio eta^2 of a latent's activations grouped by a factor's labels, "
        "the larger of the image and text activations; a latent is tied to its factor of largest eta^2 "
        f"when it is >= {config.min_association}",
        "backbone": store.backbone_identity,
        "n_pairs": int(store.n_pairs),
        "n_latents": int(len(latents)),
        "n_scored": int(scored.sum()),
        "n_rare": int((latents["group"] == "rare").sum()),
        "n_tied": int((tied & scored).sum()),
        "n_untied": int((~tied & scored).sum()),
        "tied_per_factor": {f: int(((latents["factor"] == f) & scored).sum()) for f in FACTOR_TYPES},
        # Shows how far below the threshold the factors without tied latents stay.
        "max_association_per_factor": {f: float(latents.loc[scored, f"eta2_{f}"].max()) for f in FACTOR_TYPES},
        "group_counts": {g: int((latents["group"] == g).sum()) for g in (*GROUP_ORDER, "rare")},
        "group_rule": scores.rule,
        "expected_share": {row.factor_type: row.share for row in diagonal.itertuples()},
        "summary": summary.to_dict(orient="records"),
        "probe": probe.to_dict(orient="records"),
        "dictionary_final": last,
        "seconds": round(seconds, 1),
        "files": {
            "summary": "shapes_truth.csv",
            "by_factor": "shapes_truth_factors.csv",
            "latents": "latents.csv",
            "probe": "probe.csv",
            "scores": "scores.csv",
            "dictionary": "dictionary",
            "store": "store",
            "data": "data/manifest.csv",
        },
    }




def shapes_truth(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for the data, store, dictionary and tables."),
    n_pairs: int = typer.Option(4000, "--n-pairs", help="Generated image-caption pairs."),
    seed: int = typer.Option(2000, "--seed", help="Seed of the pairs, the dictionary and the bootstrap."),
    d_sae: int = typer.Option(256, "--d-sae", help="Latents of the TopK dictionary."),
    k: int = typer.Option(8, "--k", help="Active latents per embedding."),
    model: str = typer.Option("mmono-shapes", "--model", help="Backbone (a model trained on the shapes world)."),
    n_steps: int = typer.Option(1500, "--steps", help="Dictionary training steps."),
    min_association: float = typer.Option(0.15, "--min-association", help="Smallest eta^2 tying a latent to a factor."),
    n_boot: int = typer.Option(1000, "--n-boot", help="Bootstrap replicates."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda[:i], mps or auto."),
) -> None:
    """Relate MDS groups to the known shared, image-only and text-only factors of the shapes world."""
    from rich.console import Console

    console = Console(stderr=True)
    try:
        result = run_shapes_truth(
            out, n_pairs=n_pairs, seed=seed, d_sae=d_sae, k=k, model=model, n_steps=n_steps,
            min_association=min_association, n_boot=n_boot, device=device,
        )
    except (ValueError, FileNotFoundError) as error:
        console.print(f"[bold red]error:[/] {error}")
        raise typer.Exit(code=2) from None
    for row in result.summary[result.summary["expected"]].itertuples():
        console.print(
            f"{row.factor_type}: {row.count}/{row.n_scored} tied latents in {row.group} "
            f"(share {row.share:.2f}, 95% CI {row.ci_low:.2f}-{row.ci_high:.2f})"
        )
    console.print(f"[green]shapes truth[/] -> {Path(out) / 'shapes_truth.csv'}")


def register(app: typer.Typer) -> None:
    """Add the ``shapes-truth`` command to ``app``."""
    app.command(name="shapes-truth")(shapes_truth)
