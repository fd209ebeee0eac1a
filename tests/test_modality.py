"""Known-answer tests for the Modality Dominance Score, the grouping rules and score files."""

import json
import math
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import mmono_features.modality as modality
from mmono_features.dictionary import Dictionary, DictionaryConfig, register_dictionary
from mmono_features.modality import (
    GROUPS,
    ModalityDominanceAccumulator,
    Scores,
    assign_groups,
    encode_pairs,
    modality_dominance,
    score_dictionary,
)

# Four pairs, four latents; rows are pairs, columns latents.
#   latent 0: s = 0, 1, silent, silent        -> MDS 0.5 on 2 pairs (0.25 if silent pairs counted)
#   latent 1: s = (3-1)/4, 0, silent, silent  -> MDS 0.25 on 2 pairs
#   latent 2: silent everywhere              -> MDS NaN on 0 pairs
#   latent 3: s = -1, -1, -1, silent          -> MDS -1 on 3 pairs
IMAGE = torch.tensor(
    [
        [1.0, 3.0, 0.0, 0.0],
        [2.0, 1.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0],
    ]
)
TEXT = torch.tensor(
    [
        [1.0, 1.0, 0.0, 2.0],
        [0.0, 1.0, 0.0, 4.0],
        [0.0, 0.0, 0.0, 1.0],
        [0.0, 0.0, 0.0, 0.0],
    ]
)


def test_mds_known_answer():
    table = modality_dominance(IMAGE, TEXT, n_boot=0)
    assert table.columns.tolist() == ["latent", "mds", "ci_low", "ci_high", "n_active", "frequency"]
    assert table["latent"].tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(table["mds"].to_numpy(), [0.5, 0.25, np.nan, -1.0])
    assert table["n_active"].tolist() == [2, 2, 0, 3]
    # Firing samples out of 2 * 4: latent 0 fires on 2 images + 1 text, latent 1 on 2 + 2.
    np.testing.assert_allclose(table["frequency"].to_numpy(), [3 / 8, 4 / 8, 0.0, 3 / 8])
    assert table[["ci_low", "ci_high"]].isna().all().all()
    assert table.attrs["n_pairs"] == 4
    assert table.attrs["eps"] == 1e-8


def test_numpy_input_and_eps():
    # Activations at or below eps count as silent.
    image = np.array([[1e-9, 1.0], [0.0, 1.0]], dtype=np.float32)
    text = np.array([[0.0, 0.0], [1e-9, 3.0]], dtype=np.float32)
    table = modality_dominance(image, text, eps=1e-8, n_boot=0)
    assert table["n_active"].tolist() == [0, 2]
    assert math.isnan(table["mds"][0])
    assert table["mds"][1] == pytest.approx((1.0 + (1 - 3) / 4) / 2)
    # Latent 1 fires on both images and on one caption: 3 of 4 samples.
    assert table["frequency"].tolist() == [0.0, 0.75]


def test_absolute_for_signed_coordinates():
    image = torch.tensor([[-2.0], [1.0]])
    text = torch.tensor([[1.0], [-1.0]])
    with pytest.raises(ValueError, match="absolute=True"):
        modality_dominance(image, text, n_boot=0)
    table = modality_dominance(image, text, n_boot=0, absolute=True)
    assert table["mds"][0] == pytest.approx(((2 - 1) / 3 + 0.0) / 2)


def test_bad_inputs():
    with pytest.raises(ValueError, match="aligned by pair"):
        modality_dominance(IMAGE, TEXT[:3])
    with pytest.raises(ValueError, match="NaN or infinite"):
        modality_dominance(torch.tensor([[float("nan")]]), torch.tensor([[1.0]]), n_boot=0)
    with pytest.raises(ValueError, match="ci"):
        modality_dominance(IMAGE, TEXT, ci=1.5)
    with pytest.raises(ValueError, match="n_boot"):
        modality_dominance(IMAGE, TEXT, n_boot=-1)
    with pytest.raises(ValueError, match="torch.Tensor or numpy"):
        modality_dominance([[1.0]], [[1.0]])


def _random_latents(n=300, d_sae=24, density=0.3, seed=0):
    rng = np.random.default_rng(seed)
    bias = rng.uniform(-0.7, 0.7, size=d_sae)  # per-latent modality preference
    image = rng.exponential(size=(n, d_sae)) * (rng.random((n, d_sae)) < density * (1 + bias))
    text = rng.exponential(size=(n, d_sae)) * (rng.random((n, d_sae)) < density * (1 - bias))
    return torch.tensor(image, dtype=torch.float32), torch.tensor(text, dtype=torch.float32)


def test_bootstrap_interval_contains_point_estimate():
    image, text = _random_latents()
    table = modality_dominance(image, text, n_boot=400, seed=3)
    assert (table["n_active"] > 20).all()
    assert (table["ci_low"] <= table["mds"]).all()
    assert (table["mds"] <= table["ci_high"]).all()
    assert (table["ci_high"] - table["ci_low"] > 0).all()
    assert table[["ci_low", "ci_high"]].abs().le(1.0).all().all()


def test_bootstrap_matches_brute_force_poisson_replicates():
    image, text = _random_latents(n=90, d_sae=5, seed=4)
    table = modality_dominance(image, text, n_boot=200, seed=7, ci=0.9)
    weights = modality._PoissonWeights(200, 7, torch.device("cpu"))(0, 90).numpy().astype(np.float64)
    p, q = image.numpy().astype(np.float64), text.numpy().astype(np.float64)
    active = p + q > 1e-8
    s = np.where(active, (p - q) / np.where(active, p + q, 1.0), 0.0)
    replicates = (weights.T @ s) / (weights.T @ active)  # (n_boot, d_sae)
    np.testing.assert_allclose(table["ci_low"], np.quantile(replicates, 0.05, axis=0), rtol=1e-5)
    np.testing.assert_allclose(table["ci_high"], np.quantile(replicates, 0.95, axis=0), rtol=1e-5)
    # Poisson(1) weights: mean and variance 1.
    assert weights.mean() == pytest.approx(1.0, abs=0.03)
    assert weights.var() == pytest.approx(1.0, abs=0.06)


def test_chunking_and_sparse_path_agree(monkeypatch):
    image, text = _random_latents(n=5000, d_sae=12, density=0.05, seed=5)
    reference = modality_dominance(image, text, n_boot=50, chunk_size=5000)
    chunked = modality_dominance(image, text, n_boot=50, chunk_size=777)
    pd.testing.assert_frame_equal(reference, chunked, rtol=1e-6)
    monkeypatch.setattr(modality, "_SPARSE_DENSITY", 2.0)  # every chunk takes the sparse path
    sparse = modality_dominance(image, text, n_boot=50, chunk_size=777)
    pd.testing.assert_frame_equal(reference, sparse, rtol=1e-6)


def test_single_active_pair_gives_a_point_interval():
    image = torch.zeros(50, 1)
    text = torch.zeros(50, 1)
    image[7, 0] = 2.0
    text[7, 0] = 1.0
    table = modality_dominance(image, text, n_boot=100)
    assert table["n_active"][0] == 1
    assert table["ci_low"][0] == pytest.approx(1 / 3)
    assert table["ci_high"][0] == pytest.approx(1 / 3)


def test_accumulator_streams_chunks():
    accumulator = ModalityDominanceAccumulator(4, n_boot=0)
    accumulator.update(IMAGE[:2], TEXT[:2])
    accumulator.update(IMAGE[2:], TEXT[2:].numpy())
    pd.testing.assert_frame_equal(accumulator.table(), modality_dominance(IMAGE, TEXT, n_boot=0))
    with pytest.raises(ValueError, match=r"\(b, 4\)"):
        accumulator.update(IMAGE[:, :3], TEXT[:, :3])


# ---- groups ---------------------------------------------------------------------------

SCORED_MDS = [0.9, 0.5, 0.0, -0.2, -0.8]


def _table():
    # Latent 5 rests on 5 pairs (rare with min_active 20); latent 6 on none.
    return pd.DataFrame(
        {
            "latent": range(7),
            "mds": SCORED_MDS + [0.95, np.nan],
            "ci_low": [0.8, 0.4, -0.1, -0.3, -0.9, 0.5, np.nan],
            "ci_high": [0.95, 0.6, 0.1, -0.1, -0.7, 1.0, np.nan],
            "n_active": [100, 100, 100, 100, 100, 5, 0],
            "frequency": [0.1] * 7,
        }
    )


def test_std_rule_known_answer():
    scores = assign_groups(_table(), rule="std", k=1.0, min_active=20)
    # mu = 0.4 / 5 = 0.08; squared deviations 0.6724, 0.1764, 0.0064, 0.0784, 0.7744
    # sum to 1.708, so the population sd is sqrt(0.3416); thresholds 0.08 -/+ 0.5845.
    sigma = math.sqrt(0.3416)
    assert scores.rule["mu"] == pytest.approx(0.08)
    assert scores.rule["sigma"] == pytest.approx(sigma)
    assert scores.rule["sigma_ddof"] == 0
    assert scores.rule["thresholds"] == pytest.approx([0.08 - sigma, 0.08 + sigma])
    assert scores.table["group"].tolist() == ["ImgD", "CrossD", "CrossD", "CrossD", "TextD", "rare", "rare"]
    assert scores.rule["counts"] == {"ImgD": 1, "TextD": 1, "CrossD": 3, "rare": 2}
    assert scores.rule["n_scored"] == 5
    assert scores.rule["min_active"] == 20
    assert scores.rule["k"] == 1.0
    # Half a standard deviation: thresholds 0.08 -/+ 0.2922 also catch 0.5.
    half = assign_groups(_table(), rule="std", k=0.5, min_active=20)
    assert half.table["group"].tolist()[:5] == ["ImgD", "ImgD", "CrossD", "CrossD", "TextD"]


def test_quantile_rule_known_answer():
    scores = assign_groups(_table(), rule="quantile", quantiles=(0.2, 0.8), min_active=20)
    # Sorted scored MDS: -0.8, -0.2, 0, 0.5, 0.9. Position 0.2 * 4 = 0.8 gives
    # -0.8 + 0.8 * 0.6 = -0.32; position 3.2 gives 0.5 + 0.2 * 0.4 = 0.58.
    assert scores.rule["thresholds"] == pytest.approx([-0.32, 0.58])
    assert scores.rule["quantiles"] == [0.2, 0.8]
    assert scores.rule["k"] is None
    assert scores.table["group"].tolist()[:5] == ["ImgD", "CrossD", "CrossD", "CrossD", "TextD"]


def test_fixed_rule_and_strict_thresholds():
    scores = assign_groups(_table(), rule="fixed", thresholds=(-0.1, 0.1), min_active=20)
    assert scores.table["group"].tolist()[:5] == ["ImgD", "ImgD", "CrossD", "TextD", "TextD"]
    # A latent exactly on a threshold stays CrossD.
    edge = assign_groups(_table(), rule="fixed", thresholds=(0.0, 0.5), min_active=20)
    assert edge.table["group"].tolist()[:5] == ["ImgD", "CrossD", "CrossD", "TextD", "TextD"]
    assert edge.rule["thresholds"] == [0.0, 0.5]


def test_min_active_comes_from_the_table():
    table = _table()
    table.attrs["min_active"] = 3
    scores = assign_groups(table, rule="fixed", thresholds=(-0.1, 0.1))
    assert scores.table["group"][5] == "ImgD"
    assert scores.table["group"][6] == "rare"
    assert scores.rule["min_active"] == 3


def test_group_rule_errors():
    with pytest.raises(ValueError, match="rule must be one of"):
        assign_groups(_table(), rule="median")
    with pytest.raises(ValueError, match="thresholds are missing"):
        assign_groups(_table(), rule="fixed")
    with pytest.raises(ValueError, match="only used with rule='fixed'"):
        assign_groups(_table(), rule="std", thresholds=(0, 1))
    with pytest.raises(ValueError, match="low <= high"):
        assign_groups(_table(), rule="fixed", thresholds=(0.5, -0.5))
    with pytest.raises(ValueError, match="missing columns"):
        assign_groups(_table().drop(columns="mds"))


def test_all_rare():
    table = _table()
    scores = assign_groups(table, min_active=1000)
    assert set(scores.table["group"]) == {"rare"}
    assert scores.rule["mu"] is None
    assert scores.rule["sigma"] is None  # NaN is stored as None


def test_latents_and_group_sizes():
    scores = assign_groups(_table(), rule="fixed", thresholds=(-0.1, 0.1), min_active=20)
    ids = scores.latents("TextD")
    assert ids.dtype == torch.long
    assert ids.tolist() == [3, 4]
    assert scores.latents("rare").tolist() == [5, 6]
    with pytest.raises(ValueError, match="group must be one of"):
        scores.latents("imgd")
    sizes = scores.group_sizes()
    assert sizes["group"].tolist() == list(GROUPS) + ["rare"]
    assert sizes["count"].tolist() == [2, 2, 1, 2]
    np.testing.assert_allclose(sizes["fraction"], [2 / 7, 2 / 7, 1 / 7, 2 / 7])
    # Whole interval above 0.1: latents 0 and 1; below -0.1: latent 4 only (3 ends at -0.1).
    assert sizes["confident"].tolist()[:3] == [2.0, 1.0, 1.0]
    boot = scores.group_sizes(n_boot=200)
    assert (boot["fraction_low"] <= boot["fraction"]).all()
    assert (boot["fraction"] <= boot["fraction_high"]).all()


# ---- files ----------------------------------------------------------------------------


def _named_scores():
    scores = assign_groups(_table(), rule="std", k=1.0, min_active=20)
    scores.table.loc[0, "name"] = "dog"
    scores.table.loc[1, "name"] = "NA"  # must survive as a string, not a missing value
    return scores


def test_csv_round_trip(tmp_path):
    scores = _named_scores()
    scores.table["emb_sim"] = [0.5, np.nan, 0.25, 0.0, 1.0, np.nan, np.nan]  # an extra column
    path = scores.save(tmp_path / "scores.csv")
    sidecar = json.loads((tmp_path / "scores.json").read_text())
    assert sidecar["format"] == "mmono.scores"
    assert sidecar["rule"]["rule"] == "std"
    loaded = Scores.load(path)
    pd.testing.assert_frame_equal(loaded.table, scores.table)
    assert loaded.rule == scores.rule
    assert loaded.table["name"].tolist()[:3] == ["dog", "NA", ""]


def test_parquet_round_trip(tmp_path):
    pytest.importorskip("pyarrow", reason="parquet scores need pyarrow (mmono[parquet])")
    scores = _named_scores()
    loaded = Scores.load(scores.save(tmp_path / "out" / "scores.parquet"))
    pd.testing.assert_frame_equal(loaded.table, scores.table)
    assert loaded.rule == scores.rule


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` fail
    with pytest.raises(ImportError, match=r"mmono\[parquet\]"):
        _named_scores().save(tmp_path / "scores.parquet")


def test_file_errors(tmp_path):
    scores = _named_scores()
    with pytest.raises(ValueError, match=".csv or .parquet"):
        scores.save(tmp_path / "scores.xlsx")
    scores.save(tmp_path / "scores.csv")
    (tmp_path / "scores.json").unlink()
    with pytest.raises(FileNotFoundError, match="scores.json"):
        Scores.load(tmp_path / "scores.csv")


def test_scores_reject_unknown_groups():
    table = _named_scores().table
    table.loc[0, "group"] = "Image"
    with pytest.raises(ValueError, match="unknown groups"):
        Scores(table=table, rule={})


# ---- dictionaries -----------------------------------------------------------------------


@register_dictionary("test-linear-relu-modality")
class _LinearReLU(Dictionary):
    """Linear encoder + ReLU, linear decoder: the smallest dictionary."""

    def __init__(self, config):
        super().__init__(config)
        generator = torch.Generator().manual_seed(config.seed)
        self.W_enc = nn.Parameter(torch.randn(config.d_sae, config.d_in, generator=generator))
        self.b_enc = nn.Parameter(torch.zeros(config.d_sae))
        self.W_dec = nn.Parameter(torch.randn(config.d_sae, config.d_in, generator=generator))

    def encode(self, z):
        return torch.relu(z @ self.W_enc.T + self.b_enc)

    def decode(self, latents):
        return latents @ self.W_dec

    def decoder_directions(self):
        return self.W_dec / self.W_dec.norm(dim=1, keepdim=True)


class _FakeStore:
    def __init__(self, image, text):
        self._z = {"image": image, "text": text}

    def embeddings(self, modality, normalize=True):
        assert not normalize
        return self._z[modality]


def test_score_dictionary_matches_encode_then_score():
    dictionary = _LinearReLU(DictionaryConfig(kind="test-linear-relu-modality", d_in=6, d_sae=10, seed=1))
    generator = torch.Generator().manual_seed(0)
    image_z = torch.randn(70, 6, generator=generator) * 3 + 1
    text_z = torch.randn(70, 6, generator=generator) * 3 - 1
    image_latents, text_latents = encode_pairs(dictionary, image_z, text_z, batch_size=16)
    assert image_latents.shape == (70, 10)
    expected_image = dictionary.encode(dictionary.prepare(image_z, "image")).detach()
    torch.testing.assert_close(image_latents, expected_image)

    reference = assign_groups(modality_dominance(image_latents, text_latents, n_boot=100, min_active=5), rule="quantile")
    scores = score_dictionary(dictionary, image_z, text_z, batch_size=16, n_boot=100, min_active=5, rule="quantile")
    pd.testing.assert_frame_equal(scores.table, reference.table, rtol=1e-6)
    assert scores.rule["dictionary"]["kind"] == "test-linear-relu-modality"
    from_store = score_dictionary(dictionary, _FakeStore(image_z, text_z), batch_size=33, n_boot=100, min_active=5, rule="quantile")
    pd.testing.assert_frame_equal(from_store.table, reference.table, rtol=1e-6)
    assert dictionary.training  # the mode is restored

    with pytest.raises(ValueError, match="unknown scoring options"):
        score_dictionary(dictionary, image_z, text_z, alpha=1)
    with pytest.raises(ValueError, match="text_z is missing"):
        score_dictionary(dictionary, image_z)
    with pytest.raises(ValueError, match="d_in=6"):
        score_dictionary(dictionary, image_z[:, :4], text_z[:, :4])
