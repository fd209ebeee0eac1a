"""The ``mmono bias-audit`` command, added to the mmono app through ``register``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional

import typer

logger = logging.getLogger(__name__)

__all__ = ["register"]


def bias_audit(
    data: Path = typer.Argument(..., help="Audit table: CSV/TSV/JSONL with image paths and the sensitive column."),
    model: str = typer.Option(..., "--model", help="open_clip model name, or mmono-tiny / mmono-shapes."),
    dictionary: Path = typer.Option(..., "--dictionary", help="Dictionary folder written by `mmono train`."),
    scores: Path = typer.Option(..., "--scores", help="Scores table of the dictionary (`mmono score`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for audit.json, metrics.csv and audit.html."),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help="open_clip pretrained tag of --model."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Local weights file for --model."),
    sensitive: str = typer.Option("gender", "--sensitive", help="Sensitive column: gender, race, age, ..."),
    task: str = typer.Option("gender", "--task", help="Zero-shot task: gender or attribute."),
    positive_label: Optional[List[str]] = typer.Option(
        None, "--positive-label", help="Label audited one-vs-rest (repeatable); 'all' audits every label."
    ),
    label_column: Optional[str] = typer.Option(None, "--label-column", help="Column of true labels (default: the prompt set's)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Prompt set (JSON or text) replacing the shipped one."),
    caption_pairs: Optional[Path] = typer.Option(None, "--caption-pairs", help="Caption pairs JSON for the latent association."),
    layout: str = typer.Option("plain", "--layout", help="Table layout: plain, celeba or fairface."),
    unknown: str = typer.Option("keep", "--unknown", help="Missing sensitive values: keep (group 'unknown') or reject."),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="Folder image paths are relative to (default: the table's)."),
    ablate_from: str = typer.Option("both", "--ablate-from", help="Remove latents from image, prompt or both embeddings."),
    n_random: int = typer.Option(5, "--n-random", help="Random latent sets per modality group (baseline)."),
    n_boot: int = typer.Option(1000, "--n-boot", help="Bootstrap replicates of every interval."),
    top: int = typer.Option(20, "--top", help="Associated latents listed."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda[:i] or mps."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, fp16 or bf16."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per forward pass."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap, the random draws and tiny models."),
) -> None:
    """Audit zero-shot predictions for bias per sensitive group, and per modality group of latents."""
    from rich.console import Console

    from apps.bias_audit.audit import AuditConfig, run_audit

    console = Console(stderr=True)
    try:
        config = AuditConfig(
            data=str(data),
            dictionary=str(dictionary),
            scores=str(scores),
            out=str(out),
            model=model,
            pretrained=_pretrained_tag(pretrained, checkpoint),
            checkpoint=None if checkpoint is None else str(checkpoint),
            sensitive=sensitive,
            task=task,
            positive_labels=tuple(positive_label or ()),
            label_column=label_column,
            prompts=None if prompts is None else str(prompts),
            caption_pairs=None if caption_pairs is None else str(caption_pairs),
            layout=layout,
            unknown=unknown,
            image_root=None if image_root is None else str(image_root),
            ablate_from=ablate_from,
            n_random=n_random,
            n_boot=n_boot,
            top=top,
            device=device,
            precision=precision,
            batch_size=batch_size,
            seed=seed,
        )
        result = run_audit(config)
    except (ValueError, FileNotFoundError) as error:
        console.print(f"[bold red]error:[/] {error}")
        raise typer.Exit(code=2) from None
    base = result.metrics["none"]
    for label, gm in base.items():
        dpd = gm.disparities["demographic_parity_difference"]
        console.print(f"[green]{label}[/]: demographic parity difference {dpd:.3f} (no ablation)")
    console.print(
        f"[green]bias audit[/] of {len(result.predictions)} images ({len(result.skipped)} skipped) -> "
        f"{result.outputs['html']}"
    )


def _pretrained_tag(pretrained: str | None, checkpoint: Path | None) -> str | None:
    from mmono_features.backbone import DEFAULT_PRETRAINED

    if pretrained is not None:
        return pretrained
    if checkpoint is not None:  # a local checkpoint replaces the tag
        return None
    return DEFAULT_PRETRAINED


def register(app: typer.Typer) -> None:
    """Add the ``bias-audit`` command to ``app``."""
    app.command(name="bias-audit")(bias_audit)
