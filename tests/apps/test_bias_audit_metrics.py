"""Known-answer tests of the bias-audit metrics, inputs and prompt sets."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from apps.bias_audit.inputs import read_audit_table
from apps.bias_audit.metrics import bootstrap_replicates, compute_group_metrics
from apps.bias_audit.tasks import class_embeddings, default_prompt_set_path, load_caption_pairs, load_prompt_set

# Hand-made predictions. Group "f": 4 rows, "m": 3 rows (no true "female": its TPR is
# undefined), "unknown": 2 rows, one of them without a true label.
Y_TRUE = ["female", "female", "male", "female", "male", "male", "male", None, "female"]
Y_PRED = ["female", "male", "male", "female", "female", "male", "male", "female", "female"]
GROUPS = ["f", "f", "f", "f", "m", "m", "m", "unknown", "unknown"]


def test_group_metrics_hand_computed(caplog):
    with caplog.at_level(logging.WARNING, logger="apps.bias_audit.metrics"):
        gm = compute_group_metrics(Y_TRUE, Y_PRED, GROUPS, positive_label="female")
    f, m, u = (gm.by_group.loc[g] for g in ("f", "m", "unknown"))
    assert f["accuracy"] == pytest.approx(3 / 4)
    assert f["selection_rate"] == pytest.approx(2 / 4)
    assert f["true_positive_rate"] == pytest.approx(2 / 3)
    assert f["false_positive_rate"] == pytest.approx(0.0)
    assert f["count"] == 4
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["selection_rate"] == pytest.approx(1 / 3)
    assert math.isnan(m["true_positive_rate"])  # no positive example: NaN, never 0
    assert m["false_positive_rate"] == pytest.approx(1 / 3)
    assert u["accuracy"] == pytest.approx(1.0)  # only the row with a known label counts
    assert u["selection_rate"] == pytest.approx(1.0)
    assert math.isnan(u["false_positive_rate"])
    assert gm.by_group["count"].sum() == len(Y_TRUE)
    # overall: 8 rows with a known label
    assert gm.overall["accuracy"] == pytest.approx(6 / 8)
    assert gm.overall["selection_rate"] == pytest.approx(5 / 9)
    assert gm.overall["true_positive_rate"] == pytest.approx(3 / 4)
    assert gm.overall["false_positive_rate"] == pytest.approx(1 / 4)
    # disparities over f and m only ("unknown" is not a group to compare)
    assert gm.disparities["demographic_parity_difference"] == pytest.approx(1 / 2 - 1 / 3)
    assert gm.disparities["demographic_parity_ratio"] == pytest.approx((1 / 3) / (1 / 2))
    assert math.isnan(gm.disparities["equalized_odds_difference"])  # TPR range needs 2 groups
    assert ("m", "true_positive_rate") in gm.undefined
    assert any("'m'" in r.message and "true_positive_rate" in r.message for r in caplog.records)


def test_disparities_match_fairlearn():
    from fairlearn.metrics import (
        demographic_parity_difference,
        demographic_parity_ratio,
        equalized_odds_difference,
    )

    rng = np.random.default_rng(1)
    n = 200
    groups = rng.choice(["a", "b", "c"], size=n)
    y_true = rng.choice(["cat", "dog", "bird"], size=n)
    y_pred = np.where(rng.random(n) < 0.6, y_true, rng.choice(["cat", "dog", "bird"], size=n))
    gm = compute_group_metrics(list(y_true), list(y_pred), list(groups), positive_label="dog")
    t, p = (y_true == "dog").astype(int), (y_pred == "dog").astype(int)
    assert gm.disparities["demographic_parity_difference"] == pytest.approx(
        demographic_parity_difference(t, p, sensitive_features=groups)
    )
    assert gm.disparities["demographic_parity_ratio"] == pytest.approx(demographic_parity_ratio(t, p, sensitive_features=groups))
    assert gm.disparities["equalized_odds_difference"] == pytest.approx(
        equalized_odds_difference(t, p, sensitive_features=groups)
    )


def test_bootstrap_intervals_bracket_estimates():
    rng = np.random.default_rng(0)
    n = 300
    groups = rng.choice(["x", "y"], size=n)
    y_true = rng.choice(["pos", "neg"], size=n)
    y_pred = np.where(rng.random(n) < 0.7, y_true, "pos")
    reps = bootstrap_replicates(groups, n_boot=200, seed=3)
    assert reps.shape == (200, n)
    assert (groups[reps] == groups[None, :]).all()  # stratified: a row stays in its group
    gm = compute_group_metrics(list(y_true), list(y_pred), list(groups), "pos", replicates=reps)
    for group, row in gm.by_group.iterrows():
        for metric in ("accuracy", "selection_rate", "true_positive_rate"):
            assert row[f"{metric}_low"] <= row[metric] <= row[f"{metric}_high"]
        assert row["count_low"] == row["count"] == row["count_high"]
    d = gm.disparities
    assert d["demographic_parity_difference_low"] <= d["demographic_parity_difference_high"]
    again = compute_group_metrics(list(y_true), list(y_pred), list(groups), "pos", replicates=bootstrap_replicates(groups, 200, 3))
    assert again.by_group.equals(gm.by_group)
    # The numpy recomputation on identity replicates equals fairlearn's point estimates.
    identity = np.arange(n)[None, :]
    same = compute_group_metrics(list(y_true), list(y_pred), list(groups), "pos", replicates=identity)
    for metric in ("accuracy", "selection_rate", "true_positive_rate", "false_positive_rate"):
        np.testing.assert_allclose(same.by_group[f"{metric}_low"], same.by_group[metric])


def test_metrics_without_labels():
    gm = compute_group_metrics(None, ["a", "b", "a"], ["g1", "g1", "g2"], positive_label="a")
    assert gm.by_group.loc["g1", "selection_rate"] == pytest.approx(0.5)
    assert math.isnan(gm.by_group.loc["g1", "accuracy"])
    assert ("g2", "accuracy") in gm.undefined


def test_read_table_unknown_values(tmp_path):
    table = tmp_path / "audit.csv"
    table.write_text("image,gender,occupation\na.png,Female,doctor\nb.png,M,nurse\nc.png,,chef\nd.png,unknown,chef\ne.png,woman,pilot\n")
    audit = read_audit_table(table)
    assert audit.group_counts == {"female": 2, "male": 1, "unknown": 2}
    assert sum(audit.group_counts.values()) == len(audit) == 5
    assert audit.frame["image"].iloc[0] == str((tmp_path / "a.png").resolve())
    with pytest.raises(ValueError, match=r"column 'gender' has 2 of 5 rows"):
        read_audit_table(table, unknown="reject")
    with pytest.raises(ValueError, match="sensitive column 'race' not found"):
        read_audit_table(table, sensitive="race")


def test_read_celeba_fairface_layouts(tmp_path):
    celeba = tmp_path / "list_attr_celeba.txt"
    celeba.write_text("2\nSmiling Male Young\n000001.jpg  1 -1  1\n000002.jpg -1  1 -1\n")
    audit = read_audit_table(celeba, layout="celeba")
    assert audit.frame["gender"].tolist() == ["female", "male"]
    assert audit.frame["age"].tolist() == ["young", "old"]
    assert audit.frame["Smiling"].tolist() == ["yes", "no"]
    by_age = read_audit_table(celeba, layout="celeba", sensitive="age")
    assert by_age.group_counts == {"old": 1, "young": 1}

    fairface = tmp_path / "fairface_label_train.csv"
    fairface.write_text("file,age,gender,race,service_test\ntrain/1.jpg,50-59,Male,East Asian,True\ntrain/2.jpg,30-39,Female,Indian,False\n")
    audit = read_audit_table(fairface, layout="fairface", sensitive="race")
    assert audit.group_counts == {"east asian": 1, "indian": 1}
    assert audit.frame["image"].iloc[0].endswith("train/1.jpg")


def test_prompt_sets_and_class_embeddings():
    gender = load_prompt_set(default_prompt_set_path("gender"))
    assert gender.labels == ("male", "female")
    assert gender.positive_label == "female"
    assert all(len(p) == 5 for p in gender.prompts)
    attribute = load_prompt_set(default_prompt_set_path("attribute"))
    assert len(attribute.labels) >= 10
    pairs = load_caption_pairs()
    assert pairs.groups == ("male", "female")
    assert len(pairs.pairs) >= 20
    # class embedding = normalised mean of normalised prompt embeddings
    z = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, -5.0]])
    index = torch.tensor([0, 0, 1])
    emb = class_embeddings(z, index, 2)
    torch.testing.assert_close(emb, torch.tensor([[2**-0.5, 2**-0.5], [0.0, -1.0]]))
