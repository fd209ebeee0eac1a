"""``mmono edit`` end to end on the tiny pipeline (2 denoising steps, 16 px images)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from apps.sd_edit.cli import register
from apps.sd_edit.testing import tiny_edit_setup


def _app() -> typer.Typer:
    try:
        from mmono_features.cli import app

        if any(command.name == "edit" for command in app.registered_commands):
            return app
    except ImportError:
        pass
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Local stand-in for the mmono app."""

    register(app)
    return app


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_edit_setup(tmp_path_factory.getbasetemp() / "sd_edit_tiny")


def _base_args(setup, out) -> list[str]:
    return [
        "edit",
        "--prompt", "a red cat on a beach",
        "--pipeline", str(setup.pipeline_dir),
        "--model", "mmono-tiny",
        "--dictionary", str(setup.dictionary_dir),
        "--scores", str(setup.scores_path),
        "--out", str(out),
        "--steps", "2",
        "--device", "cpu",
        "--seed", "0",
    ]  # fmt: skip


def test_edit_writes_outputs(setup, tmp_path):
    name = setup.scores.table.loc[setup.scores.table["latent"] == 3, "name"].item()
    out = tmp_path / "edit"
    result = CliRunner().invoke(_app(), _base_args(setup, out) + ["--feature", name, "--feature", "5", "--sweep", "4"])
    assert result.exit_code == 0, result.output

    summary = json.loads((out / "edit.json").read_text())
    assert summary["strengths"] == [0.0, 4.0]
    assert 3 in [f["latent"] for f in summary["features"]] and 5 in [f["latent"] for f in summary["features"]]
    assert summary["text_tower_check"]["cosine"] > 0.9999
    assert summary["backbone"]["name"] == "mmono-tiny"
    eot = summary["eot_position"]
    before, *after = summary["images"]
    assert before["changed_tokens"] == []
    assert before["hidden_change_norm"] == 0
    assert all(record["changed_tokens"] == [eot] for record in after)
    assert name in before["clip_score_features"]
    assert set(before["activations"]) >= {"3", "5"}

    pixels = [np.asarray(Image.open(out / record["file"])) for record in summary["images"]]
    assert pixels[0].shape == (16, 16, 3)
    assert not np.array_equal(pixels[0], pixels[1])
    grid = Image.open(out / "grid.png")
    assert grid.size == (2 * 128, 128 + 18)

    # The unedited image equals a plain diffusers call with the same seed.
    import torch

    from apps.sd_edit.pipeline import PipelineConfig, load_pipeline

    pipe = load_pipeline(PipelineConfig(source=str(setup.pipeline_dir), device="cpu"))
    plain = pipe("a red cat on a beach", num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(0)).images[0]
    assert np.array_equal(np.asarray(plain), pixels[0])


def test_suppress_group_all_tokens(setup, tmp_path):
    group = next(g for g in ("CrossD", "ImgD", "TextD") if len(setup.scores.latents(g)))
    dictionary = setup.dictionary
    prompt_latents = dictionary.encode(dictionary.prepare(setup.backbone.encode_texts(["a red cat on a beach"]), "text"))
    top = int(prompt_latents[0].argmax())
    out = tmp_path / "suppress"
    args = _base_args(setup, out) + [
        "--feature", str(top), "--group", group, "--suppress", "--token-position", "all",
        "--negative-prompt", "blurry", "--scheduler", "euler", "--no-safety-checker",
    ]  # fmt: skip
    result = CliRunner().invoke(_app(), args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "edit.json").read_text())
    assert summary["mode"] == "suppress"
    assert summary["strengths"] == [0.0, 1.0]
    expected = [top] + [j for j in setup.scores.latents(group).tolist() if j != top]
    assert [f["latent"] for f in summary["features"]] == expected
    assert summary["prompt_activations"][str(top)] > 0
    assert summary["images"][1]["changed_tokens"] == list(range(77))
    assert summary["pipeline"]["scheduler"] == "EulerDiscreteScheduler"


def test_other_backbone_dictionary_rejected(setup, tmp_path):
    other = tmp_path / "other-dictionary"
    shutil.copytree(setup.dictionary_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["backbone"] = {**config["backbone"], "checkpoint_sha256": "random-init-seed-7"}
    (other / "config.json").write_text(json.dumps(config))
    args = _base_args(setup, tmp_path / "refused")
    args[args.index("--dictionary") + 1] = str(other)
    result = CliRunner().invoke(_app(), args + ["--feature", "3"])
    assert result.exit_code == 2
    assert "rejected" in result.output
    assert "random-init-seed-7" in result.output
    assert "random-init-seed-0" in result.output
    assert not (tmp_path / "refused" / "edit.json").exists()


def test_bad_options_exit_with_fix(setup, tmp_path):
    result = CliRunner().invoke(_app(), _base_args(setup, tmp_path / "x") + ["--feature", "3", "--dtype", "fp16"])
    assert result.exit_code == 2
    assert "fp16" in result.output
    assert "CPU" in result.output
    result = CliRunner().invoke(_app(), _base_args(setup, tmp_path / "x") + ["--feature", "3", "--token-position", "first"])
    assert result.exit_code == 2
    assert "--token-position" in result.output
    result = CliRunner().invoke(_app(), _base_args(setup, tmp_path / "x") + ["--feature", "3", "--sweep", "0,a"])
    assert result.exit_code == 2
    assert "--sweep" in result.output
