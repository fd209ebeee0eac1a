"""End-to-end test of ``mmono defend`` on a tiny model, dictionary and scores made in the test."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import typer
from typer.testing import CliRunner

from mmono_features.backbone import assets_dir

CLASSES = ("red", "green", "blue")


def _model_name() -> str:
    try:
        return "mmono-shapes" if (assets_dir() / "shapes_world/model.safetensors").is_file() else "mmono-tiny"
    except FileNotFoundError:
        return "mmono-tiny"


def _cli_app() -> typer.Typer:
    """The project's ``mmono`` app when it has ``defend``, else a local app with only ``defend``."""
    try:
        from mmono_features.cli import app
    except ImportError:
        app = None
    if app is not None and any(c.name == "defend" for c in app.registered_commands):
        return app
    from apps.adversarial.cli import register

    local = typer.Typer()

    @local.callback()
    def _root() -> None:
        """Test app."""

    register(local)
    return local


def _write_images(root, n_per_class: int, seed: int) -> list[str]:
    """Write a class-folder image set; returns one caption per image (in class order)."""
    from PIL import Image

    from mmono_features.shapes_world import generate_pairs

    captions = []
    for label, colour in enumerate(CLASSES):
        folder = root / colour
        folder.mkdir(parents=True)
        for i, pair in enumerate(generate_pairs(n_per_class, seed=seed + label, fixed={"colour": colour, "count": "one"})):
            image = pair.image
            if _model_name() == "mmono-tiny":
                # Near-grey images for the random model (it cannot read shapes).
                rng = np.random.default_rng([seed, label, i])
                pixels = 0.5 + 0.04 * np.eye(3)[label] + 0.01 * rng.standard_normal((32, 32, 3))
                image = Image.fromarray((np.clip(pixels, 0, 1) * 255).round().astype(np.uint8))
            image.save(folder / f"{i:03d}.png")
            captions.append(pair.caption)
    return captions


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """An image folder, a dictionary folder and a scores file for the run."""
    from mmono_features.backbone import load_backbone
    from mmono_features.data import read_labelled_images
    from mmono_features.dictionary import TrainConfig, make_config, train_dictionary
    from mmono_features.modality import score_dictionary

    root = tmp_path_factory.mktemp("defend")
    captions = _write_images(root / "data", 4, seed=300)
    backbone = load_backbone(_model_name(), device="cpu")
    frame = read_labelled_images(root / "data")
    from mmono_features.data import load_image

    pixels = torch.stack([backbone.preprocess(load_image(path)) for path in frame["image"]])
    image_z = backbone.encode_images(pixels)
    text_z = backbone.encode_texts(captions)
    config = make_config("topk", backbone.embed_dim, 64, k=8, backbone=backbone.identity())
    train_config = TrainConfig(batch_size=12, n_steps=30, warmup_steps=3, lr=2e-3, seed=0, device="cpu", log_every=0)
    dictionary = train_dictionary((image_z, text_z), config, train_config).dictionary
    dictionary.save_pretrained(root / "dictionary")
    scores = score_dictionary(dictionary, image_z, text_z, min_active=2, n_boot=20)
    scores.save(root / "scores.csv")
    return root


def _run(args):
    result = CliRunner().invoke(_cli_app(), args)
    return result


def test_defend_end_to_end(inputs):
    out = inputs / "out"
    args = [
        "defend", str(inputs / "data"), "--model", _model_name(), "--dictionary", str(inputs / "dictionary"),
        "--scores", str(inputs / "scores.csv"), "--attack", "pgd", "--attack", "fgsm", "--eps", "4/255",
        "--steps", "2", "--group", "CrossD", "--strength", "1.0", "--mode", "both", "--out", str(out),
        "--device", "cpu", "--seed", "0", "--max-images", "9", "--n-boot", "50",
    ]
    result = _run(args)
    assert result.exit_code == 0, result.output
    for name in ("robustness.json", "robustness.csv", "report.html", "defense.json", "feature_shift.csv"):
        assert (out / name).is_file(), name
    table = pd.read_csv(out / "robustness.csv")
    assert set(table["mode"]) == {"clean", "non-adaptive", "adaptive", "worst-case"}
    assert set(table["name"].dropna()) == {"none", "pgd", "fgsm"}
    assert (table["n_images"] == 9).all()
    summary = json.loads((out / "robustness.json").read_text())
    assert summary["defense"]["source"]["group"] == "CrossD"
    assert summary["settings"]["n_images"] == 9
    assert "data:image/png;base64," in (out / "report.html").read_text()


def test_defend_shifted_latents(inputs):
    out = inputs / "out-shifted"
    args = [
        "defend", str(inputs / "data"), "--model", _model_name(), "--dictionary", str(inputs / "dictionary"),
        "--attack", "fgsm", "--eps", "4/255", "--shifted", "5", "--calibration-fraction", "0.25",
        "--mode", "adaptive", "--out", str(out), "--device", "cpu", "--n-boot", "20",
    ]
    result = _run(args)
    assert result.exit_code == 0, result.output
    defense = json.loads((out / "defense.json").read_text())
    assert defense["source"]["kind"] == "shifted"
    assert len(defense["latents"]) == 5
    table = pd.read_csv(out / "robustness.csv")
    assert (table["n_images"] == 9).all()


@pytest.mark.parametrize(
    "extra, message",
    [(["--eps", "four"], "not a number"), (["--attack", "deepfool"], "unknown attack"), (["--mode", "sideways"], "--mode")],
)
def test_defend_rejects_bad_options(inputs, extra, message):
    args = ["defend", str(inputs / "data"), "--model", _model_name(), "--out", str(inputs / "bad"), "--device", "cpu", *extra]
    result = _run(args)
    assert result.exit_code == 2
    assert message in result.output


def test_labelled_images_from_csv(inputs, tiny_backbone):
    from apps.adversarial import load_labelled_images

    rows = ["image,label"]
    # The folder reader lists classes in sorted order; the table follows it row by row.
    for colour in sorted(CLASSES):
        for path in sorted((inputs / "data" / colour).glob("*.png")):
            rows.append(f"data/{colour}/{path.name},{colour}")
    (inputs / "labels.csv").write_text("\n".join(rows) + "\n")
    from_csv = load_labelled_images(inputs / "labels.csv", tiny_backbone)
    from_folder = load_labelled_images(inputs / "data", tiny_backbone)
    assert from_csv.class_names == ["blue", "green", "red"]
    assert torch.equal(from_csv.images, from_folder.images)
    assert torch.equal(from_csv.labels, from_folder.labels)
    assert from_csv.images.shape == (12, 3, 32, 32)


def test_labelled_images_skip_unreadable(inputs, tiny_backbone, tmp_path):
    from apps.adversarial import load_labelled_images

    for colour in ("red", "blue"):
        (tmp_path / colour).mkdir()
        (tmp_path / colour / "good.png").write_bytes((inputs / "data" / colour / "000.png").read_bytes())
    (tmp_path / "red" / "broken.png").write_bytes(b"not an image")
    data = load_labelled_images(tmp_path, tiny_backbone)
    assert data.n_skipped == 1
    assert len(data.labels) == 2
