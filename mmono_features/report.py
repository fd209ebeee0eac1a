"""HTML and JSON reports of a scored dictionary: feature cards, MDS plots, metrics.

:func:`write_report` writes into one folder:

- ``report.html``: self-contained apart from the files beside it; every caption,
  name and path is HTML-escaped;
- ``summary.json``: counts per group, the grouping rule, dictionary metrics, the
  backbone and dictionary identities and the settings;
- ``report_files/``: the MDS plots (PNG) and thumbnails of the top-activating images.
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmono_features.backbone import resolve_device

logger = logging.getLogger(__name__)

GROUP_COLOURS = {"ImgD": "#d95f02", "TextD": "#1b9e77", "CrossD": "#7570b3", "rare": "#999999"}
THUMBNAIL_PX = 128


def write_report(
    store_path: str | Path,
    dictionary_path: str | Path,
    out: str | Path,
    scores_path: str | Path | None = None,
    top_m: int = 8,
    n_cards: int = 6,
    device: str = "cpu",
    title: str | None = None,
    extra: dict[str, Any] | None = None,
    name_features: bool = True,
    vocabulary: str | Path | None = None,
    checkpoint: str | Path | None = None,
) -> Path:
    """Write ``report.html``, ``summary.json`` and ``report_files/`` into ``out``.

    Parameters
    ----------
    store_path, dictionary_path : path
        A feature store and a dictionary trained on it.
    scores_path : path, optional
        A scores table; when absent the latents are scored with the default settings.
    top_m : int
        Top-activating images and captions shown on each feature card.
    n_cards : int
        Feature cards per group: the most image-dominant ImgD latents, the most
        text-dominant TextD latents and the most frequent CrossD latents.
    extra : dict, optional
        More fields for ``summary.json`` (and the settings table of the page).
    name_features : bool
        Name the latents of the cards by their nearest vocabulary entries, which needs
        the store's backbone (reloaded from its identity; ``checkpoint`` for a local
        file). When it cannot be loaded, the cards stay unnamed and a warning gives the reason.
    vocabulary : path, optional
        Word list, one entry per line; the bundled default when absent.

    Returns
    -------
    Path of ``report.html``.
    """
    from mmono_features.dictionary import evaluate_dictionary, load_dictionary
    from mmono_features.modality import Scores, encode_pairs, score_dictionary
    from mmono_features.store import FeatureStore

    if top_m <= 0 or n_cards <= 0:
        raise ValueError(f"top_m and n_cards must be positive; got top_m={top_m}, n_cards={n_cards}.")
    out = Path(out)
    files = out / "report_files"
    files.mkdir(parents=True, exist_ok=True)

    store = FeatureStore.open(store_path)
    dictionary = load_dictionary(dictionary_path, device=resolve_device(device))
    image_z = store.embeddings("image", normalize=False)
    text_z = store.embeddings("text", normalize=False)
    if scores_path is not None:
        scores = Scores.load(scores_path)
        scores.check_dictionary(dictionary)
    else:
        scores = score_dictionary(dictionary, image_z, text_z)
    metrics = evaluate_dictionary(dictionary, image_z, text_z)
    image_latents, text_latents = encode_pairs(dictionary, image_z, text_z)
    metadata = store.metadata()

    cards = _select_card_latents(scores.table, n_cards)
    if name_features:
        named = dict(zip(scores.table["latent"].astype(int), scores.table["name"].astype(str)))
        card_ids = [j for ids in cards.values() for j in ids if not named.get(j)]
        fill_names(scores, dictionary, store.backbone_identity, card_ids, vocabulary, checkpoint, device)
    card_html = []
    for group, latent_ids in cards.items():
        for latent in latent_ids:
            card_html.append(_feature_card(latent, scores.table, image_latents, text_latents, metadata, files, top_m))

    _plot_mds_histogram(scores.table, files / "mds_histogram.png")
    _plot_mds_vs_frequency(scores.table, files / "mds_frequency.png")

    counts = {group: int(n) for group, n in scores.table["group"].value_counts().items()}
    summary = {
        "title": title or "mmono report",
        "n_pairs": store.n_pairs,
        "n_skipped": len(store.skipped()),
        "backbone": store.backbone_identity,
        "dictionary": dictionary.config.to_dict(),
        "metrics": _to_builtin(metrics),
        "groups": counts,
        "rule": _to_builtin(scores.rule),
        "cards": {group: [int(j) for j in ids] for group, ids in cards.items()},
        **(extra or {}),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    page = _render_page(summary, metrics, card_html)
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    logger.info("wrote %s (%d feature cards)", path, len(card_html))
    return path


def fill_names(scores, dictionary, identity: dict, latent_ids, vocabulary=None, checkpoint=None, device="cpu") -> None:
    """Fill ``scores.table["name"]`` for ``latent_ids`` (all when None) from a vocabulary.

    The backbone is reloaded from ``identity``. When that fails, names stay empty and a
    warning gives the reason.
    """
    from mmono_features.backbone import BackboneLoadError, load_backbone_from_identity
    from mmono_features.interpret import embed_vocabulary, load_vocabulary, name_latents

    if latent_ids is not None and not latent_ids:
        return
    try:
        backbone = load_backbone_from_identity(identity, device=device, checkpoint=checkpoint)
    except (BackboneLoadError, ValueError, FileNotFoundError) as error:
        logger.warning("feature cards stay unnamed: the backbone %s could not be loaded (%s)", identity.get("name"), error)
        return
    if latent_ids is None:
        # A latent that never fires has no meaning to name.
        latent_ids = [int(j) for j in scores.table.loc[scores.table["n_active"] > 0, "latent"]]
    words = load_vocabulary(vocabulary)
    names = name_latents(dictionary, words, embed_vocabulary(backbone, words), latent_ids=latent_ids)
    table = scores.table.set_index("latent")
    table.loc[names["latent"], "name"] = names["name"].to_numpy()
    scores.table["name"] = table["name"].to_numpy()


def _select_card_latents(table, n_cards: int) -> dict[str, list[int]]:
    scored = table[table["group"] != "rare"]
    img = scored[scored["group"] == "ImgD"].sort_values("mds", ascending=False)
    txt = scored[scored["group"] == "TextD"].sort_values("mds", ascending=True)
    cross = scored[scored["group"] == "CrossD"].sort_values("frequency", ascending=False)
    return {
        "ImgD": [int(j) for j in img["latent"].head(n_cards)],
        "TextD": [int(j) for j in txt["latent"].head(n_cards)],
        "CrossD": [int(j) for j in cross["latent"].head(n_cards)],
    }


def _top_indices(activations: torch.Tensor, m: int) -> list[int]:
    # Only samples where the latent fires are shown, best first.
    values, indices = torch.topk(activations, min(m, activations.numel()))
    return [int(i) for v, i in zip(values, indices) if v > 0]


def _feature_card(latent, table, image_latents, text_latents, metadata, files: Path, top_m: int) -> str:
    row = table.loc[table["latent"] == latent].iloc[0]
    image_ids = _top_indices(image_latents[:, latent], top_m)
    text_ids = _top_indices(text_latents[:, latent], top_m)
    thumbs = []
    for i in image_ids:
        item = metadata.iloc[i]
        thumb = _thumbnail(Path(str(item["image"])), files, int(item["row"]))
        activation = float(image_latents[i, latent])
        if thumb is None:
            thumbs.append(f'<div class="missing">{html.escape(str(item["image"]))}</div>')
        else:
            thumbs.append(
                f'<figure><img src="report_files/{html.escape(thumb)}" alt="row {int(item["row"])}">'
                f'<figcaption title="activation on this image">a={activation:.2f}</figcaption></figure>'
            )
    captions = "".join(
        f"<li>{html.escape(str(metadata.iloc[i]['caption']))} <span class=act title=\"activation on this caption\">a={float(text_latents[i, latent]):.2f}</span></li>"
        for i in text_ids
    )
    name = str(row.get("name", "") or "")
    title = f"latent {int(latent)}" + (f": {html.escape(name)}" if name and name != "nan" else "")
    colour = GROUP_COLOURS.get(str(row["group"]), "#999")
    return (
        f'<div class="card" style="border-color:{colour}"><h3>{title}</h3>'
        f'<p><b style="color:{colour}">{html.escape(str(row["group"]))}</b> · MDS {row["mds"]:+.3f} '
        f"[{row['ci_low']:+.3f}, {row['ci_high']:+.3f}] · active on {int(row['n_active'])} pairs · "
        f"frequency {row['frequency']:.3f}</p>"
        f'<div class="thumbs">{"".join(thumbs) or "<i>fires on no image</i>"}</div>'
        f"<ol>{captions or '<i>fires on no caption</i>'}</ol></div>"
    )


def _thumbnail(path: Path, files: Path, row: int) -> str | None:
    from PIL import Image, UnidentifiedImageError

    name = f"row-{row}.jpg"
    target = files / name
    if target.is_file():
        return name
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            image.save(target, quality=85)
    except (OSError, UnidentifiedImageError, ValueError) as error:
        logger.warning("no thumbnail for %s: %s", path, error)
        return None
    return name


def _plot_mds_histogram(table, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.2))
    bins = np.linspace(-1, 1, 41)
    for group in ("ImgD", "CrossD", "TextD", "rare"):
        in_group = table["group"] == group
        values = table.loc[in_group, "mds"].dropna()
        label = f"{group} ({len(values)})"
        silent = int(in_group.sum()) - len(values)
        if silent:
            label = f"{group} ({len(values)}; {silent} never active, no MDS)"
        if len(values):
            axis.hist(values, bins=bins, alpha=0.75, label=label, color=GROUP_COLOURS[group])
    axis.set_xlabel("Modality Dominance Score (+1 image only, -1 text only)")
    axis.set_ylabel("latents")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_mds_vs_frequency(table, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.2))
    for group in ("ImgD", "CrossD", "TextD", "rare"):
        rows = table[(table["group"] == group) & table["mds"].notna() & (table["frequency"] > 0)]
        if len(rows):
            axis.scatter(rows["frequency"], rows["mds"], s=8, alpha=0.7, label=group, color=GROUP_COLOURS[group])
    axis.set_xscale("log")
    axis.set_xlabel("activation frequency (share of all image and text samples)")
    axis.set_ylabel("MDS")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _to_builtin(value):
    if isinstance(value, dict):
        return {str(k): _to_builtin(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_builtin(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value)
    if isinstance(value, (np.integer, int)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


def _metrics_table(metrics: dict[str, Any]) -> str:
    modalities = [key for key, value in metrics.items() if isinstance(value, dict)]
    if not modalities:
        return ""
    names = sorted({name for key in modalities for name in metrics[key]})
    head = "".join(f"<th>{html.escape(m)}</th>" for m in modalities)
    body = ""
    for name in names:
        cells = ""
        for modality in modalities:
            value = metrics[modality].get(name)
            cells += f"<td>{value:.4g}</td>" if isinstance(value, (int, float)) else "<td></td>"
        body += f"<tr><th>{html.escape(name)}</th>{cells}</tr>"
    return f"<table><tr><th>metric</th>{head}</tr>{body}</table>"


_RULE_LABELS = {
    "k": "k (multiple of the MDS standard deviation)",
    "mu": "mean MDS of scored latents",
    "sigma": "standard deviation of MDS",
    "min_active": "min_active (pairs)",
    "eps": "eps (silence threshold)",
}


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format_value(v) for v in value)
    return "" if value is None else str(value)


def _render_page(summary: dict[str, Any], metrics: dict[str, Any], cards: list[str]) -> str:
    title = html.escape(summary["title"])
    label = summary.get("weights_label")
    banner = f'<p class="banner">Weights: {html.escape(str(label))}</p>' if label else ""
    groups = "".join(f"<tr><th>{html.escape(g)}</th><td>{n}</td></tr>" for g, n in summary["groups"].items())
    rule = "".join(
        f"<tr><th>{html.escape(_RULE_LABELS.get(str(k), str(k)))}</th><td>{html.escape(_format_value(v))}</td></tr>"
        for k, v in summary["rule"].items()
        if not isinstance(v, dict)
    )
    settings = {k: v for k, v in summary.items() if k not in ("metrics", "groups", "rule", "cards", "title")}
    settings_rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td><code>{html.escape(json.dumps(v, default=str))}</code></td></tr>"
        for k, v in settings.items()
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1100px; }}
.banner {{ background: #fff3cd; border: 1px solid #e0b000; padding: .6em; font-weight: bold; }}
table {{ border-collapse: collapse; margin: .5em 0 1.5em; }} th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; }}
.card {{ border: 2px solid; border-radius: 6px; padding: .5em 1em; margin: 1em 0; }}
.thumbs {{ display: flex; flex-wrap: wrap; gap: 6px; }} figure {{ margin: 0; }} figure img {{ width: 96px; height: 96px; object-fit: cover; }}
figcaption, .act {{ font-size: 80%; color: #555; }} code {{ font-size: 80%; }}
</style></head><body>
<h1>{title}</h1>
{banner}
<p>{summary['n_pairs']} image-caption pairs ({summary['n_skipped']} skipped). A latent's Modality Dominance Score is the
mean over pairs of (p - q) / (p + q), where p and q are its activations on the image and on the caption: +1 fires only on
images, -1 only on captions.</p>
<h2>Groups</h2><table>{groups}</table>
<h2>Grouping rule</h2><table>{rule}</table>
<h2>MDS</h2><img src="report_files/mds_histogram.png" alt="MDS histogram per group">
<img src="report_files/mds_frequency.png" alt="MDS against activation frequency">
<h2>Dictionary metrics</h2>{_metrics_table(metrics)}
<h2>Feature cards</h2><p>Each card shows a latent's top-activating images and captions; a = the latent's activation on it.</p>
{''.join(cards) or '<p>No scored latents.</p>'}
<h2>Settings</h2><table>{settings_rows}</table>
</body></html>
"""
