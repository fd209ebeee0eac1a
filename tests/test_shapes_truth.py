"""Tests of the shapes-world truth check (evaluation/shapes_truth.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from evaluation.shapes_truth import (
    EXPECTED_GROUP,
    ShapesTruthConfig,
    _associate,
    _shares,
    correlation_ratio,
    linear_probe_accuracy,
    run_shapes_truth,
)
from mmono_features.shapes_world import FACTOR_TYPES

WEIGHTS = Path(__file__).resolve().parents[1] / "assets" / "shapes_world" / "model.safetensors"


def test_correlation_ratio_known_answers():
    labels = np.array(["a", "a", "b", "b"])
    values = np.array(
        [
            [1.0, 1.0, 5.0],  # column 0: fully explained by the labels -> 1
            [1.0, 2.0, 5.0],  # column 1: group means 1.5, 3.5; see below
            [3.0, 3.0, 5.0],  # column 2: constant -> 0
            [3.0, 4.0, 5.0],
        ]
    )
    # Column 1: mean 2.5, between = 2*(1^2) + 2*(1^2) = 4, total = 2.25+0.25+0.25+2.25 = 5.
    np.testing.assert_allclose(correlation_ratio(values, labels), [1.0, 0.8, 0.0])
    # Labels unrelated to the values (balanced within each group) -> 0.
    np.testing.assert_allclose(correlation_ratio(np.array([[0.0], [1.0], [0.0], [1.0]]), np.array([0, 0, 1, 1])), [0.0])
    with pytest.raises(ValueError, match="values must be"):
        correlation_ratio(np.zeros(4), labels)


def test_associate_ties_planted_latents_to_their_factor():
    rng = np.random.default_rng(0)
    n = 400
    meta = pd.DataFrame({f: rng.choice(["x", "y", "z"], size=n) for f in FACTOR_TYPES})
    image = np.zeros((n, 4))
    text = np.zeros((n, 4))
    image[:, 0] = meta["background"] == "x"  # image-only factor, seen on images
    text[:, 1] = meta["framing"] == "y"  # text-only factor, seen on texts
    image[:, 2] = text[:, 2] = meta["colour"] == "z"  # shared factor, on both
    image[:, 3] = rng.random(n) < 0.1  # noise
    table = _associate(image, text, meta, min_association=0.15)
    assert table["factor"].tolist()[:3] == ["background", "framing", "colour"]
    assert table["modality"].tolist()[:2] == ["image", "text"]
    assert table["factor"].iloc[3] == ""
    assert table["factor_type"].iloc[3] == ""
    # An indicator of one label is a function of the labels: all its variance is between groups.
    assert table["association"].iloc[0] == pytest.approx(1.0)


def test_linear_probe_reads_planted_label():
    rng = np.random.default_rng(1)
    labels = rng.choice(["a", "b", "c"], size=300)
    noise = rng.normal(size=(300, 5))
    signal = noise.copy()
    signal[:, 0] += 4.0 * (labels == "b")
    signal[:, 1] += 4.0 * (labels == "c")
    assert linear_probe_accuracy(signal, labels) > 0.95
    assert linear_probe_accuracy(noise, labels) < 0.55  # chance is 1/3
    with pytest.raises(ValueError, match="at least two classes"):
        linear_probe_accuracy(noise, np.array(["a"] * 300))


def test_shares_known_answer():
    latents = pd.DataFrame(
        {
            "factor_type": ["shared", "shared", "shared", "shared", "image_only", ""],
            "group": ["CrossD", "CrossD", "ImgD", "rare", "ImgD", "TextD"],
        }
    )
    table = _shares(latents, "factor_type", ["shared", "image_only", "text_only"], n_boot=200, seed=0)
    shared = table[table["factor_type"] == "shared"].set_index("group")
    assert shared.loc["CrossD", "n_scored"] == 3  # the rare latent has no group
    assert shared.loc["CrossD", "share"] == pytest.approx(2 / 3)
    assert shared.loc["CrossD", "ci_low"] <= 2 / 3 <= shared.loc["CrossD", "ci_high"]
    assert bool(shared.loc["CrossD", "expected"])
    assert not bool(shared.loc["ImgD", "expected"])
    text_only = table[table["factor_type"] == "text_only"]
    assert (text_only["n_scored"] == 0).all()
    assert text_only["share"].isna().all()


def test_config_validation():
    with pytest.raises(ValueError, match="k must not exceed d_sae"):
        ShapesTruthConfig(d_sae=4, k=8)
    with pytest.raises(ValueError, match="min_association"):
        ShapesTruthConfig(min_association=0.0)
    with pytest.raises(ValueError, match="unknown options"):
        run_shapes_truth("/tmp/never-written", n_pairs=60, d_sae_typo=3)


@pytest.mark.skipif(not WEIGHTS.exists(), reason="mmono-shapes weights are not in assets/shapes_world")
def test_run_end_to_end_writes_tables(tmp_path):
    from mmono_features.progress import set_progress

    set_progress(False)
    result = run_shapes_truth(
        tmp_path / "truth", n_pairs=300, seed=2001, d_sae=32, k=4, n_steps=40, batch_size=128, n_boot=50, min_active=5
    )
    out = tmp_path / "truth"
    for name in ("shapes_truth.csv", "shapes_truth_factors.csv", "latents.csv", "probe.csv", "scores.csv", "shapes_truth.json"):
        assert (out / name).is_file(), name
    summary = pd.read_csv(out / "shapes_truth.csv")
    assert list(summary.columns) == ["factor_type", "group", "n_scored", "count", "share", "ci_low", "ci_high", "expected"]
    assert len(summary) == 9  # three factor types x three groups
    for factor_type, rows in summary.groupby("factor_type"):
        assert rows["count"].sum() == rows["n_scored"].iloc[0]
        if rows["n_scored"].iloc[0] > 0:
            assert rows["share"].sum() == pytest.approx(1.0)
        assert rows.loc[rows["expected"], "group"].tolist() == [EXPECTED_GROUP[factor_type]]
    latents = pd.read_csv(out / "latents.csv", keep_default_na=False)
    assert len(latents) == 32
    assert {f"eta2_{f}" for f in FACTOR_TYPES} <= set(latents.columns)
    report = json.loads((out / "shapes_truth.json").read_text())
    assert report["n_latents"] == 32
    assert report["backbone"]["name"] == "mmono-shapes"
    assert report["n_tied"] + report["n_untied"] == report["n_scored"]
    # The trained model encodes colour in both towers, so some latent is tied to a shared factor.
    assert (result.latents["factor_type"] == "shared").any()
    probe = pd.read_csv(out / "probe.csv").set_index(["factor", "modality"])
    assert len(probe) == 2 * len(FACTOR_TYPES)
    assert probe.loc[("colour", "image"), "accuracy"] > 0.9
    assert probe.loc[("colour", "text"), "accuracy"] > 0.9
    # A text-only factor cannot be read from images: nothing of it is drawn.
    assert probe.loc[("framing", "image"), "accuracy"] < probe.loc[("framing", "image"), "chance"] + 0.15


def test_cli_registers_command():
    typer = pytest.importorskip("typer")
    from typer.testing import CliRunner

    from evaluation.shapes_truth import register

    app = typer.Typer()
    register(app)

    @app.command()
    def _other() -> None:  # a second command keeps typer in multi-command mode
        pass

    result = CliRunner().invoke(app, ["shapes-truth", "--help"])
    assert result.exit_code == 0
    assert "--min-association" in result.output
    bad = CliRunner().invoke(app, ["shapes-truth", "--out", "/tmp/x-never", "--d-sae", "2", "--k", "8"])
    assert bad.exit_code == 2
    assert "k must not exceed d_sae" in bad.output
