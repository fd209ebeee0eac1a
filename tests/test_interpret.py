from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmono_features.interpret import (
    emb_sim,
    interpretability_table,
    load_vocabulary,
    mean_pairwise_cosine,
    match_latents,
    random_baseline_emb_sim,
    summarize_interpretability,
    top_activating,
    win_rate,
)


def test_mean_pairwise_cosine_known_answer():
    # Pairs: (e1, e1) -> 1, (e1, e2) -> 0, (e1, e2) -> 0: mean 1/3.
    embeddings = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    assert mean_pairwise_cosine(embeddings) == pytest.approx(1 / 3)


def test_mean_pairwise_cosine_single_sample_is_nan():
    assert math.isnan(mean_pairwise_cosine(torch.ones(1, 4)))


def test_top_activating_order_and_silence():
    latents = torch.tensor([[0.0, 5.0], [3.0, 1.0], [1.0, 0.0]])
    values, indices = top_activating(latents, 2)
    assert indices[0].tolist() == [1, 2]
    assert indices[1].tolist() == [0, 1]
    assert values[1].tolist() == [5.0, 1.0]


def test_emb_sim_skips_silent_samples():
    reference = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    latents = torch.tensor([[2.0], [1.0], [0.0]])
    values, indices = top_activating(latents, 3)
    # Only samples 0 and 1 fire; they are parallel, so EmbSim is exactly 1.
    assert emb_sim(reference, indices, values)[0] == pytest.approx(1.0)


def test_win_rate_known_answer():
    a = np.array([0.9, 0.5, 0.2, np.nan])
    b = np.array([0.1, 0.5, 0.3, 0.4])
    result = win_rate(a, b, n_boot=200)
    # Ranks: win, tie (1/2), loss; the NaN rank is left out.
    assert result.value == pytest.approx(0.5)
    assert result.n_compared == 3
    assert result.ci_low <= result.value <= result.ci_high


def test_win_rate_sorts_by_frequency():
    a = np.array([0.1, 0.9])
    frequency_a = np.array([0.1, 0.8])  # the second latent is A's most frequent
    b = np.array([0.5, 0.0])
    frequency_b = np.array([0.9, 0.2])
    assert win_rate(a, b, frequency_a, frequency_b, n_boot=100).value == pytest.approx(1.0)


def _planted_world(n_pairs=300, n_concepts=12, d=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_concepts, d, generator=generator)
    concept = torch.randint(0, n_concepts, (n_pairs,), generator=generator)
    images = centres[concept] + 0.3 * torch.randn(n_pairs, d, generator=generator)
    texts = centres[concept] + 0.3 * torch.randn(n_pairs, d, generator=generator)
    return concept, images, texts


def test_monosemantic_latents_beat_random_dictionary():
    concept, images, texts = _planted_world()
    n_concepts = int(concept.max()) + 1
    # A planted dictionary: latent j fires exactly on concept j. A random one fires at random.
    planted = torch.nn.functional.one_hot(concept, n_concepts).float()
    random_latents = torch.rand(len(concept), n_concepts) * (torch.rand(len(concept), n_concepts) > 0.9)
    table_planted = interpretability_table(planted, planted, images, texts, ms=(10,), sources=("image",))
    table_random = interpretability_table(random_latents, random_latents, images, texts, ms=(10,), sources=("image",))
    result = win_rate(
        table_planted["emb_sim"].to_numpy(),
        table_random["emb_sim"].to_numpy(),
        table_planted["frequency"].to_numpy(),
        table_random["frequency"].to_numpy(),
        n_boot=200,
    )
    assert result.value > 0.9
    summary = summarize_interpretability(table_planted, n_boot=200)
    assert summary.loc[0, "win_rate_vs_random"] > 0.9
    assert summary.loc[0, "emb_sim_ci_low"] <= summary.loc[0, "emb_sim"] <= summary.loc[0, "emb_sim_ci_high"]


def test_random_baseline_is_seeded():
    reference = torch.randn(50, 8)
    first = random_baseline_emb_sim(reference, 10, 5, seed=1)
    assert np.array_equal(first, random_baseline_emb_sim(reference, 10, 5, seed=1))


def test_interpretability_table_sweep_shape():
    concept, images, texts = _planted_world(n_pairs=80)
    latents = torch.nn.functional.one_hot(concept, 12).float()
    table = interpretability_table(latents, latents, images, texts, ms=(5, 10))
    assert set(table["source"]) == {"image", "text", "pooled"}
    assert set(table["m"]) == {5, 10}
    assert len(table) == 3 * 2 * 12


def test_match_latents_recovers_permutation():
    directions = torch.randn(6, 10)
    permutation = torch.tensor([3, 0, 5, 1, 4, 2])
    rows, cols, cosine = match_latents(directions, directions[permutation])
    for row, col in zip(rows, cols):
        assert permutation[col] == row
    assert np.allclose(cosine, 1.0, atol=1e-5)


def test_default_vocabulary_has_words():
    words = load_vocabulary()
    assert len(words) > 5000
    assert "dog" in words
    assert all(word == word.strip() for word in words[:100])


def test_vocabulary_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="one word"):
        load_vocabulary(tmp_path / "absent.txt")


class _Directions:
    def __init__(self, directions):
        self.directions = directions

    def decoder_directions(self):
        return self.directions


class _Groups:
    def __init__(self, groups):
        import pandas as pd

        self.table = pd.DataFrame({"latent": range(len(groups)), "group": groups})


def test_group_stability_matches_permuted_copy():
    from mmono_features.interpret import group_stability

    directions = torch.linalg.qr(torch.randn(8, 8))[0][:6]
    groups = ["ImgD", "ImgD", "TextD", "CrossD", "CrossD", "rare"]
    permutation = [4, 2, 0, 5, 1, 3]
    table = group_stability(
        _Directions(directions),
        _Groups(groups),
        _Directions(directions[permutation]),
        _Groups([groups[j] for j in permutation]),
    ).set_index("group")
    assert (table["jaccard"] == 1.0).all()
    assert table.loc["ImgD", "intersection"] == 2


def test_group_stability_disjoint_groups():
    from mmono_features.interpret import group_stability

    directions = torch.eye(4)
    table = group_stability(
        _Directions(directions), _Groups(["ImgD", "ImgD", "TextD", "TextD"]),
        _Directions(directions), _Groups(["TextD", "TextD", "ImgD", "ImgD"]),
    ).set_index("group")
    assert table.loc["ImgD", "jaccard"] == 0.0
    assert table.loc["TextD", "jaccard"] == 0.0
