"""End-to-end runs of the mmono command line on the tiny models and bundled data."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from mmono_features.backbone import assets_dir
from mmono_features.cli import app

runner = CliRunner()


def _invoke(*args: str):
    result = runner.invoke(app, ["--quiet", *args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("extract", "train", "score", "report", "compare", "demo"):
        assert command in result.output


def test_demo_on_tiny_model_writes_labelled_report(tmp_path):
    out = tmp_path / "demo"
    _invoke("demo", "--model", "mmono-tiny", "--data", "demo", "--out", str(out), "--steps", "200", "--device", "cpu")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["weights_label"] == "random weights"
    assert summary["n_pairs"] > 40
    page = (out / "report.html").read_text()
    assert "random weights" in page
    assert (out / "report_files" / "mds_histogram.png").is_file()
    assert (out / "scores.csv").is_file()
    assert (out / "store" / "manifest.json").is_file()


def test_demo_falls_back_when_weights_missing(tmp_path):
    # conftest sets HF_HUB_OFFLINE=1, so the default weights cannot be had.
    out = tmp_path / "demo"
    result = _invoke("demo", "--out", str(out), "--steps", "100", "--device", "cpu")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backbone"]["name"] in ("mmono-shapes", "mmono-tiny")
    assert "shapes" in summary["weights_label"] or summary["weights_label"] == "random weights"
    assert "weights unavailable" in result.output or "could not be loaded" in result.output


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """extract -> train -> score through the CLI on the bundled photographs."""
    import pandas as pd

    root = tmp_path_factory.mktemp("pipeline")
    # The bundled photographs, with markup in every caption so that the report's escaping is tested.
    demo = assets_dir() / "demo"
    table = pd.read_csv(demo / "manifest.csv")
    table["image"] = [str(demo / name) for name in table["image"]]
    table["caption"] = "<script>alert(1)</script> " + table["caption"]
    manifest = root / "manifest.csv"
    table.to_csv(manifest, index=False)
    words = root / "words.txt"
    words.write_text("cat\ndog\nastronaut\nbrick\ngrass\nclock\ncoffee\nrocket\nhorse\ntext\n")
    _invoke("extract", str(manifest), "--out", str(root / "store"), "--model", "mmono-tiny", "--device", "cpu", "--num-workers", "0")
    _invoke("train", str(root / "store"), "--out", str(root / "dict"), "--d-sae", "128", "--k", "8", "--steps", "100",
            "--batch-size", "64", "--device", "cpu")
    _invoke("score", str(root / "store"), str(root / "dict"), "--out", str(root / "scores.csv"), "--min-active", "3",
            "--n-boot", "50", "--device", "cpu", "--vocabulary", str(words))
    return root


def test_score_writes_named_table(pipeline):
    import pandas as pd

    table = pd.read_csv(pipeline / "scores.csv", keep_default_na=False)
    assert len(table) == 128
    assert set(table["group"]) <= {"ImgD", "TextD", "CrossD", "rare"}
    active = table[table["n_active"] > 0]
    silent = table[table["n_active"] == 0]
    assert set(active["name"]) <= {"cat", "dog", "astronaut", "brick", "grass", "clock", "coffee", "rocket", "horse", "text"}
    assert (active["name"] != "").all()
    # A latent that never fires is left unnamed.
    assert (silent["name"] == "").all()
    assert (pipeline / "scores.json").is_file()


def test_report_escapes_captions(pipeline, tmp_path):
    out = tmp_path / "report"
    _invoke("report", str(pipeline / "store"), str(pipeline / "dict"), "--scores", str(pipeline / "scores.csv"), "--out", str(out),
            "--device", "cpu")
    page = (out / "report.html").read_text()
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    for name in ("mds_histogram.png", "mds_frequency.png"):
        assert (out / "report_files" / name).is_file()
    # Every image the page links exists beside it.
    import re

    for src in re.findall(r'src="([^"]+)"', page):
        assert (out / src).is_file(), src


def test_train_every_kind_from_cli(pipeline, tmp_path):
    for kind in ("relu", "batchtopk", "matryoshka", "ncl"):
        extra = ["--prefix-sizes", "16,64,128"] if kind == "matryoshka" else []
        _invoke("train", str(pipeline / "store"), "--out", str(tmp_path / kind), "--kind", kind, "--d-sae", "128", "--k", "8",
                "--steps", "30", "--batch-size", "64", "--device", "cpu", *extra)
        assert (tmp_path / kind / "model.safetensors").is_file()


def test_compare_two_dictionaries(pipeline, tmp_path):
    _invoke("train", str(pipeline / "store"), "--out", str(tmp_path / "other"), "--d-sae", "128", "--k", "8", "--steps", "50",
            "--batch-size", "64", "--seed", "1", "--device", "cpu")
    out = tmp_path / "cmp"
    _invoke("compare", str(pipeline / "store"), str(pipeline / "dict"), str(tmp_path / "other"), "--out", str(out), "--m", "5,10",
            "--min-active", "3", "--n-boot", "50")
    for name in ("metrics.csv", "interpretability.csv", "win_rates.csv", "groups.csv", "comparison.html", "comparison.json"):
        assert (out / name).is_file(), name


def test_invalid_k_reports_limit(pipeline, tmp_path):
    result = runner.invoke(app, ["train", str(pipeline / "store"), "--out", str(tmp_path / "bad"), "--d-sae", "16", "--k", "32",
                                 "--steps", "5", "--device", "cpu"])
    assert result.exit_code != 0
    assert "32" in result.output
    assert "16" in result.output


def test_report_rejects_scores_of_other_dictionary(pipeline, tmp_path):
    other = tmp_path / "other"
    _invoke("train", str(pipeline / "store"), "--out", str(other), "--d-sae", "128", "--k", "8", "--steps", "20",
            "--batch-size", "64", "--seed", "7", "--device", "cpu")
    result = runner.invoke(app, ["report", str(pipeline / "store"), str(other), "--scores", str(pipeline / "scores.csv"),
                                 "--out", str(tmp_path / "report"), "--device", "cpu"])
    assert result.exit_code == 2
    assert "another dictionary" in result.output


def test_train_refuses_to_overwrite(pipeline):
    result = runner.invoke(app, ["train", str(pipeline / "store"), "--out", str(pipeline / "dict"), "--d-sae", "128",
                                 "--steps", "5", "--device", "cpu"])
    assert result.exit_code == 2
    assert "--overwrite" in result.output


def test_score_checks_suffix_first(pipeline, tmp_path):
    result = runner.invoke(app, ["score", str(pipeline / "store"), str(pipeline / "dict"), "--out", str(tmp_path / "s.txt")])
    assert result.exit_code == 2
    assert ".csv or .parquet" in result.output
