"""A synthetic world of paired images and captions whose factors are known.

Each pair shows one or two coloured shapes on a textured background, with a caption
that names them. Every factor of the world is one of three types:

- ``shared``: drawn in the image and written in the caption (shape kind, colour,
  count, position);
- ``image_only``: drawn but never written (background texture, filled or outlined);
- ``text_only``: written but never drawn (the framing word such as "a sketch of",
  and an adjective that no picture can show, such as "lucky").

The model ``mmono-shapes`` is a tiny CLIP trained on this world, so offline runs of
mmono can be checked against the truth. A latent tied to the background can only come
from the image tower, and one tied to the framing word only from the text tower.

Generation is deterministic: pair ``i`` of seed ``s`` is drawn from its own random
stream ``numpy.random.default_rng([s, i])``, so the first ``n`` pairs of a seed are the
same whatever the total asked for.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:  # torch is imported lazily: generating data does not need it
    import torch

__all__ = [
    "FACTOR_TYPES",
    "PALETTE",
    "ZERO_SHOT_TEMPLATES",
    "ShapesPair",
    "ShapesWorldConfig",
    "factor_values",
    "fill_template",
    "generate_pairs",
    "write_shapes_dataset",
    "zero_shot_accuracies",
    "zero_shot_accuracy",
]

logger = logging.getLogger(__name__)

FACTOR_TYPES: dict[str, str] = {
    "shape": "shared",
    "colour": "shared",
    "count": "shared",
    "position": "shared",
    "background": "image_only",
    "style": "image_only",
    "framing": "text_only",
    "adjective": "text_only",
}
"""Type of each factor: ``"shared"``, ``"image_only"`` or ``"text_only"``."""

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "purple": (145, 60, 200),
    "orange": (245, 135, 30),
}
"""RGB value of each colour name (before the per-image jitter)."""

_SHAPES = ("circle", "square", "triangle", "cross")
_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
_POSITIONS = ("left", "right", "top", "bottom", "centre")
_COUNTS = ("one", "two")
_BACKGROUNDS = ("plain", "stripes", "dots")
_STYLES = ("filled", "outlined")
_FRAMINGS = ("photo", "drawing", "picture", "sketch")
# Qualities that no picture can show, so no image carries a trace of them.
_ADJECTIVES = ("lucky", "famous", "boring", "expensive")

# Wording of the shared factors in captions. Entry 0 is the canonical phrase that the
# zero-shot prompts use, and captions draw any entry.
_DETERMINERS = {"one": ("a", "one", "a single"), "two": ("two", "a pair of")}
_WHERE = {
    "left": ("on the left", "at the left", "in the left half"),
    "right": ("on the right", "at the right", "in the right half"),
    "top": ("at the top", "near the top", "in the upper half"),
    "bottom": ("at the bottom", "near the bottom", "in the lower half"),
    "centre": ("in the centre", "in the middle"),
}

# Caption templates. Fields: {frame} (framing noun), {det}, {adj}, {colour}, {noun}
# (singular or plural to agree with the count), {where}, {pron} and {be} (agreement).
_CAPTION_TEMPLATES = (
    "a {frame} of {det} {adj} {colour} {noun} {where}",
    "a {frame} of {det} {colour} {noun} {where}. {pron} {be} {adj}",
    "{where}, {det} {adj} {colour} {noun} in a {frame}",
    "this {frame} shows {det} {adj} {colour} {noun} {where}",
    "a {frame} of {det} {adj} {noun} {where}, coloured {colour}",
)

ZERO_SHOT_TEMPLATES: tuple[str, ...] = (
    "a photo of {det} {colour} {noun} {where}",
    "a picture of {det} {colour} {noun} {where}",
    "{det} {colour} {noun} {where}",
)
"""Prompt templates for zero-shot classification of the shared factors.

They name all four shared factors, each by its canonical phrase. The class embedding
of one factor value is the mean over templates and over every value of the other
shared factors (see :func:`zero_shot_accuracy`).
"""

# Geometry in units of the image side. One shape sits at its anchor, and two shapes
# sit at two anchors that together cover the named region.
_ANCHORS_ONE = {
    "left": ((0.28, 0.5),),
    "right": ((0.72, 0.5),),
    "top": ((0.5, 0.28),),
    "bottom": ((0.5, 0.72),),
    "centre": ((0.5, 0.5),),
}
_ANCHORS_TWO = {
    "left": ((0.25, 0.27), (0.25, 0.73)),
    "right": ((0.75, 0.27), (0.75, 0.73)),
    "top": ((0.27, 0.25), (0.73, 0.25)),
    "bottom": ((0.27, 0.75), (0.73, 0.75)),
    "centre": ((0.31, 0.5), (0.69, 0.5)),
}
_RADIUS = {"one": (0.17, 0.21), "two": (0.13, 0.15)}  # range of the shape radius
_JITTER = {"one": 0.05, "two": 0.02}  # largest shift of a shape centre


@dataclass(frozen=True)
class ShapesWorldConfig:
    """Settings of the shapes world.

    Parameters
    ----------
    image_size : int
        Side of the square output images, in pixels.
    render_scale : int
        Images are drawn at ``image_size * render_scale`` pixels and reduced with a
        box filter, which anti-aliases the edges.
    shapes, colours, positions, counts : tuple of str
        Values of the shared factors. Colours must be keys of :data:`PALETTE`.
    backgrounds, styles : tuple of str
        Values of the image-only factors (subsets of ``("plain", "stripes", "dots")``
        and ``("filled", "outlined")``).
    framings, adjectives : tuple of str
        Values of the text-only factors. Adjectives must name qualities that a
        picture cannot show.
    colour_jitter : int
        Largest change of each RGB channel of the shape colour, per image.
    outline_width : float
        Line width of outlined shapes, in output pixels.
    """

    image_size: int = 32
    render_scale: int = 4
    shapes: tuple[str, ...] = _SHAPES
    colours: tuple[str, ...] = tuple(PALETTE)
    positions: tuple[str, ...] = _POSITIONS
    counts: tuple[str, ...] = _COUNTS
    backgrounds: tuple[str, ...] = _BACKGROUNDS
    styles: tuple[str, ...] = _STYLES
    framings: tuple[str, ...] = _FRAMINGS
    adjectives: tuple[str, ...] = _ADJECTIVES
    colour_jitter: int = 12
    outline_width: float = 1.5

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or self.image_size < 16:
            raise ValueError(f"image_size must be an int >= 16; got {self.image_size!r}.")
        if not isinstance(self.render_scale, int) or not 1 <= self.render_scale <= 8:
            raise ValueError(f"render_scale must be an int in [1, 8]; got {self.render_scale!r}.")
        allowed = {
            "shapes": _SHAPES,
            "colours": tuple(PALETTE),
            "positions": _POSITIONS,
            "counts": _COUNTS,
            "backgrounds": _BACKGROUNDS,
            "styles": _STYLES,
        }
        for name, known in allowed.items():
            values = getattr(self, name)
            # Lists from JSON are accepted and frozen into tuples.
            object.__setattr__(self, name, tuple(values))
            unknown = [v for v in values if v not in known]
            if not values or unknown or len(set(values)) != len(values):
                raise ValueError(
                    f"{name} must be distinct values from {known}; got {tuple(values)!r}. "
                    f"Drop the unknown or repeated values {unknown!r}."
                )
        for name in ("framings", "adjectives"):
            values = tuple(getattr(self, name))
            object.__setattr__(self, name, values)
            bad = [v for v in values if not isinstance(v, str) or not v.strip() or " " in v]
            if not values or bad or len(set(values)) != len(values):
                raise ValueError(
                    f"{name} must be distinct single words; got {values!r}. Fix the values {bad!r}."
                )
        if not 0 <= self.colour_jitter <= 60:
            raise ValueError(f"colour_jitter must be in [0, 60]; got {self.colour_jitter!r}.")
        if not 0.5 <= self.outline_width <= 4:
            raise ValueError(f"outline_width must be in [0.5, 4] pixels; got {self.outline_width!r}.")

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-serialisable dict."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShapesWorldConfig:
        """Build settings from :meth:`to_dict` output; unknown keys raise ValueError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown ShapesWorldConfig keys {unknown}; valid keys are {sorted(names)}.")
        return cls(**dict(data))


@dataclass(frozen=True, eq=False)
class ShapesPair:
    """One generated image-caption pair with its factor labels.

    Attributes
    ----------
    image : PIL.Image.Image
        RGB image of side ``config.image_size``.
    caption : str
        Caption naming the shared and text-only factors.
    factors : dict of str to str
        Value of every factor in :data:`FACTOR_TYPES`.
    boxes : tuple of (x0, y0, x1, y1)
        Bounding box of each drawn shape in output pixels (floats).
    index : int
        Index of the pair within its seed.
    template : int
        Index of the caption template used.
    seed : int
        Seed the pair was generated with.
    """

    image: Image.Image
    caption: str
    factors: dict[str, str]
    boxes: tuple[tuple[float, float, float, float], ...]
    index: int
    template: int = 0
    seed: int = 0


def factor_values(factor: str, config: ShapesWorldConfig | None = None) -> tuple[str, ...]:
    """Return the possible values of ``factor`` under ``config``.

    Raises
    ------
    ValueError
        If ``factor`` is not a key of :data:`FACTOR_TYPES`.
    """
    config = config or ShapesWorldConfig()
    attr = {
        "shape": "shapes",
        "colour": "colours",
        "count": "counts",
        "position": "positions",
        "background": "backgrounds",
        "style": "styles",
        "framing": "framings",
        "adjective": "adjectives",
    }
    if factor not in attr:
        raise ValueError(f"unknown factor {factor!r}; valid factors are {sorted(attr)}.")
    return getattr(config, attr[factor])


def fill_template(template: str, factors: Mapping[str, str], variant: int = 0) -> str:
    """Write a caption or prompt from a template and factor values.

    Parameters
    ----------
    template : str
        Format string with any of the fields ``{frame}``, ``{det}``, ``{adj}``,
        ``{colour}``, ``{noun}``, ``{where}``, ``{pron}``, ``{be}``.
    factors : mapping of str to str
        Factor values; only those the template's fields need must be present
        (``count`` for ``{det}``/``{noun}``/``{pron}``/``{be}``, ``shape`` for
        ``{noun}``, and so on).
    variant : int
        Chooses among the wordings of the determiner and the position phrase
        (taken modulo the number of wordings); 0 gives the canonical phrase.

    Returns
    -------
    str
        The filled text.
    """
    values: dict[str, str] = {}
    count = factors.get("count")
    if count is not None:
        dets = _DETERMINERS[count]
        values["det"] = dets[variant % len(dets)]
        values["pron"] = "it" if count == "one" else "they"
        values["be"] = "is" if count == "one" else "are"
    if "shape" in factors:
        shape = factors["shape"]
        values["noun"] = shape if count in (None, "one") else _PLURALS[shape]
    if "position" in factors:
        phrases = _WHERE[factors["position"]]
        values["where"] = phrases[variant % len(phrases)]
    if "colour" in factors:
        values["colour"] = factors["colour"]
    if "framing" in factors:
        values["frame"] = factors["framing"]
    if "adjective" in factors:
        values["adj"] = factors["adjective"]
    try:
        return template.format(**values)
    except KeyError as err:
        raise ValueError(
            f"template {template!r} needs the field {err.args[0]!r}, which the factors "
            f"{dict(factors)!r} do not provide; pass the factor it comes from."
        ) from None


def _sample_factors(rng: np.random.Generator, config: ShapesWorldConfig, fixed: Mapping[str, str]) -> dict[str, str]:
    factors = {}
    for name in FACTOR_TYPES:
        values = factor_values(name, config)
        # Draw even when the value is fixed, so that fixing one factor leaves the
        # random stream, and with it every other factor, unchanged.
        drawn = values[int(rng.integers(len(values)))]
        factors[name] = fixed.get(name, drawn)
    return factors


def _shape_outline(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Polygon of a shape of radius ``r`` centred at (cx, cy); None for a circle."""
    if kind == "square":
        h = 0.85 * r  # half side: the square's area is close to the circle's
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if kind == "triangle":
        R = 1.2 * r  # circumradius of an upward equilateral triangle
        return [
            (cx, cy - R),
            (cx + R * np.sqrt(3) / 2, cy + R / 2),
            (cx - R * np.sqrt(3) / 2, cy + R / 2),
        ]
    if kind == "cross":
        a, t = r, 0.38 * r  # arm length and half thickness
        return [
            (cx - t, cy - a), (cx + t, cy - a), (cx + t, cy - t), (cx + a, cy - t),
            (cx + a, cy + t), (cx + t, cy + t), (cx + t, cy + a), (cx - t, cy + a),
            (cx - t, cy + t), (cx - a, cy + t), (cx - a, cy - t), (cx - t, cy - t),
        ]
    return None


def _draw_background(draw: ImageDraw.ImageDraw, kind: str, side: int, scale: int, rng: np.random.Generator) -> None:
    base = int(rng.integers(150, 211))
    draw.rectangle([0, 0, side, side], fill=(base, base, base))
    ink = base - int(rng.integers(45, 66))
    period = int(rng.integers(5, 8)) * scale  # texture period: 5 to 7 output pixels
    offset = int(rng.integers(period))
    if kind == "stripes":
        orientation = int(rng.integers(3))  # horizontal, vertical, diagonal
        width = 2 * scale
        for start in range(-side - period + offset, 2 * side, period):
            if orientation == 0:
                draw.rectangle([0, start, side, start + width - 1], fill=(ink, ink, ink))
            elif orientation == 1:
                draw.rectangle([start, 0, start + width - 1, side], fill=(ink, ink, ink))
            else:
                draw.polygon(
                    [(start, 0), (start + width, 0), (start + width + side, side), (start + side, side)],
                    fill=(ink, ink, ink),
                )
    elif kind == "dots":
        radius = 0.8 * scale
        for y in range(offset, side, period):
            for x in range(offset, side, period):
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=(ink, ink, ink))


def _render(factors: Mapping[str, str], rng: np.random.Generator, config: ShapesWorldConfig) -> tuple[Image.Image, tuple]:
    size, scale = config.image_size, config.render_scale
    side = size * scale
    canvas = Image.new("RGB", (side, side))
    draw = ImageDraw.Draw(canvas)
    _draw_background(draw, factors["background"], side, scale, rng)

    jitter = rng.integers(-config.colour_jitter, config.colour_jitter + 1, size=3)
    colour = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(PALETTE[factors["colour"]], jitter))
    count = factors["count"]
    anchors = (_ANCHORS_ONE if count == "one" else _ANCHORS_TWO)[factors["position"]]
    r_low, r_high = _RADIUS[count]
    outline = factors["style"] == "outlined"
    line = max(1, round(config.outline_width * scale))

    boxes = []
    for ax, ay in anchors:
        r = rng.uniform(r_low, r_high) * side
        cx = (ax + rng.uniform(-_JITTER[count], _JITTER[count])) * side
        cy = (ay + rng.uniform(-_JITTER[count], _JITTER[count])) * side
        polygon = _shape_outline(factors["shape"], cx, cy, r)
        if polygon is None:
            bbox = [cx - r, cy - r, cx + r, cy + r]
            if outline:
                draw.ellipse(bbox, outline=colour, width=line)
            else:
                draw.ellipse(bbox, fill=colour)
        else:
            if outline:
                draw.polygon(polygon, outline=colour, width=line)
            else:
                draw.polygon(polygon, fill=colour)
            xs, ys = zip(*polygon)
            bbox = [min(xs), min(ys), max(xs), max(ys)]
        boxes.append(tuple(float(v) / scale for v in bbox))

    image = canvas if scale == 1 else canvas.resize((size, size), Image.Resampling.BOX)
    return image, tuple(boxes)


def generate_pairs(
    n: int,
    seed: int = 0,
    config: ShapesWorldConfig | None = None,
    fixed: Mapping[str, str] | None = None,
) -> list[ShapesPair]:
    """Generate ``n`` image-caption pairs of the shapes world.

    Parameters
    ----------
    n : int
        Number of pairs (>= 0).
    seed : int
        Non-negative seed. Pair ``i`` depends only on ``(seed, i, config, fixed)``.
    config : ShapesWorldConfig, optional
        World settings; the defaults when omitted.
    fixed : mapping of str to str, optional
        Factor values to hold fixed (for example ``{"colour": "red"}``); the other
        factors are drawn uniformly and independently.

    Returns
    -------
    list of ShapesPair
        ``n`` pairs, with factor labels in ``pair.factors``.
    """
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int; got {n!r}.")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int; got {seed!r}.")
    config = config or ShapesWorldConfig()
    fixed = dict(fixed or {})
    for name, value in fixed.items():
        if value not in factor_values(name, config):
            raise ValueError(
                f"fixed[{name!r}] = {value!r} is not a value of that factor; "
                f"choose one of {factor_values(name, config)}."
            )
    pairs = []
    for i in range(int(n)):
        rng = np.random.default_rng([int(seed), i])
        factors = _sample_factors(rng, config, fixed)
        template = int(rng.integers(len(_CAPTION_TEMPLATES)))
        variant = int(rng.integers(6))  # 6 is a multiple of every wording count
        caption = fill_template(_CAPTION_TEMPLATES[template], factors, variant)
        image, boxes = _render(factors, rng, config)
        pairs.append(
            ShapesPair(image=image, caption=caption, factors=factors, boxes=boxes, index=i, template=template, seed=int(seed))
        )
    return pairs


def write_shapes_dataset(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    config: ShapesWorldConfig | None = None,
) -> Path:
    """Write ``n`` pairs as PNG files and a manifest that mmono's data layer reads.

    Parameters
    ----------
    out_dir : str or Path
        Output folder (created if missing). Images go to ``out_dir/images/``.
    n, seed, config
        As in :func:`generate_pairs`.

    Returns
    -------
    Path
        ``out_dir/manifest.csv`` with columns ``image`` (path relative to the
        manifest), ``caption``, one column per factor of :data:`FACTOR_TYPES`, and
        ``template``.
    """
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    pairs = generate_pairs(n, seed, config)
    manifest = out_dir / "manifest.csv"
    columns = ["image", "caption", *FACTOR_TYPES, "template"]
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for pair in pairs:
            rel = f"images/{pair.index:06d}.png"
            pair.image.save(out_dir / rel)
            writer.writerow({"image": rel, "caption": pair.caption, **pair.factors, "template": pair.template})
    logger.info("wrote %d shapes-world pairs (seed %d) to %s", len(pairs), seed, manifest)
    return manifest


def _class_prompts(
    factor: str, templates: Sequence[str], config: ShapesWorldConfig
) -> dict[str, list[str]]:
    """Prompts for each value of a shared factor, over every value of the other shared factors."""
    shared = [f for f, kind in FACTOR_TYPES.items() if kind == "shared"]
    others = [f for f in shared if f != factor]
    prompts: dict[str, list[str]] = {}
    for value in factor_values(factor, config):
        texts = []
        for combo in itertools.product(*(factor_values(f, config) for f in others)):
            factors = dict(zip(others, combo), **{factor: value})
            texts.extend(fill_template(t, factors) for t in templates)
        # Templates that omit some factors repeat prompts; keep each once.
        prompts[value] = list(dict.fromkeys(texts))
    return prompts


def zero_shot_accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    preprocess: Any,
    pairs: Sequence[ShapesPair],
    factor: str,
    templates: Sequence[str] = ZERO_SHOT_TEMPLATES,
    config: ShapesWorldConfig | None = None,
    batch_size: int = 256,
) -> float:
    """Zero-shot accuracy of a CLIP model at reading one shared factor from images.

    The class embedding of value ``v`` is the mean of the L2-normalised text
    embeddings of every prompt with ``factor = v``, over all templates and all values
    of the other shared factors, normalised again. Each image is assigned the value
    whose class embedding has the largest cosine similarity with its embedding.
    Chance level is ``1 / len(factor_values(factor))``.

    Parameters
    ----------
    model : open_clip CLIP
        Model with ``encode_image`` and ``encode_text``; used in eval mode, no grad.
    tokenizer : callable
        ``tokenizer(list_of_str) -> LongTensor (batch, context_length)``.
    preprocess : callable
        PIL image -> tensor (3, H, W), the model's eval transform.
    pairs : sequence of ShapesPair
        Held-out pairs with labels.
    factor : str
        A shared factor: ``"shape"``, ``"colour"``, ``"count"`` or ``"position"``.
    templates : sequence of str
        Prompt templates with fields as in :func:`fill_template`.
    config : ShapesWorldConfig, optional
        World whose factor values are the classes; the defaults when omitted.
    batch_size : int
        Batch size of the encoders.

    Returns
    -------
    float
        Share of pairs whose factor value is predicted correctly, in [0, 1].
    """
    return zero_shot_accuracies(model, tokenizer, preprocess, pairs, (factor,), templates, config, batch_size)[factor]


def zero_shot_accuracies(
    model: torch.nn.Module,
    tokenizer: Any,
    preprocess: Any,
    pairs: Sequence[ShapesPair],
    factors: Sequence[str] | None = None,
    templates: Sequence[str] = ZERO_SHOT_TEMPLATES,
    config: ShapesWorldConfig | None = None,
    batch_size: int = 256,
) -> dict[str, float]:
    """Zero-shot accuracy of several shared factors, encoding prompts and images once.

    Same definition and parameters as :func:`zero_shot_accuracy`; ``factors`` defaults
    to every shared factor.

    Returns
    -------
    dict of str to float
        Accuracy of each factor, in [0, 1].
    """
    import torch

    shared = [f for f, kind in FACTOR_TYPES.items() if kind == "shared"]
    factors = list(shared if factors is None else factors)
    bad = [f for f in factors if f not in shared]
    if not factors or bad:
        raise ValueError(f"factors must be shared factors, from {shared}; got {factors!r}.")
    if len(pairs) == 0:
        raise ValueError("pairs is empty; pass at least one labelled pair.")
    if not templates:
        raise ValueError("templates is empty; pass at least one template, e.g. ZERO_SHOT_TEMPLATES.")
    config = config or ShapesWorldConfig()
    prompts = {f: _class_prompts(f, templates, config) for f in factors}
    # Every factor groups (mostly) the same prompts differently, so each distinct
    # prompt is encoded once.
    unique = list(dict.fromkeys(t for by_value in prompts.values() for texts in by_value.values() for t in texts))
    position = {text: i for i, text in enumerate(unique)}

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            text_emb = torch.cat(
                [
                    model.encode_text(tokenizer(unique[i : i + batch_size]).to(device)).float()
                    for i in range(0, len(unique), batch_size)
                ]
            )
            text_emb = torch.nn.functional.normalize(text_emb, dim=-1)
            image_emb = []
            for i in range(0, len(pairs), batch_size):
                pixels = torch.stack([preprocess(p.image) for p in pairs[i : i + batch_size]])
                image_emb.append(model.encode_image(pixels.to(device=device, dtype=dtype)).float())
            image_emb = torch.nn.functional.normalize(torch.cat(image_emb), dim=-1)
    finally:
        model.train(was_training)

    accuracies = {}
    for factor in factors:
        values = list(prompts[factor])
        classes = torch.stack(
            [
                torch.nn.functional.normalize(text_emb[[position[t] for t in prompts[factor][v]]].mean(dim=0), dim=0)
                for v in values
            ]
        )  # (n_values, embed_dim)
        predicted = (image_emb @ classes.T).argmax(dim=1).tolist()
        correct = sum(values[j] == p.factors[factor] for j, p in zip(predicted, pairs))
        accuracies[factor] = correct / len(pairs)
    return accuracies
