"""Side-by-side comparison of several dictionaries trained on one feature store.

:func:`compare_dictionaries` returns four tables, and :func:`write_comparison` writes
them as CSV, JSON and one HTML page:

- ``metrics``: reconstruction metrics per dictionary and modality;
- ``interpretability``: mean EmbSim with a bootstrap interval and WinRate against the
  random baseline, per dictionary, sample source and m;
- ``win_rates``: WinRate of each dictionary over each other one, per source and m;
- ``groups``: group sizes per dictionary with bootstrap intervals.
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from mmono_features.interpret import DEFAULT_M_SWEEP, interpretability_table, summarize_interpretability, win_rate

logger = logging.getLogger(__name__)


def compare_dictionaries(
    store,
    dictionary_paths: Sequence[str | Path],
    labels: Sequence[str] | None = None,
    ms: Sequence[int] = DEFAULT_M_SWEEP,
    sources: Sequence[str] = ("image", "text", "pooled"),
    min_active: int = 20,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, pd.DataFrame]:
    """Compare dictionaries on one store; see the module docstring for the tables.

    The reference space of EmbSim is the backbone's own normalised embeddings from the
    store, shared by every dictionary so that their EmbSim values are comparable.
    """
    from mmono_features.dictionary import evaluate_dictionary, load_dictionary
    from mmono_features.modality import encode_pairs, score_dictionary

    if len(dictionary_paths) < 1:
        raise ValueError("pass at least one dictionary folder.")
    labels = list(labels) if labels is not None else [Path(p).name for p in dictionary_paths]
    if len(labels) != len(dictionary_paths) or len(set(labels)) != len(labels):
        raise ValueError(f"labels must be unique and one per dictionary; got {labels}.")

    image_z = store.embeddings("image", normalize=False)
    text_z = store.embeddings("text", normalize=False)
    image_reference = store.embeddings("image", normalize=True)
    text_reference = store.embeddings("text", normalize=True)

    metrics_rows, interpretability_frames, group_frames, per_latent = [], [], [], {}
    for label, path in zip(labels, dictionary_paths):
        dictionary = load_dictionary(path)
        if dictionary.d_in != store.d:
            raise ValueError(f"dictionary {path} has d_in={dictionary.d_in} but the store has d={store.d}.")
        metrics = evaluate_dictionary(dictionary, image_z, text_z)
        for modality, values in metrics.items():
            if isinstance(values, dict):
                metrics_rows.append({"dictionary": label, "kind": dictionary.config.kind, "modality": modality, **values})
        image_latents, text_latents = encode_pairs(dictionary, image_z, text_z)
        table = interpretability_table(image_latents, text_latents, image_reference, text_reference, ms=ms, sources=sources, seed=seed)
        per_latent[label] = table
        summary = summarize_interpretability(table, n_boot=n_boot, seed=seed)
        summary.insert(0, "dictionary", label)
        interpretability_frames.append(summary)
        scores = score_dictionary(dictionary, image_z, text_z, min_active=min_active, n_boot=min(n_boot, 200), seed=seed)
        sizes = scores.group_sizes(n_boot=n_boot, seed=seed)
        sizes.insert(0, "dictionary", label)
        group_frames.append(sizes)

    win_rows = []
    for label_a in labels:
        for label_b in labels:
            if label_a == label_b:
                continue
            table_a, table_b = per_latent[label_a], per_latent[label_b]
            for (source, m), part_a in table_a.groupby(["source", "m"]):
                part_b = table_b[(table_b["source"] == source) & (table_b["m"] == m)]
                result = win_rate(
                    part_a["emb_sim"].to_numpy(),
                    part_b["emb_sim"].to_numpy(),
                    part_a["frequency"].to_numpy(),
                    part_b["frequency"].to_numpy(),
                    n_boot=n_boot,
                    seed=seed,
                )
                win_rows.append(
                    {
                        "a": label_a,
                        "b": label_b,
                        "source": source,
                        "m": int(m),
                        "win_rate": result.value,
                        "ci_low": result.ci_low,
                        "ci_high": result.ci_high,
                        "n_compared": result.n_compared,
                    }
                )
    return {
        "metrics": pd.DataFrame(metrics_rows),
        "interpretability": pd.concat(interpretability_frames, ignore_index=True),
        "win_rates": pd.DataFrame(win_rows),
        "groups": pd.concat(group_frames, ignore_index=True),
    }


def write_comparison(tables: dict[str, pd.DataFrame], out: str | Path, settings: dict | None = None) -> Path:
    """Write each table as ``<name>.csv``, all of them as ``comparison.json``, and ``comparison.html``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        table.to_csv(out / f"{name}.csv", index=False)
    payload = {name: json.loads(table.to_json(orient="records")) for name, table in tables.items()}
    payload["settings"] = settings or {}
    (out / "comparison.json").write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    sections = "".join(
        f"<h2>{html.escape(name)}</h2>{table.to_html(index=False, float_format=lambda x: f'{x:.4g}', escape=True)}"
        for name, table in tables.items()
    )
    settings_html = html.escape(json.dumps(settings or {}, indent=1, default=str))
    page = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>mmono comparison</title>'
        "<style>body{font-family:system-ui,sans-serif;margin:2em} table{border-collapse:collapse;margin-bottom:1.5em}"
        "td,th{border:1px solid #ccc;padding:2px 6px}</style></head><body><h1>Dictionary comparison</h1>"
        f"{sections}<h2>settings</h2><pre>{settings_html}</pre></body></html>\n"
    )
    path = out / "comparison.html"
    path.write_text(page, encoding="utf-8")
    return path
