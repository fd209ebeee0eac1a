"""``mmono defend``: attack a zero-shot classifier, filter feature groups, report robustness."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

import typer

from mmono_features.backbone import DEFAULT_MODEL, DEFAULT_PRETRAINED

logger = logging.getLogger(__name__)

__all__ = ["defend", "register"]

MODE_CHOICES = {"both": ("non-adaptive", "adaptive"), "non-adaptive": ("non-adaptive",), "adaptive": ("adaptive",)}
DEFAULT_LINF_EPS = ("1/255", "4/255")
DEFAULT_L2_EPS = ("0.5",)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def _attack_configs(attacks: list[str], eps: list[str], eps_l2: list[str], steps: int, alpha: Optional[str]) -> list:
    """Step helper: one AttackConfig per attack and budget."""
    from apps.adversarial.attacks import ATTACKS, AttackConfig, parse_eps

    configs = []
    for name in attacks:
        key = name.lower()
        if key not in ATTACKS:
            raise ValueError(f"unknown attack {name!r} (--attack); valid attacks are {sorted(ATTACKS)}.")
        if key == "cw":
            configs.append(AttackConfig("cw", steps=steps))
            continue
        budgets = eps if ATTACKS[key] == "Linf" else eps_l2
        for budget in budgets:
            configs.append(
                AttackConfig(key, eps=parse_eps(budget), alpha=None if alpha is None else parse_eps(alpha), steps=steps)
            )
    return configs


def _check_dictionary(dictionary: Any, backbone: Any) -> None:
    """Step helper: refuse a dictionary trained on another backbone."""
    if dictionary.d_in != backbone.embed_dim:
        raise ValueError(
            f"the dictionary has d_in={dictionary.d_in} but {backbone.name} has embed_dim={backbone.embed_dim}; "
            "pass a dictionary trained on this backbone (--dictionary)."
        )
    recorded = dict(getattr(dictionary.config, "backbone", {}) or {})
    current = backbone.identity()
    for key in ("name", "checkpoint_sha256"):
        if recorded.get(key) and current.get(key) and recorded[key] != current[key]:
            raise ValueError(
                f"the dictionary was trained on a backbone with {key}={recorded[key]!r}, but this run loads "
                f"{key}={current[key]!r}; pass the matching --model/--pretrained/--checkpoint or another --dictionary."
            )


def _parse_latents(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise ValueError(f"--latents must be comma-separated integers such as '3,17,42'; got {text!r}.") from None


def _choose_defense(options: dict[str, Any], classifier, dictionary, scores, data, attacks) -> tuple[Any, Any]:
    """Step helper: build the defense; with --shifted, select latents on a calibration split first."""
    from apps.adversarial.defense import build_defense, select_shifted_latents

    if options["shifted"]:
        calibration, evaluation = data.split(options["calibration_fraction"], seed=options["seed"])
        linf = [a for a in attacks if a.norm == "Linf" and a.name != "autoattack"] or list(attacks)
        # The strongest L-inf budget among the requested attacks calibrates the selection.
        attack = max(linf, key=lambda a: a.eps or 0.0)
        shifted = select_shifted_latents(
            classifier,
            dictionary,
            calibration.images,
            calibration.labels,
            attack,
            n_latents=options["shifted"],
            batch_size=options["batch_size"],
            seed=options["seed"],
        )
        defense = build_defense(classifier, dictionary, strength=options["strength"], shifted=shifted)
        defense.source["calibration_images"] = len(calibration.labels)
        return defense, evaluation
    latents = _parse_latents(options["latents"]) if options["latents"] else None
    defense = build_defense(
        classifier, dictionary, scores=scores, group=options["group"], latents=latents, strength=options["strength"]
    )
    return defense, data


def _load_dictionary_and_scores(options: dict[str, Any], backbone: Any) -> tuple[Any, Any]:
    """Step helper: the dictionary (checked against the backbone) and its scores, each optional."""
    dictionary = scores = None
    if options["dictionary"] is not None:
        from mmono_features.dictionary import load_dictionary

        dictionary = load_dictionary(options["dictionary"], device=backbone.device)
        _check_dictionary(dictionary, backbone)
    if options["scores"] is not None:
        from mmono_features.modality import Scores

        scores = Scores.load(options["scores"])
        if dictionary is not None:
            scores.check_dictionary(dictionary)
    return dictionary, scores


def _shift_analysis(dictionary: Any, scores: Any, result: Any) -> list:
    """Step helper: the feature shift of every attack and mode (empty without a dictionary)."""
    from apps.adversarial.shift import feature_shift

    if dictionary is None:
        return []
    return [
        feature_shift(dictionary, result.clean_embeddings, adversarial.embeddings, scores, adversarial.key)
        for adversarial in result.adversarial
    ]


def run_defend(options: dict[str, Any]) -> dict[str, Path]:
    """Run ``mmono defend`` with the options of the command; returns the written files."""
    import torch

    from apps.adversarial.classifier import build_classifier
    from apps.adversarial.evaluate import load_labelled_images, run_evaluation
    from apps.adversarial.report import write_results
    from mmono_features.backbone import load_backbone

    torch.manual_seed(options["seed"])
    attacks = _attack_configs(options["attack"], options["eps"], options["eps_l2"], options["steps"], options["alpha"])
    modes = MODE_CHOICES[options["mode"]]

    # Step 1: backbone and data.
    backbone = load_backbone(
        options["model"], pretrained=options["pretrained"], checkpoint=options["checkpoint"],
        device=options["device"], seed=options["seed"],
    )
    data = load_labelled_images(options["data"], backbone, max_images=options["max_images"], seed=options["seed"])
    logger.info("%d images of %d classes from %s", len(data.labels), len(data.class_names), options["data"])

    # Step 2: the classifier, the dictionary and the scores.
    classifier = build_classifier(backbone, data.class_names, templates=list(options["template"]) or None)
    dictionary, scores = _load_dictionary_and_scores(options, backbone)

    # Step 3: the defense (and the calibration split when latents are selected by shift).
    defense, evaluation = None, data
    if dictionary is not None:
        defense, evaluation = _choose_defense(options, classifier, dictionary, scores, data, attacks)
    elif "adaptive" in modes:
        logger.warning("no --dictionary: only the undefended classifier is evaluated, non-adaptively.")
        modes = ("non-adaptive",)

    # Step 4: attacks and accuracies.
    started = time.perf_counter()
    result = run_evaluation(
        classifier, defense, (evaluation.images, evaluation.labels), attacks, modes=modes,
        batch_size=options["batch_size"], seed=options["seed"], n_boot=options["n_boot"],
    )

    # Step 5: which latents and groups the attacks moved.
    shifts = _shift_analysis(dictionary, scores, result)

    # Step 6: files.
    settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in options.items()} | {
        "backbone": backbone.identity(),
        "attacks": [a.to_dict() for a in attacks],
        "modes": list(modes),
        "n_images": int(len(evaluation.labels)),
        "n_skipped": int(data.n_skipped),
        "seconds": round(time.perf_counter() - started, 2),
    }
    return write_results(options["out"], result, data.class_names, settings, defense=defense, shifts=shifts)


def defend(
    data: Path = typer.Argument(..., help="Image folder with one subfolder per class, or a CSV/JSONL with columns image,label."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", help="open_clip model name, or mmono-tiny / mmono-shapes."),
    pretrained: str = typer.Option(DEFAULT_PRETRAINED, "--pretrained", help="open_clip pretrained tag of --model."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Local weights file for --model."),
    dictionary: Optional[Path] = typer.Option(None, "--dictionary", help="Dictionary folder (config.json + model.safetensors)."),
    scores: Optional[Path] = typer.Option(None, "--scores", help="Scores file of the dictionary (mmono score); gives --group."),
    attack: list[str] = typer.Option(["pgd"], "--attack", help="fgsm, pgd, pgdl2, cw or autoattack; repeat for several."),
    eps: list[str] = typer.Option(list(DEFAULT_LINF_EPS), "--eps", help="L-inf budget(s), e.g. 4/255; repeat for several."),
    eps_l2: list[str] = typer.Option(list(DEFAULT_L2_EPS), "--eps-l2", help="L2 budget(s) of pgdl2."),
    steps: int = typer.Option(10, "--steps", help="Iterations of PGD, PGDL2 and CW."),
    alpha: Optional[str] = typer.Option(None, "--alpha", help="PGD step size (default eps/4)."),
    template: list[str] = typer.Option(
        [], "--template", help="Prompt template with {} for the class name; repeat for several (default: open_clip's ImageNet set)."
    ),
    group: str = typer.Option("ImgD", "--group", help="Modality group to suppress: ImgD, TextD, CrossD or rare."),
    latents: Optional[str] = typer.Option(None, "--latents", help="Comma-separated latents to suppress instead of --group."),
    shifted: int = typer.Option(0, "--shifted", help="Suppress the N latents most shifted by the attack on a calibration split."),
    calibration_fraction: float = typer.Option(0.25, "--calibration-fraction", help="Share of the images held out for --shifted."),
    strength: float = typer.Option(1.0, "--strength", help="0 = no filter, 1 = suppressed latents zeroed."),
    mode: str = typer.Option("both", "--mode", help="non-adaptive, adaptive or both."),
    out: Path = typer.Option(Path("defend-out"), "--out", "-o", help="Output folder."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda[:i] or mps."),
    seed: int = typer.Option(0, "--seed", help="Seed of the subset, the attacks and the bootstrap."),
    max_images: Optional[int] = typer.Option(None, "--max-images", help="Evaluate a random subset of N images."),
    batch_size: int = typer.Option(16, "--batch-size", help="Images per attack batch."),
    n_boot: int = typer.Option(1000, "--n-boot", help="Bootstrap resamples of the accuracy intervals."),
) -> None:
    """Attack a zero-shot classifier and measure a feature-filter defense, non-adaptively and adaptively."""
    if mode not in MODE_CHOICES:
        _fail(f"--mode must be one of {sorted(MODE_CHOICES)}; got {mode!r}.")
    options = dict(locals())
    try:
        written = run_defend(options)
    except (ValueError, FileNotFoundError) as error:
        _fail(str(error))
    typer.echo(f"wrote {len(written)} files to {out}: " + ", ".join(sorted(p.name for p in written.values())))


def register(app: typer.Typer) -> None:
    """Add the ``defend`` command to the ``mmono`` app."""
    app.command("defend")(defend)
