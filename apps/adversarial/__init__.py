"""Adversarial robustness of a CLIP zero-shot classifier with a feature-filter defense.

Build a differentiable classifier over pixels in [0, 1], filter chosen dictionary latents
of its image embedding, attack both with torchattacks (non-adaptively and adaptively),
and measure accuracy, attack success and which modality groups the attacks move.

Example
-------
>>> from apps.adversarial import AttackConfig, build_classifier, build_defense, evaluate
>>> classifier = build_classifier(backbone, class_names)               # doctest: +SKIP
>>> defense = build_defense(classifier, dictionary, scores, group="ImgD")  # doctest: +SKIP
>>> table = evaluate(classifier, defense, (images, labels), [AttackConfig("pgd", eps="4/255")])  # doctest: +SKIP
"""

from apps.adversarial.attacks import ATTACKS, AttackConfig, ModelStateChanged, format_eps, parse_eps, run_attack
from apps.adversarial.classifier import ZeroShotClassifier, build_classifier, default_templates, pixel_transform
from apps.adversarial.defense import (
    FeatureFilterDefense,
    ShiftedLatents,
    build_defense,
    load_defense_spec,
    select_shifted_latents,
)
from apps.adversarial.evaluate import (
    MODES,
    EvaluationResult,
    LabelledImages,
    evaluate,
    load_labelled_images,
    run_evaluation,
)
from apps.adversarial.report import write_results
from apps.adversarial.shift import ShiftResult, feature_shift, plot_shift

__all__ = [
    "ATTACKS",
    "MODES",
    "AttackConfig",
    "EvaluationResult",
    "FeatureFilterDefense",
    "LabelledImages",
    "ModelStateChanged",
    "ShiftResult",
    "ShiftedLatents",
    "ZeroShotClassifier",
    "build_classifier",
    "build_defense",
    "default_templates",
    "evaluate",
    "feature_shift",
    "format_eps",
    "load_defense_spec",
    "load_labelled_images",
    "parse_eps",
    "pixel_transform",
    "plot_shift",
    "run_attack",
    "run_evaluation",
    "select_shifted_latents",
    "write_results",
]
