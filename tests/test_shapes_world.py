"""Tests of the shapes world generator and of the shipped ``mmono-shapes`` weights."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from mmono_features.shapes_world import (
    FACTOR_TYPES,
    PALETTE,
    ZERO_SHOT_TEMPLATES,
    ShapesWorldConfig,
    factor_values,
    fill_template,
    generate_pairs,
    write_shapes_dataset,
    zero_shot_accuracies,
    zero_shot_accuracy,
)

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "assets" / "shapes_world"
SHARED = [f for f, kind in FACTOR_TYPES.items() if kind == "shared"]
# Words that would leak an image-only factor into a caption.
IMAGE_ONLY_WORDS = ("plain", "stripe", "striped", "dot", "dots", "dotted", "filled", "outline", "outlined", "background")
# Tolerance of the zero-shot check against the recorded figure: the pairs are the same,
# so only float differences between machines can move it, by far less than this.
ACCURACY_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def pairs():
    return generate_pairs(120, seed=5)


def test_factor_types_cover_three_kinds():
    assert set(FACTOR_TYPES.values()) == {"shared", "image_only", "text_only"}
    assert SHARED == ["shape", "colour", "count", "position"]
    for factor in FACTOR_TYPES:
        assert len(factor_values(factor)) >= 2
    with pytest.raises(ValueError, match="unknown factor 'size'"):
        factor_values("size")


def test_same_seed_same_pairs_and_prefix_property():
    a = generate_pairs(20, seed=3)
    b = generate_pairs(20, seed=3)
    c = generate_pairs(10, seed=3)
    for x, y in zip(a, b):
        assert x.image.tobytes() == y.image.tobytes()
        assert x.caption == y.caption
        assert x.factors == y.factors
        assert x.boxes == y.boxes
    # The first n pairs do not depend on how many are asked for.
    assert [p.image.tobytes() for p in c] == [p.image.tobytes() for p in a[:10]]


def test_different_seed_different_pairs():
    a = generate_pairs(20, seed=3)
    b = generate_pairs(20, seed=4)
    assert sum(x.image.tobytes() == y.image.tobytes() for x, y in zip(a, b)) == 0
    assert [p.caption for p in a] != [p.caption for p in b]


def test_images_have_configured_size(pairs):
    for p in pairs[:10]:
        assert p.image.mode == "RGB"
        assert p.image.size == (32, 32)
    big = generate_pairs(2, seed=0, config=ShapesWorldConfig(image_size=48))
    assert big[0].image.size == (48, 48)


def test_factors_are_balanced_enough():
    many = generate_pairs(600, seed=11)
    for factor in FACTOR_TYPES:
        values = [p.factors[factor] for p in many]
        counts = {v: values.count(v) for v in factor_values(factor)}
        expected = len(many) / len(counts)
        assert min(counts.values()) > 0.6 * expected, (factor, counts)


def test_caption_names_shared_and_text_only_factors(pairs):
    for p in pairs:
        words = set(re.findall(r"[a-z]+", p.caption))
        f = p.factors
        assert f["colour"] in words
        assert f["shape"] in words or f["shape"] + "s" in words or f["shape"] + "es" in words
        assert f["framing"] in words
        assert f["adjective"] in words
        assert ("two" in words or "pair" in words) == (f["count"] == "two")
        position_words = {"left": {"left"}, "right": {"right"}, "top": {"top", "upper"},
                          "bottom": {"bottom", "lower"}, "centre": {"centre", "middle"}}[f["position"]]
        assert words & position_words, p.caption
        assert not words & set(IMAGE_ONLY_WORDS), p.caption


def test_captions_use_several_templates(pairs):
    assert len({p.template for p in pairs}) >= 4
    assert len({p.caption.split()[0] for p in pairs}) >= 3


def _colour_distance(pixel, name):
    return float(np.abs(np.asarray(pixel, dtype=float) - np.asarray(PALETTE[name], dtype=float)).max())


def test_filled_shape_centre_has_the_captioned_colour():
    filled = generate_pairs(60, seed=8, fixed={"style": "filled"})
    for p in filled:
        arr = np.asarray(p.image)
        assert len(p.boxes) == (1 if p.factors["count"] == "one" else 2)
        for x0, y0, x1, y1 in p.boxes:
            # The centre of the box is inside every shape kind (the cross too).
            cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
            if p.factors["shape"] == "triangle":
                cy = int(y0 + 0.6 * (y1 - y0))  # below the apex, well inside
            pixel = arr[cy, cx]
            assert _colour_distance(pixel, p.factors["colour"]) <= 16, (p.factors, pixel)
            others = [c for c in PALETTE if c != p.factors["colour"]]
            assert min(_colour_distance(pixel, c) for c in others) > 16


def test_outlined_shape_colour_on_outline():
    outlined = generate_pairs(40, seed=9, fixed={"style": "outlined", "shape": "square", "count": "one"})
    for p in outlined:
        arr = np.asarray(p.image).astype(float)
        x0, y0, x1, y1 = p.boxes[0]
        centre = arr[int((y0 + y1) / 2), int((x0 + x1) / 2)]
        assert _colour_distance(centre, p.factors["colour"]) > 40  # the inside shows background
        box = arr[int(y0) : int(np.ceil(y1)), int(x0) : int(np.ceil(x1))].reshape(-1, 3)
        near = np.abs(box - np.asarray(PALETTE[p.factors["colour"]])).max(axis=1) <= 20
        assert near.sum() >= 8  # the outline is drawn in the colour


def test_shape_position_matches_factor():
    # Box centres, in units of the image side. A triangle's box sits a little above its
    # anchor (the apex is further from the centre than the base), hence the margins.
    for p in generate_pairs(200, seed=10):
        cx = np.mean([(b[0] + b[2]) / 2 for b in p.boxes]) / 32
        cy = np.mean([(b[1] + b[3]) / 2 for b in p.boxes]) / 32
        expected = {
            "left": cx < 0.4 and 0.35 < cy < 0.65,
            "right": cx > 0.6 and 0.35 < cy < 0.65,
            "top": cy < 0.4 and 0.35 < cx < 0.65,
            "bottom": cy > 0.6 and 0.35 < cx < 0.65,
            "centre": 0.35 < cx < 0.65 and 0.35 < cy < 0.65,
        }[p.factors["position"]]
        assert expected, (p.factors, cx, cy)


def _background_std(p):
    arr = np.asarray(p.image).astype(float).mean(axis=2)
    mask = np.ones(arr.shape, dtype=bool)
    for x0, y0, x1, y1 in p.boxes:
        mask[max(0, int(y0) - 1) : int(np.ceil(y1)) + 1, max(0, int(x0) - 1) : int(np.ceil(x1)) + 1] = False
    return arr[mask].std()


def test_background_texture_matches_factor():
    for background in ("plain", "stripes", "dots"):
        for p in generate_pairs(20, seed=12, fixed={"background": background}):
            std = _background_std(p)
            if background == "plain":
                assert std < 1.0, std
            else:
                assert std > 5.0, (background, std)


def test_fixed_factor_keeps_other_factors():
    free = generate_pairs(10, seed=13)
    red = generate_pairs(10, seed=13, fixed={"colour": "red"})
    for a, b in zip(free, red):
        assert b.factors["colour"] == "red"
        assert {k: v for k, v in a.factors.items() if k != "colour"} == {
            k: v for k, v in b.factors.items() if k != "colour"
        }
    with pytest.raises(ValueError, match="not a value of that factor"):
        generate_pairs(1, fixed={"colour": "pink"})


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="n must be"):
        generate_pairs(-1)
    with pytest.raises(ValueError, match="seed must be"):
        generate_pairs(1, seed=-2)
    with pytest.raises(ValueError, match="colours"):
        ShapesWorldConfig(colours=("red", "pink"))
    with pytest.raises(ValueError, match="adjectives"):
        ShapesWorldConfig(adjectives=("very lucky",))
    with pytest.raises(ValueError, match="needs the field 'colour'"):
        fill_template("a {colour} {noun}", {"shape": "circle"})


def test_config_round_trip():
    config = ShapesWorldConfig(colours=("red", "blue"), adjectives=("lucky", "famous"))
    again = ShapesWorldConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    with pytest.raises(ValueError, match="unknown ShapesWorldConfig keys"):
        ShapesWorldConfig.from_dict({"colors": ["red"]})


def test_restricted_config_only_draws_its_values():
    config = ShapesWorldConfig(shapes=("circle",), colours=("red", "blue"))
    for p in generate_pairs(30, seed=1, config=config):
        assert p.factors["shape"] == "circle"
        assert p.factors["colour"] in ("red", "blue")


def test_fill_template_canonical_phrases():
    two = {"shape": "cross", "colour": "red", "count": "two", "position": "centre"}
    assert fill_template(ZERO_SHOT_TEMPLATES[0], two) == "a photo of two red crosses in the centre"
    one = dict(two, count="one", position="top")
    assert fill_template("{det} {colour} {noun} {where}", one, variant=1) == "one red cross near the top"


def test_write_dataset_round_trip(tmp_path):
    manifest = write_shapes_dataset(tmp_path / "world", n=6, seed=2)
    assert manifest == tmp_path / "world" / "manifest.csv"
    with manifest.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    expected = generate_pairs(6, seed=2)
    assert len(rows) == 6
    assert list(rows[0]) == ["image", "caption", *FACTOR_TYPES, "template"]
    from PIL import Image

    for row, pair in zip(rows, expected):
        assert not Path(row["image"]).is_absolute()
        with Image.open(manifest.parent / row["image"]) as image:
            assert image.convert("RGB").tobytes() == pair.image.tobytes()  # PNG is lossless
        assert row["caption"] == pair.caption
        assert {f: row[f] for f in FACTOR_TYPES} == pair.factors


# --------------------------------------------------------------------------- weights


def _metrics():
    path = ASSETS / "metrics.json"
    if not path.exists():
        pytest.skip("assets/shapes_world/metrics.json is missing; run evaluation/train_shapes_clip.py")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def open_clip_model():
    open_clip = pytest.importorskip("open_clip")
    import torch
    from safetensors.torch import load_file

    open_clip.add_model_config(REPO / "mmono_features" / "model_configs")
    model, _, preprocess = open_clip.create_model_and_transforms("mmono-shapes", pretrained=None)
    state = load_file(str(ASSETS / "model.safetensors"))
    reference = model.state_dict()
    assert set(state) == set(reference)
    model.load_state_dict({k: v.to(reference[k].dtype) for k, v in state.items()})
    model.eval()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return model, open_clip.get_tokenizer("mmono-shapes"), preprocess


def test_shipped_files_agree():
    config = json.loads((ASSETS / "config.json").read_text())
    registered = json.loads((REPO / "mmono_features" / "model_configs" / "mmono-shapes.json").read_text())
    assert config == registered
    assert config["vision_cfg"]["width"] == 64
    assert config["vision_cfg"]["layers"] == 2
    assert (ASSETS / "model.safetensors").stat().st_size < 10 * 2**20
    settings = json.loads((ASSETS / "generator_settings.json").read_text())
    assert ShapesWorldConfig.from_dict(settings["world"]) == ShapesWorldConfig()
    assert settings["factor_types"] == FACTOR_TYPES
    log = [json.loads(line) for line in (ASSETS / "train_log.jsonl").read_text().splitlines()]
    losses = [record["loss"] for record in log if "loss" in record]
    assert losses[-1] < losses[0]


def test_shipped_weights_reach_recorded_accuracy(open_clip_model):
    metrics = _metrics()
    model, tokenizer, preprocess = open_clip_model
    n = metrics["test_subset"]["n_pairs"]
    heldout = generate_pairs(n, seed=metrics["heldout_seed"])
    accuracies = zero_shot_accuracies(model, tokenizer, preprocess, heldout, SHARED, ZERO_SHOT_TEMPLATES)
    for factor in SHARED:
        acc = accuracies[factor]
        recorded = metrics["test_subset"]["accuracy"][factor]
        chance = metrics["chance"][factor]
        assert acc >= recorded - ACCURACY_TOLERANCE, (factor, acc, recorded)
        assert acc > chance + 0.2, (factor, acc, chance)


def test_train_script_smoke(tmp_path):
    pytest.importorskip("open_clip")
    from safetensors.torch import load_file

    from evaluation.train_shapes_clip import parse_args, train

    args = parse_args(
        ["--n-pairs", "200", "--steps", "3", "--batch-size", "32", "--n-eval", "30", "--n-test", "20",
         "--n-monitor", "20", "--log-every", "1", "--eval-every", "3", "--out", str(tmp_path)]
    )
    metrics = train(args)
    for name in ("model.safetensors", "config.json", "generator_settings.json", "train_log.jsonl", "metrics.json", "README.md"):
        assert (tmp_path / name).is_file(), name
    state = load_file(str(tmp_path / "model.safetensors"))
    assert {v.dtype for v in state.values()} == {__import__("torch").float16}
    assert "token_embedding.weight" in state
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log] == [0, 1, 2, 3]
    assert "monitor_accuracy" in log[-1]
    assert set(metrics["heldout"]["accuracy"]) == set(SHARED)
    assert json.loads((tmp_path / "metrics.json").read_text())["args"]["out"] == str(tmp_path)


def test_backbone_loads_shapes_model():
    backbone_module = pytest.importorskip("mmono_features.backbone")
    import torch

    metrics = _metrics()
    backbone = backbone_module.load_backbone("mmono-shapes", device="cpu")
    assert backbone.embed_dim == 64
    assert backbone.image_size == 32
    heldout = generate_pairs(100, seed=metrics["heldout_seed"])
    acc = zero_shot_accuracy(backbone.model, backbone.tokenizer, backbone.preprocess, heldout, "colour")
    assert acc >= metrics["test_subset"]["accuracy"]["colour"] - 0.1
    # The backbone's weights are the shipped ones.
    from safetensors.torch import load_file

    state = load_file(str(ASSETS / "model.safetensors"))
    ours = backbone.model.state_dict()
    for key in ("token_embedding.weight", "visual.conv1.weight", "logit_scale"):
        torch.testing.assert_close(ours[key].float().cpu(), state[key].float(), rtol=0, atol=1e-3)
