"""Output files of a bias audit: ``audit.json``, ``metrics.csv`` and ``audit.html``.

The HTML page is self-contained: the chart is an embedded PNG (matplotlib, Agg
backend) and example images are embedded base64 JPEG thumbnails. Every string that
comes from the inputs (paths, labels, group names, latent names) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from apps.bias_audit.audit import AuditResult

logger = logging.getLogger(__name__)

__all__ = ["accuracy_chart_png", "audit_summary", "write_outputs"]

THUMBNAIL_PX = 96


def _clean(value: Any) -> Any:
    """Make a value JSON-safe: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return None if not math.isfinite(value) else value
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    return value


def _latent_rows(table: pd.DataFrame | None, scores: pd.DataFrame) -> list[dict]:
    if table is None:
        return []
    scores = scores.set_index("latent") if "latent" in scores.columns else scores
    rows = []
    for _, row in table.iterrows():
        latent = int(row["latent"])
        info = scores.loc[latent] if latent in scores.index else None
        name = info.get("name") if info is not None else None
        rows.append(
            {
                "latent": latent,
                "contrast": row["contrast"],
                "d": row["d"],
                "ci_low": row["ci_low"],
                "ci_high": row["ci_high"],
                "mean_a": row["mean_a"],
                "mean_b": row["mean_b"],
                "frequency": row["frequency"],
                "modality_group": None if info is None else info.get("group"),
                "mds": None if info is None else info.get("mds"),
                "name": None if name is None or (isinstance(name, float) and math.isnan(name)) or name == "" else str(name),
            }
        )
    return rows


def audit_summary(result: AuditResult) -> dict[str, Any]:
    """Return the content of ``audit.json`` as a dict (JSON-safe, NaN as null)."""
    cfg = result.config
    ablations = {}
    for ablation in result.ablations:
        entry = ablations.setdefault(
            ablation.name, {"group": ablation.group, "n_latents": len(ablation.latents), "draws": []}
        )
        if ablation.is_random:
            entry["draws"].append(list(ablation.latents))
        else:
            entry["latents"] = list(ablation.latents)
    summary = {
        "config": cfg.to_dict(),
        "backbone": result.backbone_identity,
        "dictionary": result.dictionary_config,
        "input": {
            "source": result.table.source,
            "layout": result.table.layout,
            "sensitive": result.table.sensitive,
            "n_rows": len(result.table),
            "group_counts": result.table.group_counts,
            "n_unknown": result.table.n_unknown,
            "unknown_values": result.table.raw_unknown_values,
            "n_images_used": int(len(result.predictions)),
            "n_skipped": len(result.skipped),
            "skipped": result.skipped,
        },
        "task": cfg.task,
        "prompt_set": result.prompt_set.to_dict(),
        "positive_labels": result.positive_labels,
        "ablate_from": cfg.ablate_from,
        "ablations": ablations,
        "metrics": {name: {label: gm.to_dict() for label, gm in by.items()} for name, by in result.metrics.items()},
        "random_draws": {
            name: [{label: gm.to_dict() for label, gm in draw.items()} for draw in draws]
            for name, draws in result.random_draws.items()
        },
        "associated_latents": {
            "image": _latent_rows(result.image_association.top if result.image_association else None, result.scores_table),
            "caption": _latent_rows(
                result.caption_association.top if result.caption_association else None, result.scores_table
            ),
            "examples": {str(k): v for k, v in result.latent_examples.items()},
            "group_distribution": {k: v.to_dict(orient="records") for k, v in result.distributions.items()},
        },
        "definitions": {
            "interval": f"percentile bootstrap, {cfg.n_boot} replicates, coverage {cfg.ci}; rows resampled within each "
            "sensitive group; random-ablation intervals pool the replicates of all draws",
            "disparities": "over the groups other than 'unknown'; a group whose rate is undefined is left out",
            "d": "(mean_a - mean_b) / pooled sd of the latent activation",
        },
    }
    return _clean(summary)


def accuracy_chart_png(result: AuditResult, label: str, metric: str = "accuracy") -> bytes:
    """Bar chart of ``metric`` per sensitive group for every ablation, with intervals (PNG bytes)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = list(result.metrics)
    groups = list(result.metrics["none"][label].by_group.index)
    width = 0.8 / max(1, len(groups))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(names) + 2), 3.4), dpi=100)
    x = np.arange(len(names))
    for g, group in enumerate(groups):
        values, lows, highs = [], [], []
        for name in names:
            row = result.metrics[name][label].by_group.loc[group]
            values.append(row[metric])
            lows.append(row[f"{metric}_low"])
            highs.append(row[f"{metric}_high"])
        values, lows, highs = (np.asarray(v, dtype=float) for v in (values, lows, highs))
        err = np.vstack([np.clip(values - lows, 0, None), np.clip(highs - values, 0, None)])
        err = np.nan_to_num(err)
        positions = x + (g - (len(groups) - 1) / 2) * width
        ax.bar(positions, np.nan_to_num(values), width, yerr=err, capsize=2, label=str(group))
        for position in positions[np.isnan(values)]:  # undefined, not zero
            ax.text(position, 0.02, "NaN", ha="center", va="bottom", rotation=90, fontsize=6, color="#555")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(f"{metric} ({label})")
    ax.set_ylim(0, 1.05)
    ax.legend(title="group", fontsize=7, title_fontsize=7, loc="upper right")
    ax.set_title(f"{metric} per group, after each ablation (95% intervals)", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _thumbnail_data_uri(path: str) -> str | None:
    from mmono_features.data import ImageLoadError, load_image

    try:
        image = load_image(path)
    except ImageLoadError as error:
        logger.warning("no thumbnail for %s: %s", path, error.reason)
        return None
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (float, np.floating)):
        return "NaN" if math.isnan(value) else f"{value:.3f}"
    return html.escape(str(value))


def _interval_cell(value, low, high, metric: str = "") -> str:
    if metric == "count":  # a fixed group size: no interval
        return str(int(value))
    return f"{_fmt(value)} <span class=ci>[{_fmt(low)}, {_fmt(high)}]</span>"


def _metrics_tables(result: AuditResult, label: str) -> str:
    from apps.bias_audit.metrics import DISPARITIES, GROUP_METRICS

    parts = []
    groups = list(result.metrics["none"][label].by_group.index)
    header = "".join(f"<th>{html.escape(m)}</th>" for m in GROUP_METRICS)
    for name, by_label in result.metrics.items():
        gm = by_label[label]
        rows = []
        for group in groups:
            row = gm.by_group.loc[group]
            cells = "".join(_interval_cell(row[m], row[f"{m}_low"], row[f"{m}_high"], m).join(("<td>", "</td>")) for m in GROUP_METRICS)
            rows.append(f"<tr><td>{html.escape(str(group))}</td>{cells}</tr>")
        o = gm.overall
        cells = "".join(_interval_cell(o[m], o[f"{m}_low"], o[f"{m}_high"], m).join(("<td>", "</td>")) for m in GROUP_METRICS)
        rows.append(f"<tr class=overall><td>all</td>{cells}</tr>")
        d = gm.disparities
        disparity = "; ".join(
            f"{html.escape(n.replace('_', ' '))}: {_interval_cell(d[n], d[f'{n}_low'], d[f'{n}_high'])}" for n in DISPARITIES
        )
        title = "no ablation" if name == "none" else f"ablated: {name}"
        if name.startswith("random:"):
            title += f" (mean of {len(result.random_draws.get(name, []))} draws)"
        parts.append(
            f"<h4>{html.escape(title)}</h4><table><tr><th>group</th>{header}</tr>{''.join(rows)}</table>"
            f"<p class=disp>{disparity}</p>"
        )
    return "\n".join(parts)


def _latent_table(rows: list[dict], examples: dict[str, list[str]], thumbs: dict[str, str | None]) -> str:
    if not rows:
        return "<p>none</p>"
    out = [
        "<table><tr><th>latent</th><th>name</th><th>contrast</th><th>d [95% interval]</th><th>mean a / b</th>"
        "<th>modality group</th><th>MDS</th><th>frequency</th><th>top images</th></tr>"
    ]
    for row in rows:
        images = "".join(
            f'<img src="{thumbs[p]}" alt="{html.escape(os.path.basename(p))}" title="{html.escape(p)}">'
            for p in examples.get(str(row["latent"]), [])
            if thumbs.get(p)
        )
        out.append(
            f"<tr><td>{row['latent']}</td><td>{_fmt(row['name'])}</td><td>{_fmt(row['contrast'])}</td>"
            f"<td>{_interval_cell(row['d'], row['ci_low'], row['ci_high'])}</td>"
            f"<td>{_fmt(row['mean_a'])} / {_fmt(row['mean_b'])}</td><td>{_fmt(row['modality_group'])}</td>"
            f"<td>{_fmt(row['mds'])}</td><td>{_fmt(row['frequency'])}</td><td>{images}</td></tr>"
        )
    out.append("</table>")
    return "".join(out)


def _distribution_table(records: list[dict]) -> str:
    rows = "".join(
        f"<tr><td>{_fmt(r['group'])}</td><td>{r['n_listed']}</td><td>{_fmt(r['share_listed'])}</td><td>{_fmt(r['share_all'])}</td></tr>"
        for r in records
    )
    return f"<table><tr><th>modality group</th><th>listed</th><th>share listed</th><th>share of all latents</th></tr>{rows}</table>"


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.4em 0 1em;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}.ci{color:#777;font-size:11px}
tr.overall{background:#fafafa;font-style:italic}.disp{font-size:13px}
img{margin:1px;border:1px solid #ddd;vertical-align:middle}.warn{color:#a33}
"""


def render_html(result: AuditResult, summary: dict[str, Any]) -> str:
    """Return the audit page."""
    cfg = result.config
    inp = summary["input"]
    counts = "".join(f"<tr><td>{html.escape(str(g))}</td><td>{n}</td></tr>" for g, n in inp["group_counts"].items())
    skipped = "".join(
        f"<li>row {s['row']}: {html.escape(s['path'])}: {html.escape(s['reason'])}</li>" for s in inp["skipped"]
    )

    paths = sorted({p for ps in result.latent_examples.values() for p in ps})
    thumbs = {p: _thumbnail_data_uri(p) for p in paths}
    examples = summary["associated_latents"]["examples"]

    sections = []
    for label in result.positive_labels:
        undefined = result.metrics["none"][label].undefined
        notes = "".join(
            f"<li class=warn>group {html.escape(g)}: {html.escape(m)} undefined (NaN)</li>" for g, m in undefined
        )
        any_accuracy = not result.metrics["none"][label].by_group["accuracy"].isna().all()
        metric = "accuracy" if any_accuracy else "selection_rate"
        chart = base64.b64encode(accuracy_chart_png(result, label, metric)).decode("ascii")
        sections.append(
            f"<h3>positive label: {html.escape(label)}</h3>"
            f'<img alt="{html.escape(metric)} per group and ablation" src="data:image/png;base64,{chart}">'
            f"<ul>{notes}</ul>{_metrics_tables(result, label)}"
        )

    distribution = "".join(
        f"<h4>{html.escape(name)} list</h4>{_distribution_table(records)}"
        for name, records in summary["associated_latents"]["group_distribution"].items()
    )
    title = f"Bias audit: {cfg.task} task, sensitive attribute {cfg.sensitive}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>Data: {html.escape(inp['source'])} (layout {html.escape(inp['layout'])}); model {html.escape(str(result.backbone_identity.get('name')))}
({_fmt(result.backbone_identity.get('pretrained'))}); dictionary {html.escape(str(cfg.dictionary))}
({html.escape(str(result.dictionary_config.get('kind')))}, d_sae={result.dictionary_config.get('d_sae')});
latents removed from: {html.escape(cfg.ablate_from)} embeddings; {cfg.n_random} random draws per group
(same size, drawn from the grouped latents);
intervals: {html.escape(summary['definitions']['interval'])}.</p>
<h2>Input</h2>
<table><tr><th>group</th><th>rows</th></tr>{counts}<tr class=overall><td>total</td><td>{inp['n_rows']}</td></tr></table>
<p>Images used: {inp['n_images_used']}; skipped: {inp['n_skipped']}.</p><ul>{skipped}</ul>
<h2>Zero-shot metrics per group</h2>
{''.join(sections)}
<h2>Latents associated with {html.escape(cfg.sensitive)}</h2>
<h3>On the audit images</h3>
{_latent_table(summary['associated_latents']['image'], examples, thumbs)}
<h3>On caption pairs</h3>
{_latent_table(summary['associated_latents']['caption'], examples, thumbs)}
<h3>Modality groups of the listed latents</h3>
{distribution}
</body></html>
"""


def _atomic_text(target: Path, text: str) -> None:
    # A temporary name in the same folder, then a rename: readers never see half a file.
    # Path.write_text keeps the usual permissions (mkstemp would make the file private).
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_outputs(result: AuditResult, out: str | os.PathLike) -> dict[str, str]:
    """Write ``audit.json``, ``metrics.csv`` and ``audit.html`` into ``out``; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = audit_summary(result)
    paths = {"json": out / "audit.json", "csv": out / "metrics.csv", "html": out / "audit.html"}
    _atomic_text(paths["json"], json.dumps(summary, indent=2, allow_nan=False) + "\n")
    _atomic_text(paths["csv"], result.metrics_frame().to_csv(index=False))
    _atomic_text(paths["html"], render_html(result, summary))
    logger.info("wrote %s, %s and %s", *paths.values())
    return {k: str(v) for k, v in paths.items()}
