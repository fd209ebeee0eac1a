"""Planted ground truth for the bias-audit ablations and latent associations.

A hand-made dictionary with latents 2i and 2i+1 reading the positive and negative
part of coordinate i is exact (z = decode(encode(z))). Coordinate 0 encodes gender:
images of women have z_0 > 0, of men z_0 < 0; the "nurse" prompt leans towards +e_0
and the "doctor" prompt towards -e_0, so zero-shot occupation predictions follow
gender. Removing latents 0 and 1 must remove that gap.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from apps.bias_audit.ablation import random_latent_sets, remove_latents, zero_shot_logits
from apps.bias_audit.latents import caption_association, group_distribution, image_association, standardized_difference
from apps.bias_audit.metrics import bootstrap_replicates, compute_group_metrics
from mmono_features.dictionary import Dictionary, DictionaryConfig, register_dictionary

D_IN = 6


@register_dictionary("bias-audit-test-split")
class SplitBasisDictionary(Dictionary):
    """latents[2i] = relu(z_i), latents[2i+1] = relu(-z_i); decode is exact."""

    config_class = DictionaryConfig

    def __init__(self, config: DictionaryConfig) -> None:
        super().__init__(config)
        eye = torch.eye(config.d_in)
        self.W = nn.Parameter(torch.stack([eye, -eye], dim=1).reshape(2 * config.d_in, config.d_in))

    def encode(self, z):
        return torch.relu(z @ self.W.T)

    def decode(self, latents):
        return latents @ self.W

    def decoder_directions(self):
        return torch.nn.functional.normalize(self.W, dim=1)


@pytest.fixture()
def split_dictionary():
    return SplitBasisDictionary(DictionaryConfig(kind="bias-audit-test-split", d_in=D_IN, d_sae=2 * D_IN)).eval()


def _planted_world(n: int = 400, seed: int = 0):
    rng = np.random.default_rng(seed)
    gender = np.array(["female", "male"] * (n // 2), dtype=object)
    occupation = np.array(["nurse", "nurse", "doctor", "doctor"] * (n // 4), dtype=object)
    z = rng.normal(0, 0.1, size=(n, D_IN))
    z[:, 0] = np.where(gender == "female", 1.0, -1.0) + rng.normal(0, 0.1, n)
    z[:, 1] = np.where(occupation == "nurse", 0.5, -0.5) + rng.normal(0, 0.1, n)
    prompts = torch.zeros(2, D_IN)
    prompts[0, 0], prompts[0, 1] = -2.0, -1.0  # doctor: male-leaning
    prompts[1, 0], prompts[1, 1] = 2.0, 1.0  # nurse: female-leaning
    return torch.tensor(z, dtype=torch.float32), prompts, gender, occupation


def _metrics(dictionary, z, prompts, gender, occupation, latents, ablate_from="both", replicates=None):
    labels = np.array(["doctor", "nurse"], dtype=object)
    logits = zero_shot_logits(dictionary, z, prompts, torch.tensor([0, 1]), 2, latents=latents, ablate_from=ablate_from)
    y_pred = labels[logits.argmax(1).numpy()]
    return compute_group_metrics(list(occupation), list(y_pred), list(gender), "nurse", replicates=replicates, warn=False)


def test_standardized_difference_known_values():
    x_a = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]])
    x_b = np.array([[2.0, 5.0], [4.0, 5.0], [6.0, 5.0]])
    d = standardized_difference(x_a, x_b)
    assert d[0] == pytest.approx(-2 / math.sqrt(2.5))
    assert math.isnan(d[1])  # constant latent: undefined, not 0 or inf


def test_empty_ablation_is_identity(split_dictionary):
    z, prompts, gender, occupation = _planted_world()
    assert remove_latents(split_dictionary, z, []) is z
    reps = bootstrap_replicates(gender, n_boot=50, seed=0)
    base = _metrics(None, z, prompts, gender, occupation, (), replicates=reps)
    for ablate_from in ("image", "prompt", "both"):
        empty = _metrics(split_dictionary, z, prompts, gender, occupation, (), ablate_from, replicates=reps)
        pd.testing.assert_frame_equal(empty.by_group, base.by_group)
        assert empty.disparities == base.disparities


def test_planted_gender_ablation_removes_gap(split_dictionary):
    z, prompts, gender, occupation = _planted_world()
    base = _metrics(split_dictionary, z, prompts, gender, occupation, ())
    # Predictions follow gender: women are all called nurses, men doctors.
    assert base.disparities["demographic_parity_difference"] > 0.9
    ablated = _metrics(split_dictionary, z, prompts, gender, occupation, (0, 1))
    assert ablated.disparities["demographic_parity_difference"] < 0.05
    assert ablated.overall["accuracy"] > 0.95  # the occupation signal survives
    # Two random latents other than the gender pair leave the gap in place.
    for latents in [(4, 7), (2, 9), (3, 10)]:
        kept = _metrics(split_dictionary, z, prompts, gender, occupation, latents)
        assert kept.disparities["demographic_parity_difference"] > 0.9
    # The cosine needs the gender coordinate on both sides, so either side suffices.
    for side in ("image", "prompt"):
        one_side = _metrics(split_dictionary, z, prompts, gender, occupation, (0, 1), side)
        assert one_side.disparities["demographic_parity_difference"] < 0.05


def test_random_latent_sets_seeded():
    sets = random_latent_sets(100, 7, 5, seed=1)
    assert len(sets) == 5 and all(len(set(s)) == 7 for s in sets)
    assert sets == random_latent_sets(100, 7, 5, seed=1)
    assert sets != random_latent_sets(100, 7, 5, seed=2)
    with pytest.raises(ValueError, match="cannot draw"):
        random_latent_sets(5, 6, 1)
    pooled = random_latent_sets(100, 3, 4, seed=0, pool=[10, 11, 12, 13, 14])
    assert all(set(s) <= {10, 11, 12, 13, 14} for s in pooled)


def test_image_association_planted_latents():
    rng = np.random.default_rng(0)
    n, d_sae = 400, 40
    groups = np.array(["female", "male"] * (n // 2) + ["unknown"] * 10, dtype=object)
    latents = np.maximum(rng.normal(0, 1, size=(len(groups), d_sae)), 0)
    female, male = groups == "female", groups == "male"
    latents[female, 7] += 1.5  # planted: more active on women
    latents[male, 23] += 1.2  # planted: more active on men
    latents[:, 30] = 0.0  # silent latent: undefined d, never listed
    assoc = image_association(latents, groups, top=5, n_boot=200, seed=0)
    assert assoc.contrasts == [("male", "female")]
    top = assoc.top.set_index("latent")
    assert set(assoc.top["latent"][:2]) == {7, 23}
    assert top.loc[7, "d"] < -1  # sign reads "male minus female"
    assert top.loc[23, "d"] > 1
    for latent in (7, 23):
        assert top.loc[latent, "ci_low"] <= top.loc[latent, "d"] <= top.loc[latent, "ci_high"]
        assert np.sign(top.loc[latent, "ci_low"]) == np.sign(top.loc[latent, "ci_high"])  # excludes 0
    assert 30 not in set(assoc.top["latent"])
    # Streaming blocks give the same table as the dense matrix.
    streamed = image_association(lambda: (latents[i : i + 64] for i in range(0, len(latents), 64)), groups, top=5, n_boot=200)
    pd.testing.assert_frame_equal(streamed.top, assoc.top, rtol=1e-9)
    dense = standardized_difference(latents[groups == "male"], latents[groups == "female"])
    np.testing.assert_allclose(assoc.table["d"].to_numpy()[:29], dense[:29], rtol=1e-9)

    # More than two groups: each vs the rest.
    three = np.array(["a", "b", "c"] * 100, dtype=object)
    x = np.maximum(rng.normal(0, 1, size=(300, 10)), 0)
    x[three == "c", 4] += 2.0
    assoc3 = image_association(x, three, top=3, n_boot=50)
    assert assoc3.top.iloc[0]["latent"] == 4
    assert assoc3.top.iloc[0]["contrast"] == "c vs rest"


def test_caption_association_planted_latent():
    rng = np.random.default_rng(1)
    n_pairs, d_sae = 22, 12
    shared = np.maximum(rng.normal(0, 1, size=(n_pairs, d_sae)), 0)
    side_a, side_b = shared + rng.normal(0, 0.05, shared.shape), shared.copy()
    side_a[:, 5] += 2.0
    assoc = caption_association(np.maximum(side_a, 0), side_b, groups=("male", "female"), top=3, n_boot=200)
    assert assoc.top.iloc[0]["latent"] == 5
    assert assoc.top.iloc[0]["ci_low"] > 0
    groups = pd.Series(["ImgD", "TextD", "CrossD", "CrossD"] * 3, index=range(d_sae))
    dist = group_distribution(np.array([5, 1, 2]), groups, groups).set_index("group")
    assert dist.loc["TextD", "n_listed"] == 2
    assert dist.loc["CrossD", "n_listed"] == 1
    assert dist["share_all"].sum() == pytest.approx(1.0)
