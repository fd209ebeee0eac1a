"""The ``mmono`` command line: extract, train, score, report, compare and demo.

Applications add their commands through the entry-point group ``mmono.commands``. Each
entry point is a function ``register(app)`` that adds commands to the typer app, so this
module never imports the applications.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.logging import RichHandler

from mmono_features.backbone import DEFAULT_MODEL, DEFAULT_PRETRAINED

app = typer.Typer(
    name="mmono",
    help="Which features of a CLIP model live in images, in text, or in both.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
logger = logging.getLogger("mmono")

ModelOption = typer.Option(DEFAULT_MODEL, "--model", help="open_clip model name, or mmono-tiny / mmono-shapes.")
PretrainedOption = typer.Option(DEFAULT_PRETRAINED, "--pretrained", help="open_clip pretrained tag of --model.")
CheckpointOption = typer.Option(
    None, "--checkpoint", help="Local weights file for --model (safetensors or a torch state dict); overrides --pretrained."
)
DeviceOption = typer.Option("auto", "--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda[:i] or mps.")
PrecisionOption = typer.Option("fp32", "--precision", help="fp32, fp16 or bf16 (half precision only on CUDA/MPS).")


@app.callback()
def _main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Log warnings and errors only, and hide progress bars."),
) -> None:
    from mmono_features.progress import set_progress

    level = logging.INFO
    if verbose:
        level = logging.DEBUG
    elif quiet:
        level = logging.WARNING
    handler = RichHandler(console=console, show_path=False, rich_tracebacks=False)
    if not verbose:
        handler.addFilter(_hide_third_party_info)
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)
    set_progress(not quiet)


def _hide_third_party_info(record: logging.LogRecord) -> bool:
    # open_clip logs its model parsing at INFO on the root logger; those lines bury
    # mmono's own progress unless --verbose is given. huggingface_hub prints its
    # download retries through its own handler already, so they are not repeated here.
    if record.name.startswith("huggingface_hub") and record.levelno <= logging.WARNING:
        return False
    return record.levelno > logging.INFO or record.name.startswith(("mmono", "apps", "evaluation"))


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


@app.command()
def extract(
    manifest: Path = typer.Argument(..., help="CSV, TSV or JSONL manifest with columns image and caption."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder of the feature store to write (or resume)."),
    model: str = ModelOption,
    pretrained: str = PretrainedOption,
    checkpoint: Optional[Path] = CheckpointOption,
    device: str = DeviceOption,
    precision: str = PrecisionOption,
    batch_size: int = typer.Option(64, help="Pairs per forward pass."),
    shard_size: int = typer.Option(4096, help="Manifest rows per shard file; also the unit of resuming."),
    num_workers: int = typer.Option(2, help="DataLoader worker processes that decode images."),
    overwrite: bool = typer.Option(False, help="Recompute every shard instead of resuming."),
    dtype: str = typer.Option("float32", help="Storage dtype of the embeddings: float32 or float16 (half the disk)."),
) -> None:
    """Embed every image-caption pair of MANIFEST into a feature store.

    Re-running the same command resumes after a crash. For several GPUs run it under
    `accelerate launch`.
    """
    from mmono_features.backbone import load_backbone
    from mmono_features.extract import extract as run_extract

    start = time.perf_counter()
    try:
        backbone = load_backbone(model, pretrained, checkpoint, device=device, precision=precision)
        store = run_extract(
            backbone,
            manifest,
            out,
            batch_size=batch_size,
            shard_size=shard_size,
            num_workers=num_workers,
            overwrite=overwrite,
            dtype=dtype,
        )
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        _fail(str(error))
    if os.environ.get("RANK", "0") != "0":
        return
    if backbone.truncated_captions:
        console.print(f"[yellow]{backbone.truncated_captions} captions were truncated to {backbone.context_length} tokens[/]")
    console.print(
        f"[green]extracted[/] {store.n_pairs} pairs (d={store.d}) into {out} "
        f"in {time.perf_counter() - start:.1f} s; skipped {len(store.skipped())} (see {out / 'skipped.jsonl'})"
    )


@app.command()
def train(
    store_path: Path = typer.Argument(..., metavar="STORE", help="Feature store written by `mmono extract`."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder of the dictionary checkpoint to write."),
    kind: str = typer.Option("topk", help="Dictionary kind: topk, relu, batchtopk, matryoshka or ncl."),
    d_sae: int = typer.Option(4096, help="Number of latents."),
    k: int = typer.Option(32, help="Active latents per sample (topk, batchtopk, matryoshka)."),
    l1_coefficient: Optional[float] = typer.Option(None, help="L1 penalty weight (relu); the ReLUConfig default when unset."),
    prefix_sizes: Optional[str] = typer.Option(None, help="Comma-separated nested prefix sizes (matryoshka), last = d_sae."),
    per_modality_heads: bool = typer.Option(False, help="One head per modality instead of a shared one (ncl)."),
    center: bool = typer.Option(False, help="Remove each modality's mean before normalising (erases the modality gap)."),
    steps: int = typer.Option(5000, help="Optimiser steps."),
    batch_size: int = typer.Option(4096, help="Embeddings per step."),
    lr: float = typer.Option(4e-4, help="Peak learning rate of Adam."),
    seed: int = typer.Option(0, help="Seed of initialisation and batch order."),
    overwrite: bool = typer.Option(False, help="Replace a dictionary already in --out (its scores become stale)."),
    device: str = DeviceOption,
) -> None:
    """Train a sparse dictionary on the image and text embeddings of a store.

    The learning rate warms up linearly, stays at --lr and decays over the last steps.
    """
    from mmono_features.dictionary import TrainConfig, make_config, train_dictionary
    from mmono_features.store import FeatureStore

    if (out / "model.safetensors").exists() and not overwrite:
        _fail(f"{out} already contains a dictionary; pass --overwrite to replace it, or choose another --out.")
    start = time.perf_counter()
    try:
        store = FeatureStore.open(store_path)
        options = _kind_options(kind, k, l1_coefficient, prefix_sizes, per_modality_heads)
        config = make_config(kind, d_in=store.d, d_sae=d_sae, center=center, backbone=store.backbone_identity, seed=seed, **options)
        train_config = TrainConfig(n_steps=steps, batch_size=batch_size, lr=lr, seed=seed, device=device)
        result = train_dictionary(store, config, train_config)
    except (ValueError, FileNotFoundError) as error:
        _fail(str(error))
    result.dictionary.save_pretrained(out)
    (out / "history.json").write_text(json.dumps(result.history, indent=1) + "\n", encoding="utf-8")
    final = result.history[-1] if result.history else {}
    console.print(f"[green]trained[/] {kind} dictionary (d_sae={d_sae}) in {time.perf_counter() - start:.1f} s -> {out}")
    if final:
        console.print(_format_metrics(final))


def _kind_options(kind: str, k: int, l1_coefficient: float | None, prefix_sizes: str | None, per_modality_heads: bool) -> dict:
    if kind in ("topk", "batchtopk"):
        return {"k": k}
    if kind == "matryoshka":
        options: dict = {"k": k}
        if prefix_sizes:
            try:
                options["prefix_sizes"] = tuple(int(size) for size in prefix_sizes.split(","))
            except ValueError:
                raise ValueError(f"--prefix-sizes must be comma-separated integers; got {prefix_sizes!r}.") from None
        return options
    if kind == "relu":
        return {} if l1_coefficient is None else {"l1_coefficient": l1_coefficient}
    if kind == "ncl":
        return {"shared_head": not per_modality_heads}
    return {}


def _format_metrics(metrics: dict) -> str:
    parts = []
    for key, value in metrics.items():
        if isinstance(value, float):
            parts.append(f"{key}={value:.4g}")
        elif isinstance(value, dict):
            inner = ", ".join(f"{k}={v:.4g}" for k, v in value.items() if isinstance(v, float))
            parts.append(f"{key}: {inner}")
    return "; ".join(parts)


@app.command()
def score(
    store_path: Path = typer.Argument(..., metavar="STORE", help="Feature store written by `mmono extract`."),
    dictionary_path: Path = typer.Argument(..., metavar="DICTIONARY", help="Dictionary folder written by `mmono train`."),
    out: Path = typer.Option(..., "--out", "-o", help="Scores table to write: .csv or .parquet (rule in a sidecar .json)."),
    rule: str = typer.Option("std", help="Grouping rule: std (mean ± k·sd), quantile or fixed."),
    k_sigma: float = typer.Option(1.0, help="k of the std rule: ImgD above mean + k·sd, TextD below mean - k·sd."),
    quantiles: str = typer.Option("0.1,0.9", help="Low and high quantiles of the quantile rule."),
    thresholds: Optional[str] = typer.Option(None, help="Low and high MDS thresholds of the fixed rule, e.g. -0.5,0.5."),
    min_active: int = typer.Option(20, help="Latents active on fewer pairs get no group ('rare')."),
    n_boot: int = typer.Option(1000, help="Bootstrap resamples of the 95% interval of each MDS."),
    seed: int = typer.Option(0, help="Seed of the bootstrap."),
    name_features: bool = typer.Option(True, help="Fill the name column from the nearest vocabulary entries (reloads the store's backbone)."),
    vocabulary: Optional[Path] = typer.Option(None, help="Word list for naming, one entry per line (default: the bundled one)."),
    checkpoint: Optional[Path] = typer.Option(None, help="The store's local backbone checkpoint, when it was extracted from one."),
    device: str = DeviceOption,
) -> None:
    """Score each latent's Modality Dominance Score and sort latents into groups."""
    from mmono_features.dictionary import load_dictionary
    from mmono_features.modality import score_dictionary
    from mmono_features.store import FeatureStore

    if out.suffix not in (".csv", ".parquet"):
        _fail(f"--out must end in .csv or .parquet; got {out}.")
    if rule == "fixed" and not thresholds:
        _fail("--rule fixed needs --thresholds LOW,HIGH, e.g. --thresholds -0.5,0.5.")
    try:
        store = FeatureStore.open(store_path)
        dictionary = load_dictionary(dictionary_path, device=_device(device))
        scores = score_dictionary(
            dictionary,
            store.embeddings("image", normalize=False),
            store.embeddings("text", normalize=False),
            rule=rule,
            k=k_sigma,
            quantiles=_pair(quantiles, "--quantiles"),
            thresholds=_pair(thresholds, "--thresholds") if thresholds else None,
            min_active=min_active,
            n_boot=n_boot,
            seed=seed,
        )
        if name_features:
            from mmono_features.report import fill_names

            fill_names(scores, dictionary, store.backbone_identity, None, vocabulary, checkpoint, device)
    except (ValueError, FileNotFoundError) as error:
        _fail(str(error))
    scores.save(out)
    sizes = scores.table["group"].value_counts().to_dict()
    console.print(f"[green]scored[/] {len(scores.table)} latents -> {out}; groups: {sizes}")


def _pair(text: str, option: str) -> tuple[float, float]:
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"{option} must be two comma-separated numbers like 0.1,0.9; got {text!r}.") from None
    return low, high


def _device(device: str):
    from mmono_features.backbone import resolve_device

    return resolve_device(device)


@app.command()
def report(
    store_path: Path = typer.Argument(..., metavar="STORE", help="Feature store written by `mmono extract`."),
    dictionary_path: Path = typer.Argument(..., metavar="DICTIONARY", help="Dictionary folder written by `mmono train`."),
    scores_path: Optional[Path] = typer.Option(None, "--scores", help="Scores table; computed with the defaults when absent."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for report.html, summary.json and their images."),
    top_m: int = typer.Option(8, help="Top-activating samples shown per latent."),
    n_cards: int = typer.Option(6, help="Feature cards shown per group."),
    name_features: bool = typer.Option(True, help="Name latents by the nearest vocabulary entries (reloads the store's backbone)."),
    vocabulary: Optional[Path] = typer.Option(None, help="Word list for naming, one entry per line (default: the bundled one)."),
    checkpoint: Optional[Path] = typer.Option(None, help="The store's local backbone checkpoint, when it was extracted from one."),
    device: str = DeviceOption,
) -> None:
    """Write an HTML report of feature cards, MDS histograms and dictionary metrics."""
    from mmono_features.report import write_report

    try:
        path = write_report(
            store_path,
            dictionary_path,
            out,
            scores_path=scores_path,
            top_m=top_m,
            n_cards=n_cards,
            device=device,
            name_features=name_features,
            vocabulary=vocabulary,
            checkpoint=checkpoint,
        )
    except (ValueError, FileNotFoundError) as error:
        _fail(str(error))
    console.print(f"[green]report[/] -> {path}")


@app.command()
def compare(
    store_path: Path = typer.Argument(..., metavar="STORE", help="Feature store the dictionaries were trained on."),
    dictionaries: list[Path] = typer.Argument(..., metavar="DICTIONARY...", help="Dictionary folders to compare."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the CSV tables, comparison.json and comparison.html."),
    m: str = typer.Option("10,20,50", help="Comma-separated top-m sizes of the EmbSim sweep."),
    min_active: int = typer.Option(20, help="min_active of the grouping (latents active on fewer pairs are 'rare')."),
    n_boot: int = typer.Option(1000, help="Bootstrap resamples of every interval."),
    seed: int = typer.Option(0, help="Seed of the bootstrap and random baselines."),
) -> None:
    """Tabulate metrics, EmbSim, WinRate and group sizes of several dictionaries on one store."""
    from mmono_features.compare import compare_dictionaries, write_comparison
    from mmono_features.store import FeatureStore

    try:
        ms = tuple(int(value) for value in m.split(","))
    except ValueError:
        _fail(f"--m must be comma-separated integers like 10,20,50; got {m!r}.")
    try:
        store = FeatureStore.open(store_path)
        tables = compare_dictionaries(store, dictionaries, ms=ms, min_active=min_active, n_boot=n_boot, seed=seed)
    except (ValueError, FileNotFoundError) as error:
        _fail(str(error))
    settings = {"store": str(store_path), "dictionaries": [str(d) for d in dictionaries], "m": ms, "min_active": min_active, "n_boot": n_boot, "seed": seed}
    path = write_comparison(tables, out, settings)
    console.print(tables["interpretability"].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    console.print(f"[green]comparison[/] of {len(dictionaries)} dictionaries -> {path}")


@app.command()
def demo(
    out: Path = typer.Option(Path("mmono-demo"), "--out", "-o", help="Folder for the store, dictionary, scores and report."),
    model: str = ModelOption,
    pretrained: str = PretrainedOption,
    checkpoint: Optional[Path] = CheckpointOption,
    data: str = typer.Option(
        "auto",
        help="demo (the bundled photographs), shapes (generated shapes-world pairs) or auto: "
        "the photographs, or shapes when the offline model mmono-shapes is used.",
    ),
    device: str = DeviceOption,
    steps: int = typer.Option(1000, help="Training steps of the dictionary."),
    seed: int = typer.Option(0, help="Seed of everything random."),
) -> None:
    """Run extract, train, score and report on bundled data: the main job, end to end.

    When the weights of --model cannot be had (no internet, no cache), the demo prints a notice
    and continues with mmono-shapes, the project's tiny CLIP trained offline on a
    synthetic shapes world.
    """
    from mmono_features.demo import DemoConfig, run_demo

    start = time.perf_counter()
    try:
        result = run_demo(
            DemoConfig(
                out=out, model=model, pretrained=pretrained, checkpoint=checkpoint, data=data, device=device, steps=steps, seed=seed
            ),
            console=console,
        )
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        _fail(str(error))
    console.print(
        f"[green]demo finished[/] in {time.perf_counter() - start:.1f} s with {result['backbone']['name']} "
        f"({result['weights_label']}): {result['groups']} -> {result['report']}"
    )


def _register_plugins() -> None:
    for entry_point in entry_points(group="mmono.commands"):
        try:
            register = entry_point.load()
        except ImportError as error:  # an app whose optional dependency is missing
            logger.warning("command %r is unavailable: %s", entry_point.name, error)
            continue
        register(app)


_register_plugins()


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    sys.exit(main())
