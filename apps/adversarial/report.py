"""Files written by an adversarial evaluation: JSON, CSV, feature-shift tables and an HTML page.

Layout of the output folder:

- ``robustness.csv``: the results table (one row per attack, mode and model);
- ``robustness.json``: the run's settings, the same rows, the defense and the shift by group;
- ``defense.json``: the defense's latents and where they came from;
- ``feature_shift.csv`` and ``feature_shift_groups.csv``: per-latent and per-group shift
  of every attack; ``feature_shift_<i>.png``: one plot per attack;
- ``report.html``: a self-contained page with the table, the plots and example images
  (clean and adversarial, as base64 PNG) with their predictions.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from apps.adversarial.evaluate import EvaluationResult
from apps.adversarial.shift import ShiftResult, plot_shift

logger = logging.getLogger(__name__)

__all__ = ["write_results"]


def _clean_json(value: Any) -> Any:
    # JSON has no NaN: missing numbers become null.
    if isinstance(value, dict):
        return {str(k): _clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean_json(v) for v in value]
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return _clean_json(value.tolist())
    return value


def _png_base64(image: torch.Tensor, scale: int = 4) -> str:
    from PIL import Image

    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    picture = Image.fromarray(array)
    if scale > 1 and max(picture.size) < 128:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _write_shift(out: Path, shifts: Sequence[ShiftResult]) -> list[Path]:
    """Step helper: shift tables (all attacks in one CSV each) and one plot per attack."""
    if not shifts:
        return []
    latents = pd.concat([s.latents.assign(attack=s.attack) for s in shifts], ignore_index=True)
    groups = pd.concat([s.groups.assign(attack=s.attack) for s in shifts], ignore_index=True)
    latents.to_csv(out / "feature_shift.csv", index=False)
    groups.to_csv(out / "feature_shift_groups.csv", index=False)
    plots = [plot_shift(s, out / f"feature_shift_{i}.png") for i, s in enumerate(shifts)]
    return [out / "feature_shift.csv", out / "feature_shift_groups.csv", *plots]


def _examples_html(result: EvaluationResult, class_names: Sequence[str]) -> str:
    """Step helper: a grid of clean and adversarial examples with their predictions."""
    n = len(result.clean_images)
    if n == 0:
        return "<p>No example images were kept.</p>"

    def name(index: int) -> str:
        return html.escape(str(class_names[int(index)]))

    header = "<tr><th>image</th>" + "".join(
        f"<th>{html.escape(adv.key)}</th>" for adv in result.adversarial if len(adv.images)
    ) + "</tr>"
    rows = []
    for i in range(n):
        truth = name(result.labels[i])
        clean_preds = ", ".join(f"{html.escape(m)}: {name(p[i])}" for m, p in result.clean_predictions.items())
        cells = [
            f'<td><img src="data:image/png;base64,{_png_base64(result.clean_images[i])}" alt="clean image {i}"><br>'
            f"label: {truth}<br>clean, {clean_preds}</td>"
        ]
        for adv in result.adversarial:
            if i >= len(adv.images):
                continue
            preds = ", ".join(f"{html.escape(m)}: {name(p[i])}" for m, p in adv.predictions.items())
            cells.append(
                f'<td><img src="data:image/png;base64,{_png_base64(adv.images[i])}" alt="adversarial image {i}"><br>'
                f"{preds}</td>"
            )
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="examples">{header}{"".join(rows)}</table>'


def _results_html(table: pd.DataFrame) -> str:
    columns = table[["attack", "mode", "model", "accuracy", "ci_low", "ci_high", "success_rate", "mean_linf", "mean_l2"]]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns.columns)
    body = []
    for row in columns.itertuples(index=False):
        cells = []
        for value in row:
            if isinstance(value, float):
                cells.append("<td>–</td>" if math.isnan(value) else f"<td>{value:.3f}</td>")
            else:
                cells.append(f"<td>{html.escape(str(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _render_page(result: EvaluationResult, class_names: Sequence[str], settings: dict[str, Any], plots: list[Path]) -> str:
    images = "".join(
        f'<figure><img src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode("ascii")}" '
        f'alt="feature shift plot"><figcaption>{html.escape(p.name)}</figcaption></figure>'
        for p in plots
        if p.suffix == ".png"
    )
    settings_text = html.escape(json.dumps(_clean_json(settings), indent=2, default=str))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>mmono defend: robustness report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
td, th {{ border: 1px solid #ccc; padding: 0.3em 0.6em; font-size: 0.9em; vertical-align: top; }}
table.examples img {{ image-rendering: pixelated; }}
pre {{ background: #f5f5f5; padding: 1em; }}
</style></head><body>
<h1>Robustness of a zero-shot classifier with a feature-filter defense</h1>
<h2>Accuracy</h2>
<p>Accuracy with a bootstrap 95% interval over images; success rate is the share of
clean-correct images whose prediction becomes wrong. Non-adaptive attacks see the
undefended classifier only; adaptive attacks differentiate through the defense.</p>
{_results_html(result.table)}
<h2>Feature shift</h2>
{images or "<p>No feature-shift analysis (no dictionary).</p>"}
<h2>Examples</h2>
{_examples_html(result, class_names)}
<h2>Settings</h2>
<pre>{settings_text}</pre>
</body></html>
"""


def write_results(
    out_dir: str | Path,
    result: EvaluationResult,
    class_names: Sequence[str],
    settings: dict[str, Any],
    defense: Any | None = None,
    shifts: Sequence[ShiftResult] = (),
) -> dict[str, Path]:
    """Write the evaluation's files into ``out_dir`` (created if missing).

    Parameters
    ----------
    out_dir : str or Path
    result : EvaluationResult
        From :func:`apps.adversarial.evaluate.run_evaluation`.
    class_names : sequence of str
        Name of each class index, for the example captions.
    settings : dict
        Run settings recorded in ``robustness.json`` and on the page.
    defense : FeatureFilterDefense, optional
        Saved as ``defense.json``.
    shifts : sequence of ShiftResult
        Feature shift of each attack.

    Returns
    -------
    dict of str to Path
        Name -> path of each written file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}

    # Step 1: the results table.
    result.table.to_csv(out / "robustness.csv", index=False)
    written["csv"] = out / "robustness.csv"

    # Step 2: the defense and the feature shift.
    if defense is not None:
        written["defense"] = defense.save(out / "defense.json")
    shift_files = _write_shift(out, shifts)
    for path in shift_files:
        written[path.stem] = path

    # Step 3: JSON summary.
    summary = {
        "settings": settings,
        "class_names": list(class_names),
        "results": result.table.to_dict(orient="records"),
        "defense": defense.to_dict() if defense is not None else None,
        "feature_shift_by_group": {s.attack: s.groups.to_dict(orient="records") for s in shifts},
    }
    (out / "robustness.json").write_text(json.dumps(_clean_json(summary), indent=2, default=str) + "\n", encoding="utf-8")
    written["json"] = out / "robustness.json"

    # Step 4: HTML page.
    (out / "report.html").write_text(_render_page(result, class_names, settings, shift_files), encoding="utf-8")
    written["html"] = out / "report.html"
    logger.info("wrote %s", ", ".join(p.name for p in written.values()))
    return written
