"""The reproduction script and the group-ablation check, end to end on mmono-shapes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from evaluation.group_ablation import LabelledEmbeddings, embed_labelled_images, group_ablation_table
from evaluation.reproduce import parse_args, reproduce
from mmono_features.extract import extract
from mmono_features.shapes_world import generate_pairs, write_shapes_dataset


@pytest.fixture(scope="module")
def shapes_store(tmp_path_factory, shapes_backbone):
    root = tmp_path_factory.mktemp("shapes")
    manifest = write_shapes_dataset(root / "data", n=240, seed=5)
    return extract(shapes_backbone, manifest, root / "store", batch_size=64, shard_size=128)


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory):
    """A labelled image folder: shapes-world images in one subfolder per colour."""
    root = tmp_path_factory.mktemp("labelled")
    for pair in generate_pairs(60, seed=77):
        folder = root / pair.factors["colour"]
        folder.mkdir(exist_ok=True)
        pair.image.save(folder / f"{pair.index:04d}.png")
    return root


def test_reproduce_writes_every_table(shapes_store, colour_folder, tmp_path):
    args = parse_args(
        [
            "--store", str(shapes_store.path), "--out", str(tmp_path / "results"), "--kinds", "topk", "ncl",
            "--seeds", "0", "1", "--d-sae", "64", "--k", "4", "--steps", "40", "--batch-size", "128",
            "--m", "5", "10", "--min-active", "5", "--n-boot", "50", "--labelled", str(colour_folder),
            "--n-random", "3", "--device", "cpu",
        ]
    )
    out = reproduce(args)
    for name in ("settings.json", "stability.csv", "ablation.csv", "comparison/comparison.html", "comparison/win_rates.csv"):
        assert (out / name).is_file(), name
    stability = pd.read_csv(out / "stability.csv")
    assert set(stability["kind"]) == {"topk", "ncl"}
    assert stability["jaccard"].dropna().between(0, 1).all()
    ablation = pd.read_csv(out / "ablation.csv")
    assert set(ablation["condition"]) == {"none", "remove ImgD", "remove TextD", "remove CrossD"}
    interpretability = pd.read_csv(out / "comparison" / "interpretability.csv")
    assert set(interpretability["m"]) == {5, 10}
    assert len(set(interpretability["dictionary"])) == 4


def test_rerun_reuses_trained_dictionaries(shapes_store, tmp_path):
    argv = ["--store", str(shapes_store.path), "--out", str(tmp_path / "r"), "--kinds", "topk", "--seeds", "0",
            "--d-sae", "32", "--k", "4", "--steps", "20", "--batch-size", "128", "--m", "5", "--n-boot", "20",
            "--min-active", "5", "--device", "cpu"]
    out = reproduce(parse_args(argv))
    weights = out / "dictionaries" / "topk-seed0" / "model.safetensors"
    first = weights.stat().st_mtime_ns
    reproduce(parse_args(argv))
    assert weights.stat().st_mtime_ns == first


class _IdentityScores:
    def __init__(self, groups):
        self.groups = groups

    def latents(self, group):
        return torch.tensor(self.groups.get(group, []), dtype=torch.long)


class _Axes(torch.nn.Module):
    """A dictionary whose latents are the positive and negative parts of each coordinate."""

    d_in, d_sae = 2, 4

    def prepare(self, z, modality):
        return z

    def encode(self, z):
        return torch.cat([z.clamp_min(0), (-z).clamp_min(0)], dim=1)

    def decode(self, latents):
        return latents[:, :2] - latents[:, 2:]


def test_group_ablation_known_answer():
    # Two classes separated along x only: removing the x latents (0 and 2) destroys the
    # separation, removing the y latents (1 and 3) leaves it intact.
    images = torch.tensor([[1.0, 0.2], [2.0, -0.3], [-1.0, 0.1], [-2.0, 0.4]])
    data = LabelledEmbeddings(images, torch.tensor([0, 0, 1, 1]), torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), ["a", "b"], 0)
    scores = _IdentityScores({"ImgD": [0, 2], "TextD": [1, 3], "CrossD": []})
    table = group_ablation_table(_Axes(), scores, data, n_random=4, n_boot=50).set_index("condition")
    assert table.loc["none", "accuracy"] == 1.0
    assert table.loc["remove TextD", "accuracy"] == 1.0
    assert table.loc["remove ImgD", "accuracy"] < 1.0
    assert table.loc["remove CrossD", "accuracy"] == 1.0
    assert np.isfinite(table.loc["remove ImgD", "random_mean"])


def test_embed_labelled_images_needs_two_classes(tmp_path, shapes_backbone):
    folder = tmp_path / "only"
    folder.mkdir()
    generate_pairs(1, seed=0)[0].image.save(folder / "x.png")
    with pytest.raises(ValueError, match="at least two"):
        embed_labelled_images(shapes_backbone, tmp_path)
