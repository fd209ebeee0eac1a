"""``mmono demo``: extract, train, score and report on bundled data in one call.

Steps:

1. load the backbone, falling back to the offline model when its weights cannot be had;
2. choose the data: the bundled photographs, or generated shapes-world pairs;
3. extract embeddings into a store;
4. train a TopK dictionary;
5. score the Modality Dominance Score and group the latents;
6. write the report, labelled with what the weights are.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mmono_features.backbone import (
    DEFAULT_MODEL,
    DEFAULT_PRETRAINED,
    PROJECT_MODELS,
    Backbone,
    BackboneLoadError,
    assets_dir,
    load_backbone,
)

logger = logging.getLogger(__name__)

DATA_CHOICES = ("auto", "demo", "shapes")
FALLBACK_MODEL = "mmono-shapes"
SHAPES_DEMO_PAIRS = 1500


@dataclass(frozen=True)
class DemoConfig:
    """Settings of :func:`run_demo`; the CLI options of ``mmono demo`` map one to one."""

    out: Path = Path("mmono-demo")
    model: str = DEFAULT_MODEL
    pretrained: str | None = DEFAULT_PRETRAINED
    checkpoint: Path | None = None
    data: str = "auto"
    device: str = "auto"
    steps: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.data not in DATA_CHOICES:
            raise ValueError(f"data must be one of {DATA_CHOICES}; got {self.data!r}.")
        if self.steps <= 0:
            raise ValueError(f"steps must be positive; got {self.steps}.")


def weights_label(backbone: Backbone) -> str:
    """Return the label every demo output carries about what the weights are."""
    if backbone.random_weights:
        return "random weights"
    if backbone.name == "mmono-shapes":
        return "trained on the synthetic shapes world only"
    if backbone.pretrained:
        return f"pretrained ({backbone.pretrained})"
    return "local checkpoint"


def run_demo(config: DemoConfig, console=None) -> dict[str, Any]:
    """Run the whole chain and return the summary (also written to ``summary.json``)."""
    backbone = _load_backbone_or_fallback(config, console)
    manifest, data_name = _demo_manifest(config, backbone)
    store = _extract_store(config, backbone, manifest)
    dictionary_path = _train_dictionary(config, store)
    scores_path = _score(config, store, dictionary_path)
    return _write_outputs(config, backbone, data_name, store, dictionary_path, scores_path)


def _load_backbone_or_fallback(config: DemoConfig, console) -> Backbone:
    # Step 1.
    try:
        return load_backbone(config.model, config.pretrained, config.checkpoint, device=config.device)
    except BackboneLoadError as error:
        fallback = FALLBACK_MODEL if _fallback_available() else "mmono-tiny"
        message = (
            f"The weights of {config.model} ({config.pretrained or config.checkpoint}) could not be loaded: "
            f"{str(error).rstrip('.')}.\n\nThe demo continues with {fallback} "
            f"({PROJECT_MODELS[fallback].description}); its results say nothing about the requested model."
        )
        if console is not None:
            from rich.panel import Panel

            console.print(Panel(message, title="weights unavailable", border_style="bold yellow"))
        else:
            logger.warning(message)
        return load_backbone(fallback, device=config.device, seed=config.seed)


def _fallback_available() -> bool:
    try:
        return (assets_dir() / PROJECT_MODELS[FALLBACK_MODEL].weights).is_file()
    except FileNotFoundError:
        return False


def _demo_manifest(config: DemoConfig, backbone: Backbone) -> tuple[Path, str]:
    # Step 2. The shapes model was trained only on the shapes world, so by default it is shown
    # on that world, where its groups can mean something.
    data = config.data
    if data == "auto":
        data = "shapes" if backbone.name == FALLBACK_MODEL else "demo"
    if data == "demo":
        return assets_dir() / "demo" / "manifest.csv", "bundled photographs (assets/demo)"
    from mmono_features.shapes_world import write_shapes_dataset

    manifest = config.out / "shapes_data" / "manifest.csv"
    if not manifest.is_file():
        manifest = write_shapes_dataset(config.out / "shapes_data", n=SHAPES_DEMO_PAIRS, seed=config.seed)
    return manifest, f"{SHAPES_DEMO_PAIRS} generated shapes-world pairs (seed {config.seed})"


def _extract_store(config: DemoConfig, backbone: Backbone, manifest: Path):
    # Step 3.
    from mmono_features.extract import extract

    return extract(backbone, manifest, config.out / "store", batch_size=64, shard_size=1024, num_workers=0)


def _dictionary_size(d: int, n_pairs: int) -> tuple[int, int]:
    # A small data set cannot support a wide dictionary: keep d_sae near the number of
    # training embeddings (2 per pair) and at most 4 * d.
    d_sae = max(32, min(4 * d, 2 * n_pairs))
    k = max(4, min(16, d_sae // 16))
    return d_sae, k


def _train_dictionary(config: DemoConfig, store) -> Path:
    # Step 4.
    from mmono_features.dictionary import TopKConfig, TrainConfig, train_dictionary

    d_sae, k = _dictionary_size(store.d, store.n_pairs)
    dictionary_config = TopKConfig(kind="topk", d_in=store.d, d_sae=d_sae, k=k, backbone=store.backbone_identity, seed=config.seed)
    train_config = TrainConfig(
        n_steps=config.steps, batch_size=min(256, 2 * store.n_pairs), lr=1e-3, seed=config.seed, device=config.device
    )
    result = train_dictionary(store, dictionary_config, train_config)
    path = config.out / "dictionary"
    result.dictionary.save_pretrained(path)
    (path / "history.json").write_text(json.dumps(result.history, indent=1) + "\n", encoding="utf-8")
    return path


def _score(config: DemoConfig, store, dictionary_path: Path) -> Path:
    # Step 5. A demo set of a few dozen pairs cannot reach the default min_active of 20.
    from mmono_features.dictionary import load_dictionary
    from mmono_features.modality import score_dictionary

    dictionary = load_dictionary(dictionary_path)
    min_active = 20 if store.n_pairs >= 500 else 3
    scores = score_dictionary(
        dictionary,
        store.embeddings("image", normalize=False),
        store.embeddings("text", normalize=False),
        min_active=min_active,
        n_boot=500,
        seed=config.seed,
    )
    path = config.out / "scores.csv"
    scores.save(path)
    return path


def _write_outputs(config: DemoConfig, backbone: Backbone, data_name: str, store, dictionary_path: Path, scores_path: Path):
    # Step 6.
    from mmono_features.modality import Scores
    from mmono_features.report import write_report

    label = weights_label(backbone)
    # Names from a general English vocabulary mean nothing for a model that only saw
    # the shapes world, so its latents are named from that world's factor values.
    vocabulary = assets_dir() / "vocabulary" / "shapes_world.txt" if backbone.name == FALLBACK_MODEL else None
    report = write_report(
        config.out / "store",
        dictionary_path,
        config.out,
        scores_path=scores_path,
        device=config.device,
        title=f"mmono demo: {backbone.name} ({label})",
        extra={"weights_label": label, "data": data_name, "demo_settings": _jsonable(asdict(config))},
        vocabulary=vocabulary,
    )
    scores = Scores.load(scores_path)
    summary = json.loads((config.out / "summary.json").read_text(encoding="utf-8"))
    summary.update(
        {
            "report": str(report),
            "weights_label": label,
            "backbone": backbone.identity(),
            "groups": scores.table["group"].value_counts().to_dict(),
        }
    )
    return summary


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return {key: str(value) if isinstance(value, Path) else value for key, value in values.items()}
