"""Drawn figures with a known attribute signal, for the shipped audit set and the tests.

Each figure is a simple person drawing whose assigned group is visible through one
cue: figures of the group ``female`` wear a triangular dress and long hair, figures
of the group ``male`` trousers (two leg strokes) and short hair. A second cue is a
planted spurious correlation: the shirt is red for ``female`` figures and blue for
``male`` figures with probability ``colour_bias`` (else the other colour). The
occupation cue is independent of the group: ``doctor`` figures carry a red cross on a
white coat, ``chef`` figures a white hat.

These images carry no real demographic content: they only let the audit run end to
end offline with a signal whose truth is known.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

__all__ = ["draw_figure", "write_synthetic_audit_set"]

_SKIN = [(241, 194, 125), (224, 172, 105), (198, 134, 66), (141, 85, 36)]
_RED, _BLUE = (200, 40, 40), (40, 70, 200)


def draw_figure(group: str, occupation: str, rng: np.random.Generator, size: int = 64, colour_bias: float = 0.8) -> Image.Image:
    """Draw one figure.

    Parameters
    ----------
    group : {"female", "male"}
        Decides the dress/trousers and hair cue.
    occupation : {"doctor", "chef"}
        Decides the red cross or the chef's hat.
    rng : numpy.random.Generator
        Draws the skin tone, the background, the jitter and the shirt colour.
    size : int
        Side of the square image in pixels.
    colour_bias : float
        Probability that the shirt colour follows the group (red for female).

    Returns
    -------
    PIL.Image.Image, mode RGB, size (size, size)
    """
    if group not in ("female", "male"):
        raise ValueError(f"group must be 'female' or 'male'; got {group!r}.")
    if occupation not in ("doctor", "chef"):
        raise ValueError(f"occupation must be 'doctor' or 'chef'; got {occupation!r}.")
    scale = 4  # drawn large, then reduced: smooth edges
    s = size * scale
    background = tuple(int(v) for v in rng.integers(170, 250, size=3))
    image = Image.new("RGB", (s, s), background)
    draw = ImageDraw.Draw(image)
    cx = s * (0.5 + rng.uniform(-0.06, 0.06))
    top = s * (0.12 + rng.uniform(-0.03, 0.03))
    head = s * 0.1
    skin = _SKIN[int(rng.integers(len(_SKIN)))]
    follows = rng.random() < colour_bias
    group_colour, other_colour = (_RED, _BLUE) if group == "female" else (_BLUE, _RED)
    shirt = group_colour if follows else other_colour
    if occupation == "doctor":
        shirt = (245, 245, 245)  # white coat; the group colour shows on the sleeves below
    hair = tuple(int(v) for v in rng.integers(20, 110, size=3))
    # hair behind the head: long for female, short cap for male
    if group == "female":
        draw.rectangle([cx - head * 1.15, top + head * 0.6, cx + head * 1.15, top + head * 2.6], fill=hair)
    draw.ellipse([cx - head, top, cx + head, top + 2 * head], fill=skin)
    draw.chord([cx - head * 1.05, top - head * 0.1, cx + head * 1.05, top + head * 1.3], 180, 360, fill=hair)
    body_top, body_bottom = top + 2.1 * head, top + 5.2 * head
    draw.rectangle([cx - head * 1.2, body_top, cx + head * 1.2, body_bottom], fill=shirt)
    sleeve = _RED if (group == "female") == follows else _BLUE
    width = max(2, int(s * 0.03))
    draw.line([cx - head * 1.2, body_top + head * 0.3, cx - head * 2.2, body_top + head * 2.2], fill=sleeve, width=width * 2)
    draw.line([cx + head * 1.2, body_top + head * 0.3, cx + head * 2.2, body_top + head * 2.2], fill=sleeve, width=width * 2)
    if group == "female":
        draw.polygon([(cx - head * 1.2, body_bottom), (cx + head * 1.2, body_bottom), (cx + head * 2.1, s * 0.86), (cx - head * 2.1, s * 0.86)], fill=shirt)
        leg_top = s * 0.86
    else:
        leg_top = body_bottom
    draw.line([cx - head * 0.6, leg_top, cx - head * 0.8, s * 0.97], fill=(40, 40, 40), width=width * 2)
    draw.line([cx + head * 0.6, leg_top, cx + head * 0.8, s * 0.97], fill=(40, 40, 40), width=width * 2)
    if occupation == "doctor":
        arm = head * 0.45
        mx, my = cx, body_top + head * 1.4
        draw.rectangle([mx - arm, my - arm / 3, mx + arm, my + arm / 3], fill=(220, 0, 0))
        draw.rectangle([mx - arm / 3, my - arm, mx + arm / 3, my + arm], fill=(220, 0, 0))
    else:
        draw.rectangle([cx - head * 0.8, top - head * 1.1, cx + head * 0.8, top + head * 0.2], fill=(252, 252, 252), outline=(90, 90, 90))
    return image.resize((size, size), Image.BOX)


def write_synthetic_audit_set(
    out_dir: str | os.PathLike,
    n: int = 40,
    seed: int = 0,
    size: int = 64,
    colour_bias: float = 0.8,
    subfolder: str = "synthetic",
    n_unknown: int = 0,
) -> list[dict[str, str]]:
    """Write ``n`` drawn figures and return their table rows.

    Groups and occupations are balanced (each of the four combinations gets ``n / 4``
    figures, cycling). Figure ``i`` is drawn with ``numpy.random.default_rng([seed, i])``.
    The last ``n_unknown`` rows get an empty gender (their figure still shows a group).

    Returns
    -------
    list of dict
        ``{"image": "<subfolder>/figure_<i>.png", "gender", "occupation", "source"}``.
    """
    out_dir = Path(out_dir)
    (out_dir / subfolder).mkdir(parents=True, exist_ok=True)
    rows = []
    combos = [("female", "doctor"), ("male", "doctor"), ("female", "chef"), ("male", "chef")]
    for i in range(n):
        group, occupation = combos[i % 4]
        image = draw_figure(group, occupation, np.random.default_rng([seed, i]), size=size, colour_bias=colour_bias)
        name = f"{subfolder}/figure_{i:03d}.png"
        image.save(out_dir / name)
        gender = "" if i >= n - n_unknown else group
        rows.append({"image": name, "gender": gender, "occupation": occupation, "source": f"drawn ({group} cue)"})
    return rows


def _write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "gender", "occupation", "source"])
        writer.writeheader()
        writer.writerows(rows)
