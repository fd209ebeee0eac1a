"""End to end: `mmono bias-audit` on a tiny model, dictionary and scores built here."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import typer
from typer.testing import CliRunner

from apps.bias_audit.synthetic import write_synthetic_audit_set

MODEL = "mmono-shapes" if (Path(__file__).resolve().parents[2] / "assets/shapes_world/model.safetensors").is_file() else "mmono-tiny"


def _mmono_app() -> typer.Typer:
    try:
        from mmono_features.cli import app
    except ImportError:  # the shared CLI is missing: a local app with only this command
        from apps.bias_audit.cli import register

        app = typer.Typer()
        register(app)
    return app


@pytest.fixture(scope="module")
def audit_inputs(tmp_path_factory):
    """A 20-row audit table (2 unknown genders, 1 corrupt and 1 missing image), a trained
    TopK dictionary and its scores."""
    from mmono_features.backbone import load_backbone
    from mmono_features.data import load_image
    from mmono_features.dictionary import TrainConfig, make_config, train_dictionary
    from mmono_features.modality import score_dictionary

    root = tmp_path_factory.mktemp("bias_audit")
    backbone = load_backbone(MODEL, device="cpu", seed=0)

    # training pairs: drawn figures with captions naming the figure
    train_rows = write_synthetic_audit_set(root, n=64, seed=1, size=32, subfolder="train")
    images = torch.stack([backbone.preprocess(load_image(root / r["image"])) for r in train_rows])
    captions = [
        f"a drawing of a {'woman' if r['source'].startswith('drawn (female') else 'man'} who is a {r['occupation']}"
        for r in train_rows
    ]
    image_z, text_z = backbone.encode_images(images), backbone.encode_texts(captions)
    config = make_config("topk", d_in=backbone.embed_dim, d_sae=32, k=4, backbone=backbone.identity())
    train = TrainConfig(
        lr=3e-3, batch_size=32, n_steps=40, warmup_steps=5, device="cpu", log_every=0, eval_fraction=0.0, init_samples=64
    )
    dictionary = train_dictionary((image_z, text_z), config, train).dictionary
    dictionary_dir = dictionary.save_pretrained(root / "dictionary")
    scores = score_dictionary(dictionary, image_z, text_z, min_active=2, n_boot=20)
    scores_path = scores.save(root / "scores.csv")

    # the audit table
    rows = write_synthetic_audit_set(root, n=18, seed=2, size=32, subfolder="audit", n_unknown=2)
    (root / "audit" / "broken.png").write_bytes(b"not a png")
    rows.append({"image": "audit/broken.png", "gender": "female", "occupation": "chef", "source": "broken"})
    rows.append({"image": "audit/<missing>.png", "gender": "male", "occupation": "doctor", "source": "missing"})
    table = root / "audit.csv"
    with table.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return {"table": table, "dictionary": dictionary_dir, "scores": scores_path, "root": root}


def test_cli_writes_json_csv_and_html(audit_inputs, tmp_path):
    out = tmp_path / "out"
    args = [
        "bias-audit", str(audit_inputs["table"]), "--model", MODEL, "--dictionary", str(audit_inputs["dictionary"]),
        "--scores", str(audit_inputs["scores"]), "--out", str(out), "--device", "cpu",
        "--n-random", "2", "--n-boot", "40", "--top", "5", "--seed", "0",
    ]
    result = CliRunner().invoke(_mmono_app(), args)
    assert result.exit_code == 0, result.output
    for name in ("audit.json", "metrics.csv", "audit.html"):
        assert (out / name).is_file()

    summary = json.loads((out / "audit.json").read_text())
    counts = summary["input"]["group_counts"]
    assert counts == {"female": 9, "male": 9, "unknown": 2}
    assert sum(counts.values()) == summary["input"]["n_rows"] == 20
    assert summary["input"]["n_skipped"] == 2
    assert {s["path"].rsplit("/", 1)[-1] for s in summary["input"]["skipped"]} == {"broken.png", "<missing>.png"}
    assert set(summary["metrics"]) >= {"none", "ImgD", "TextD", "CrossD"}
    base = summary["metrics"]["none"]["female"]
    assert set(base["by_group"]) == {"female", "male", "unknown"}
    # gender task on gender: the male group has no true "female", so its TPR is undefined
    assert base["by_group"]["male"]["true_positive_rate"] is None
    assert {"group": "male", "metric": "true_positive_rate"} in base["undefined"]
    assert summary["associated_latents"]["caption"], "caption pairs give a latent list"

    metrics = pd.read_csv(out / "metrics.csv")
    assert {"ablation", "positive_label", "scope", "group", "metric", "value", "ci_low", "ci_high"} <= set(metrics.columns)
    assert set(metrics["ablation"]) == set(summary["metrics"])

    page = (out / "audit.html").read_text()
    assert "data:image/png;base64," in page
    assert "&lt;missing&gt;.png" in page  # escaped
    assert "<missing>.png" not in page


def test_run_audit_api_attribute_task(audit_inputs, tmp_path):
    from apps.bias_audit import AuditConfig, run_audit

    # A user prompt set whose label needs escaping in the page.
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({
        "templates": ["a drawing of a {}.", "a {} at work."],
        "classes": {"doctor": ["doctor"], "chef": ["chef", "cook"], "<b>nurse</b>": ["nurse"]},
        "label_column": "occupation",
    }))
    config = AuditConfig(
        data=str(audit_inputs["table"]), dictionary=str(audit_inputs["dictionary"]), scores=str(audit_inputs["scores"]),
        out=str(tmp_path / "api"), model=MODEL, device="cpu", task="attribute", positive_labels=("all",),
        prompts=str(prompts), n_random=1, n_boot=20, ablate_from="image",
    )
    result = run_audit(config)
    assert result.positive_labels == ["doctor", "chef", "<b>nurse</b>"]
    assert len(result.predictions) == 18
    assert result.prompt_set.prompts[1] == ("a drawing of a chef.", "a drawing of a cook.", "a chef at work.", "a cook at work.")
    # no row has the label "<b>nurse</b>": its true positive rate is undefined everywhere
    nurse = result.metrics["none"]["<b>nurse</b>"]
    assert nurse.by_group["true_positive_rate"].isna().all()
    page = Path(result.outputs["html"]).read_text()
    assert "&lt;b&gt;nurse&lt;/b&gt;" in page
    assert "<b>nurse" not in page
    for ablation in result.ablations:
        if not ablation.is_random and not ablation.latents:  # an empty group equals the baseline exactly
            pd.testing.assert_frame_equal(
                result.metrics[ablation.name]["doctor"].by_group, result.metrics["none"]["doctor"].by_group
            )


def test_cli_reports_bad_input(audit_inputs, tmp_path):
    args = [
        "bias-audit", str(audit_inputs["table"]), "--model", MODEL, "--dictionary", str(audit_inputs["dictionary"]),
        "--scores", str(audit_inputs["scores"]), "--out", str(tmp_path), "--unknown", "reject", "--device", "cpu",
    ]
    result = CliRunner().invoke(_mmono_app(), args)
    assert result.exit_code == 2
    assert "gender" in result.output
    assert "2 of 20" in result.output
