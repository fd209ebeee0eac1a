"""Tests of the adversarial app: classifier, attacks, defense, evaluation, shift, report.

The model is ``mmono-shapes`` (a tiny CLIP trained on the shapes world) when its weights
are present, else the random ``mmono-tiny`` with image-prototype class embeddings on
near-grey colour classes, which that random model separates.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from apps.adversarial import (
    AttackConfig,
    FeatureFilterDefense,
    ModelStateChanged,
    build_classifier,
    build_defense,
    feature_shift,
    format_eps,
    load_defense_spec,
    parse_eps,
    pixel_transform,
    run_attack,
    run_evaluation,
    select_shifted_latents,
    write_results,
)
from apps.adversarial.defense import _uncenter
from apps.adversarial.shift import latent_shift, shift_by_group
from mmono_features.backbone import assets_dir

CLASSES = ("red", "green", "blue")
SHAPES_WEIGHTS = "shapes_world/model.safetensors"
# Colour is a robust feature of the shapes model: 5 PGD steps at 4/255 flip few images,
# at 8/255 about half of them.
EVAL_EPS = 8 / 255


def _shapes_available() -> bool:
    try:
        return (assets_dir() / SHAPES_WEIGHTS).is_file()
    except FileNotFoundError:
        return False


def _shapes_templates():
    """Zero-shot templates of the shapes world for a colour class, over the other shared factors."""
    from mmono_features.shapes_world import ZERO_SHOT_TEMPLATES, fill_template

    templates = []
    for shape in ("circle", "square", "triangle", "cross"):
        for template in ZERO_SHOT_TEMPLATES:
            factors = {"shape": shape, "count": "one", "position": "centre"}
            templates.append(lambda c, t=template, f=factors: fill_template(t, {**f, "colour": c}))
    return templates


def _shapes_world(n_per_class: int, seed: int):
    """Pixels (n, 3, 32, 32), labels and captions of shapes-world pairs of each colour class."""
    from mmono_features.shapes_world import generate_pairs

    pairs, labels = [], []
    for label, colour in enumerate(CLASSES):
        chosen = generate_pairs(n_per_class, seed=seed + label, fixed={"colour": colour, "count": "one"})
        pairs.extend(chosen)
        labels.extend([label] * len(chosen))
    return [p.image for p in pairs], torch.tensor(labels), [p.caption for p in pairs]


def _grey_world(n_per_class: int, seed: int):
    """Near-grey images whose classes differ by +0.04 in one channel, and matching captions."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(CLASSES)).repeat(n_per_class)
    base = torch.full((3, 3), 0.5) + 0.04 * torch.eye(3)
    pixels = (base[labels][:, :, None, None] + 0.01 * torch.randn(len(labels), 3, 32, 32, generator=generator)).clamp(0, 1)
    images = [Image.fromarray((p.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for p in pixels]
    captions = [f"a photo of a {CLASSES[i]} square" for i in labels.tolist()]
    return images, labels, captions


@pytest.fixture(scope="module")
def world(request):
    """Backbone, classifier and labelled pixels; also a dictionary and scores trained on pairs."""
    if _shapes_available():
        backbone = request.getfixturevalue("shapes_backbone")
        images, labels, captions = _shapes_world(4, seed=100)
        train_images, _, train_captions = _shapes_world(40, seed=200)
    else:
        backbone = request.getfixturevalue("tiny_backbone")
        images, labels, captions = _grey_world(4, seed=100)
        train_images, _, train_captions = _grey_world(40, seed=200)
    to_pixels = pixel_transform(backbone)
    pixels = torch.stack([to_pixels(image) for image in images])
    if _shapes_available():
        classifier = build_classifier(backbone, CLASSES, templates=_shapes_templates())
    else:
        prototype_classifier = build_classifier(backbone, CLASSES, templates=["a photo of a {}."])
        with torch.no_grad():
            z = F.normalize(prototype_classifier.image_embeddings(pixels), dim=-1)
        prototypes = torch.stack([z[labels == k].mean(0) for k in range(len(CLASSES))])
        classifier = build_classifier(backbone, CLASSES, class_embeddings=prototypes)

    train_pixels = torch.stack([backbone.preprocess(image) for image in train_images])
    image_z = backbone.encode_images(train_pixels)
    text_z = backbone.encode_texts(train_captions)
    dictionary = _train_dictionary(image_z, text_z, backbone)
    from mmono_features.modality import score_dictionary

    scores = score_dictionary(dictionary, image_z, text_z, min_active=2, n_boot=50)
    return {
        "backbone": backbone,
        "classifier": classifier,
        "images": images,
        "pixels": pixels,
        "labels": labels,
        "dictionary": dictionary,
        "scores": scores,
        "image_z": image_z,
        "text_z": text_z,
    }


def _train_dictionary(image_z: torch.Tensor, text_z: torch.Tensor, backbone):
    from mmono_features.dictionary import TrainConfig, make_config, train_dictionary

    config = make_config("topk", backbone.embed_dim, 128, k=8, backbone=backbone.identity())
    train_config = TrainConfig(batch_size=32, n_steps=60, warmup_steps=5, lr=2e-3, seed=0, device="cpu", log_every=0)
    result = train_dictionary((image_z, text_z), config, train_config)
    return result.dictionary.eval()


def _backbone_state(backbone) -> tuple:
    model = backbone.model
    return tuple(m.training for m in model.modules()), tuple(p.requires_grad for p in model.parameters())


# --------------------------------------------------------------------------- budgets


def test_parse_eps_known_values():
    assert parse_eps("4/255") == pytest.approx(4 / 255)
    assert parse_eps(" 0.5 ") == 0.5
    assert parse_eps(0) == 0.0
    assert parse_eps("1e-2") == pytest.approx(0.01)


@pytest.mark.parametrize("text", ["abc", "-1/255", "1/0", "nan", "4/"])
def test_parse_eps_rejects_bad_text(text):
    with pytest.raises(ValueError, match="eps"):
        parse_eps(text)


def test_format_eps_round_trip():
    assert format_eps(4 / 255) == "4/255"
    assert format_eps(0.5) == "1/2"
    assert parse_eps(format_eps(8 / 255)) == pytest.approx(8 / 255)
    assert format_eps(None) == "none"


def test_attack_config_defaults():
    pgd = AttackConfig("PGD")
    assert pgd.name == "pgd"
    assert pgd.eps == pytest.approx(4 / 255)
    assert pgd.step_size == pytest.approx(1 / 255)
    assert pgd.steps == 10
    assert AttackConfig("pgdl2").eps == 0.5
    assert AttackConfig("cw").eps is None
    assert AttackConfig("pgd", eps="8/255", alpha="2/255").step_size == pytest.approx(2 / 255)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"name": "deepfool"}, "unknown attack"), ({"name": "pgd", "steps": 0}, "steps"), ({"name": "pgd", "eps": -0.1}, "eps")],
)
def test_attack_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttackConfig(**kwargs)


# --------------------------------------------------------------------------- classifier


def test_classifier_matches_extraction(world):
    from torchvision.transforms.functional import to_tensor

    backbone, classifier = world["backbone"], world["classifier"]
    images = world["images"][:4]
    # The images already have the backbone's size, so to_tensor is the whole resize step.
    pixels = torch.stack([to_tensor(image) for image in images])
    extracted = backbone.encode_images(torch.stack([backbone.preprocess(image) for image in images]))
    with torch.no_grad():
        embedded = classifier.image_embeddings(pixels)
        logits = classifier(pixels)
    torch.testing.assert_close(embedded, extracted, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, classifier.logits_from_embeddings(extracted), rtol=1e-4, atol=1e-4)


def test_pixel_transform_drops_only_normalize(world):
    backbone = world["backbone"]
    image = world["images"][0]
    mean = torch.tensor(backbone.image_mean).view(3, 1, 1)
    std = torch.tensor(backbone.image_std).view(3, 1, 1)
    torch.testing.assert_close((pixel_transform(backbone)(image) - mean) / std, backbone.preprocess(image))


def test_logits_known_answer(world):
    classifier = world["classifier"]
    z = torch.randn(5, classifier.class_embeddings.shape[1])
    expected = classifier.logit_scale * F.cosine_similarity(z[:, None, :], classifier.class_embeddings[None], dim=-1)
    torch.testing.assert_close(classifier.logits_from_embeddings(z), expected, rtol=1e-5, atol=1e-5)


def test_class_embeddings_average_templates(tiny_backbone):
    templates = ["a photo of a {}.", lambda c: f"art of the {c}."]
    classifier = build_classifier(tiny_backbone, ["cat", "dog"], templates=templates)
    text = F.normalize(tiny_backbone.encode_texts(["a photo of a dog.", "art of the dog."]), dim=-1)
    torch.testing.assert_close(classifier.class_embeddings[1], F.normalize(text.mean(0), dim=0))


def test_classifier_rejects_out_of_range(world):
    classifier = world["classifier"]
    with pytest.raises(ValueError, match=r"\[0, 1\]; got values in \[-0\.5"):
        classifier(torch.full((1, 3, 32, 32), -0.5))


def test_classifier_rejects_wrong_size(world):
    with pytest.raises(ValueError, match="pixel_transform"):
        world["classifier"](torch.zeros(1, 3, 16, 16))


def test_classifier_train_keeps_backbone_eval(world):
    classifier, backbone = world["classifier"], world["backbone"]
    before = _backbone_state(backbone)
    classifier.train()
    assert classifier.training
    assert _backbone_state(backbone) == before
    assert not backbone.model.training
    classifier.eval()
    assert not any(p.requires_grad for p in backbone.model.parameters())


def test_gradient_reaches_pixels(world):
    pixels = world["pixels"][:2].clone().requires_grad_(True)
    world["classifier"](pixels).logsumexp(dim=1).sum().backward()
    assert pixels.grad is not None
    assert pixels.grad.abs().sum() > 0
    assert all(p.grad is None for p in world["backbone"].model.parameters())


# --------------------------------------------------------------------------- attacks


@pytest.mark.parametrize("name", ["pgd", "fgsm"])
def test_eps_zero_leaves_images_unchanged(world, name):
    pixels, labels = world["pixels"], world["labels"]
    adversarial = run_attack(AttackConfig(name, eps=0, steps=2), world["classifier"], pixels, labels)
    assert torch.equal(adversarial, pixels)


def test_eps_zero_robust_equals_clean(world):
    result = run_evaluation(
        world["classifier"], None, (world["pixels"], world["labels"]), [AttackConfig("pgd", eps=0, steps=2)],
        modes=("non-adaptive",), n_boot=50,
    )
    table = result.table.set_index("mode")
    assert table.loc["non-adaptive", "accuracy"] == table.loc["clean", "accuracy"]
    assert table.loc["non-adaptive", "success_rate"] == 0.0


def test_pgd_respects_budget(world):
    pixels, labels = world["pixels"], world["labels"]
    eps = 4 / 255
    adversarial = run_attack(AttackConfig("pgd", eps="4/255", steps=3), world["classifier"], pixels, labels)
    assert (adversarial - pixels).abs().max() <= eps + 1e-6
    assert adversarial.min() >= 0.0
    assert adversarial.max() <= 1.0
    assert not torch.equal(adversarial, pixels)


def test_pgdl2_respects_budget(world):
    pixels, labels = world["pixels"][:4], world["labels"][:4]
    adversarial = run_attack(AttackConfig("pgdl2", eps=0.5, steps=2), world["classifier"], pixels, labels)
    assert (adversarial - pixels).flatten(1).norm(dim=1).max() <= 0.5 + 1e-4
    assert adversarial.min() >= 0.0
    assert adversarial.max() <= 1.0


def test_cw_stays_in_pixel_range(world):
    pixels, labels = world["pixels"][:3], world["labels"][:3]
    adversarial = run_attack(AttackConfig("cw", steps=3), world["classifier"], pixels, labels)
    assert adversarial.shape == pixels.shape
    assert adversarial.min() >= 0.0
    assert adversarial.max() <= 1.0


@pytest.mark.slow
def test_autoattack_respects_budget(world):
    pixels, labels = world["pixels"][:3], world["labels"][:3]
    adversarial = run_attack(AttackConfig("autoattack", eps="4/255"), world["classifier"], pixels, labels)
    assert (adversarial - pixels).abs().max() <= 4 / 255 + 1e-6
    assert adversarial.min() >= 0.0
    assert adversarial.max() <= 1.0


def test_attack_is_deterministic(world):
    pixels, labels = world["pixels"][:4], world["labels"][:4]
    config = AttackConfig("pgd", steps=2)
    first = run_attack(config, world["classifier"], pixels, labels, seed=3)
    second = run_attack(config, world["classifier"], pixels, labels, seed=3)
    assert torch.equal(first, second)


@pytest.mark.parametrize("train_mode", [False, True])
def test_attack_leaves_backbone_state(world, train_mode):
    classifier, backbone = world["classifier"], world["backbone"]
    defense = FeatureFilterDefense(classifier, world["dictionary"], [0, 1, 2], strength=1.0)
    before = _backbone_state(backbone)
    for model in (classifier, defense):
        model.train(train_mode)
        run_attack(AttackConfig("pgd", steps=1), model, world["pixels"][:2], world["labels"][:2])
        assert model.training == train_mode
        assert _backbone_state(backbone) == before
        model.eval()
    assert not backbone.model.training


def test_state_change_is_detected_and_restored():
    class Toggling(nn.Module):
        n_classes = 2

        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3 * 4 * 4, 2)
            self.linear.requires_grad_(False)

        def forward(self, x):
            self.linear.weight.requires_grad_(True)
            return self.linear(x.flatten(1))

    model = Toggling()
    with pytest.raises(ModelStateChanged, match="restored"):
        run_attack(AttackConfig("fgsm"), model, torch.rand(2, 3, 4, 4), torch.tensor([0, 1]))
    assert not model.linear.weight.requires_grad


# --------------------------------------------------------------------------- defense


def test_strength_zero_is_exact_identity(world):
    classifier, pixels = world["classifier"], world["pixels"]
    defense = build_defense(classifier, world["dictionary"], world["scores"], group="ImgD", strength=0.0)
    with torch.no_grad():
        assert torch.equal(defense(pixels), classifier(pixels))
    assert not defense.active


def test_strength_one_zeroes_latents_known_answer(world):
    dictionary = world["dictionary"]
    chosen = [0, 5, 9]
    defense = FeatureFilterDefense(world["classifier"], dictionary, chosen, strength=1.0)
    z = world["image_z"][:6]
    prepared = dictionary.prepare(z, "image")
    latents = dictionary.encode(prepared)
    zeroed = latents.clone()
    zeroed[:, chosen] = 0
    expected = prepared + dictionary.decode(zeroed) - dictionary.decode(latents)
    with torch.no_grad():
        torch.testing.assert_close(defense.filter_embeddings(z), expected, rtol=1e-5, atol=1e-5)


def test_defense_is_differentiable(world):
    defense = FeatureFilterDefense(world["classifier"], world["dictionary"], list(range(0, 128, 2)), strength=1.0)
    pixels = world["pixels"][:3].clone().requires_grad_(True)
    defense(pixels).logsumexp(dim=1).sum().backward()
    assert torch.isfinite(pixels.grad).all()
    assert pixels.grad.abs().sum() > 0


def test_uncenter_inverts_centred_prepare():
    from mmono_features.embeddings import normalize_embeddings

    generator = torch.Generator().manual_seed(0)
    u = F.normalize(torch.randn(6, 16, generator=generator) + 2.0, dim=-1)
    center = u.mean(dim=0)
    centred = normalize_embeddings(u, center=center)
    torch.testing.assert_close(_uncenter(centred, center), u, rtol=1e-5, atol=1e-5)


def test_build_defense_uses_group(world):
    scores = world["scores"]
    defense = build_defense(world["classifier"], world["dictionary"], scores, group="TextD")
    assert defense.latents == scores.latents("TextD").tolist()
    assert defense.source["group"] == "TextD"


@pytest.mark.parametrize(
    "kwargs, match",
    [({"group": "Image"}, "group must be one of"), ({"group": "ImgD", "scores": None}, "needs a Scores"), ({"latents": [999]}, "outside")],
)
def test_build_defense_rejects_bad_source(world, kwargs, match):
    options = {"scores": world["scores"]} | kwargs
    with pytest.raises(ValueError, match=match):
        build_defense(world["classifier"], world["dictionary"], **options)


def test_defense_rejects_bad_strength(world):
    with pytest.raises(ValueError, match="strength"):
        FeatureFilterDefense(world["classifier"], world["dictionary"], [1], strength=1.5)


def test_defense_json_round_trip(world, tmp_path):
    defense = FeatureFilterDefense(world["classifier"], world["dictionary"], [7, 3], strength=0.5)
    spec = load_defense_spec(defense.save(tmp_path / "defense.json"))
    rebuilt = FeatureFilterDefense(world["classifier"], world["dictionary"], spec["latents"], spec["strength"], source=spec["source"])
    assert rebuilt.latents == [3, 7]
    assert rebuilt.strength == 0.5
    with torch.no_grad():
        assert torch.equal(rebuilt(world["pixels"]), defense(world["pixels"]))


def test_select_shifted_latents_matches_shift(world):
    classifier, dictionary = world["classifier"], world["dictionary"]
    attack = AttackConfig("pgd", steps=2)
    selection = select_shifted_latents(classifier, dictionary, world["pixels"], world["labels"], attack, n_latents=5, seed=1)
    assert len(selection.latents) == 5
    shifts = selection.table.set_index("latent")["mean_abs_shift"]
    assert shifts[selection.latents[0]] == shifts.max()
    assert list(shifts.loc[selection.latents]) == sorted(shifts.loc[selection.latents], reverse=True)
    assert selection.to_source()["kind"] == "shifted"


# --------------------------------------------------------------------------- evaluation


@pytest.fixture(scope="module")
def evaluation(world):
    # The first non-empty group, so that the filter changes the embeddings.
    scores = world["scores"]
    group = next(g for g in ("ImgD", "CrossD", "TextD") if len(scores.latents(g)))
    defense = build_defense(world["classifier"], world["dictionary"], scores, group=group, strength=1.0)
    assert defense.active
    result = run_evaluation(
        world["classifier"], defense, (world["pixels"], world["labels"]), [AttackConfig("pgd", eps=EVAL_EPS, steps=5)],
        batch_size=6, n_boot=200, n_examples=3,
    )
    return defense, result


def test_pgd_lowers_accuracy(evaluation):
    table = evaluation[1].table
    clean = table.query("mode == 'clean' and model == 'undefended'")["accuracy"].item()
    robust = table.query("mode == 'non-adaptive' and model == 'undefended'")["accuracy"].item()
    assert clean >= 0.9
    assert robust < clean


def test_adaptive_runs_through_defense(evaluation):
    table = evaluation[1].table
    adaptive = table.query("mode == 'adaptive'")
    assert list(adaptive["model"]) == ["defended"]
    assert set(table.query("mode == 'non-adaptive'")["model"]) == {"undefended", "defended"}
    assert evaluation[1].adversarial[1].mode == "adaptive"


def test_worst_case_known_answer(evaluation):
    result = evaluation[1]
    labels = result.labels
    transfer = result.adversarial[0].predictions["defended"] == labels
    adaptive = result.adversarial[1].predictions["defended"] == labels
    row = result.table.query("mode == 'worst-case'")
    assert list(row["model"]) == ["defended"]
    assert row["accuracy"].item() == pytest.approx((transfer & adaptive).float().mean().item())


def test_table_intervals_and_rates(evaluation):
    table = evaluation[1].table
    assert (table["ci_low"] <= table["accuracy"] + 1e-12).all()
    assert (table["accuracy"] <= table["ci_high"] + 1e-12).all()
    rates = table["success_rate"].dropna()
    assert ((rates >= 0) & (rates <= 1)).all()
    attacked = table.query("mode != 'clean'")
    assert (attacked["max_linf"] <= EVAL_EPS + 1e-6).all()


def test_success_rate_known_answer(evaluation, world):
    result = evaluation[1]
    labels = result.labels
    clean = result.clean_predictions["undefended"] == labels
    adversarial = result.adversarial[0].predictions["undefended"] == labels
    expected = (clean & ~adversarial).sum().item() / clean.sum().item()
    row = result.table.query("mode == 'non-adaptive' and model == 'undefended'")
    assert row["success_rate"].item() == pytest.approx(expected)


def test_evaluate_accepts_batches(world):
    from apps.adversarial import evaluate

    batches = [(world["pixels"][:6], world["labels"][:6]), (world["pixels"][6:], world["labels"][6:])]
    table = evaluate(world["classifier"], None, batches, [AttackConfig("fgsm", eps=0)], modes=("non-adaptive",), n_boot=20)
    assert table["n_images"].iloc[0] == len(world["labels"])


# --------------------------------------------------------------------------- shift and report


def test_latent_shift_known_answer():
    clean = torch.tensor([[1.0, 0.0, 2.0], [1.0, 1.0, 2.0]])
    adversarial = torch.tensor([[0.0, 0.0, 2.0], [3.0, 1.0, 2.0]])
    table = latent_shift(clean, adversarial)
    assert list(table["latent"]) == [0, 1, 2]
    assert list(table["mean_abs_shift"]) == [1.5, 0.0, 0.0]
    assert table["share"].iloc[0] == 1.0


def test_shift_by_group_known_answer():
    class FakeScores:
        table = pd.DataFrame({"latent": [0, 1, 2, 3], "group": ["ImgD", "TextD", "ImgD", "CrossD"]})

    table = pd.DataFrame({"latent": [0, 1, 2, 3], "mean_abs_shift": [3.0, 1.0, 1.0, 0.0]})
    groups = shift_by_group(table, FakeScores()).set_index("group")
    assert groups.loc["ImgD", "share"] == pytest.approx(0.8)
    assert groups.loc["TextD", "share"] == pytest.approx(0.2)
    assert groups.loc["CrossD", "n_latents"] == 1
    assert math.isclose(groups["share"].sum(), 1.0)


def test_feature_shift_groups_sum_to_one(world, evaluation):
    result = evaluation[1]
    shift = feature_shift(world["dictionary"], result.clean_embeddings, result.adversarial[0].embeddings, world["scores"], "pgd")
    assert shift.groups["share"].sum() == pytest.approx(1.0)
    assert set(shift.groups["group"]) <= {"ImgD", "TextD", "CrossD", "rare"}
    assert shift.latents["mean_abs_shift"].is_monotonic_decreasing


def test_write_results_files(world, evaluation, tmp_path):
    defense, result = evaluation
    shifts = [feature_shift(world["dictionary"], result.clean_embeddings, a.embeddings, world["scores"], a.key) for a in result.adversarial]
    names = ["<b>red</b>", "green", "blue"]
    written = write_results(tmp_path, result, names, {"seed": 0}, defense=defense, shifts=shifts)
    table = pd.read_csv(written["csv"])
    assert len(table) == len(result.table)
    summary = json.loads(written["json"].read_text())
    assert summary["defense"]["latents"] == defense.latents
    assert len(summary["results"]) == len(result.table)
    page = written["html"].read_text()
    assert "&lt;b&gt;red&lt;/b&gt;" in page
    assert "<b>red</b>" not in page
    assert "data:image/png;base64," in page
    assert (tmp_path / "feature_shift_0.png").stat().st_size > 0
    assert load_defense_spec(written["defense"])["strength"] == 1.0
