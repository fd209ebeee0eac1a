"""Train ``mmono-shapes``: a tiny open_clip CLIP on the synthetic shapes world.

The model has the tiny architecture of ``mmono-tiny`` (image 32 px, width 64, 2 layers,
embed_dim 64) with a text context of 32 tokens. It is trained from scratch with the
symmetric CLIP contrastive loss on generated pairs, on CPU, and written to
``assets/shapes_world/``:

- ``model.safetensors``: fp16 weights, keys of the open_clip model's ``state_dict``;
- ``config.json``: the open_clip model config (same as
  ``mmono_features/model_configs/mmono-shapes.json``);
- ``generator_settings.json``: world settings and the seeds of training and held-out data;
- ``train_log.jsonl``: loss, temperature and held-out zero-shot accuracy during training;
- ``metrics.json`` and ``README.md``: held-out zero-shot accuracy of the saved weights.

Run from the repository root::

    python -m evaluation.train_shapes_clip --steps 1000 --out assets/shapes_world
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import open_clip
import torch
from safetensors.torch import load_file, save_file

from mmono_features.shapes_world import (
    FACTOR_TYPES,
    ZERO_SHOT_TEMPLATES,
    ShapesWorldConfig,
    factor_values,
    generate_pairs,
    zero_shot_accuracies,
)

logger = logging.getLogger(__name__)

MODEL_NAME = "mmono-shapes"
REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "mmono_features" / "model_configs"
SHARED_FACTORS = tuple(f for f, kind in FACTOR_TYPES.items() if kind == "shared")


def build_model(seed: int) -> tuple[torch.nn.Module, object, object]:
    """Build a randomly initialised ``mmono-shapes`` model, its eval transform and tokenizer."""
    open_clip.add_model_config(CONFIG_DIR)
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL_NAME, pretrained=None)
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    return model, preprocess, tokenizer


def load_weights(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    """Load a safetensors state dict of any float dtype into ``model`` (cast to its dtype)."""
    state = load_file(str(path))
    reference = model.state_dict()
    state = {k: v.to(reference[k].dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    return model


def make_tensors(pairs, preprocess, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Preprocessed images (n, 3, H, W) float32 and tokens (n, context_length) of ``pairs``."""
    images = torch.stack([preprocess(p.image) for p in pairs])
    tokens = tokenizer([p.caption for p in pairs])
    return images, tokens


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # Decay only the weight matrices of linear, attention and patch layers; gains,
    # biases, embeddings and the temperature are left undecayed, as usual for CLIP.
    decay, rest = [], []
    for name, param in model.named_parameters():
        no_decay = param.ndim < 2 or "embedding" in name or "logit_scale" in name
        (rest if no_decay else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * lr * (1.0 + math.cos(math.pi * progress))


def evaluate(model, tokenizer, preprocess, pairs, config: ShapesWorldConfig) -> dict[str, float]:
    """Held-out zero-shot accuracy of every shared factor, averaged over ZERO_SHOT_TEMPLATES."""
    return zero_shot_accuracies(model, tokenizer, preprocess, pairs, SHARED_FACTORS, ZERO_SHOT_TEMPLATES, config)


@contextlib.contextmanager
def _torch_settings(threads: int):
    # Thread count and deterministic kernels are process-wide; restore them so that a
    # caller (a test, a notebook) keeps its own.
    previous = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(previous[0])
        torch.use_deterministic_algorithms(previous[1])


def train(args: argparse.Namespace) -> dict:
    """Generate data, train, save the weights, then evaluate them (see :func:`finish`)."""
    with _torch_settings(args.threads):
        _train(args)
    return finish(args)


def _train(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    world = ShapesWorldConfig()
    model, preprocess, tokenizer = build_model(args.seed)

    start = time.perf_counter()
    train_pairs = generate_pairs(args.n_pairs, args.data_seed, world)
    images, tokens = make_tensors(train_pairs, preprocess, tokenizer)
    monitor_pairs = generate_pairs(args.n_monitor, args.eval_seed, world)
    del train_pairs
    data_s = time.perf_counter() - start
    logger.info("generated %d training pairs in %.1f s", len(images), data_s)

    loss_fn = open_clip.loss.ClipLoss()
    optimizer = torch.optim.AdamW(_param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-6, fused=True)
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(images), generator=generator)
    cursor = 0
    log = (out / "train_log.jsonl").open("w", encoding="utf-8")
    # Step 0 records the data generation time, which finish() reports.
    log.write(json.dumps({"step": 0, "data_seconds": round(data_s, 1)}) + "\n")
    model.train()
    train_start = time.perf_counter()
    running = 0.0
    for step in range(args.steps):
        if cursor + args.batch_size > len(order):
            order = torch.randperm(len(images), generator=generator)
            cursor = 0
        idx = order[cursor : cursor + args.batch_size]
        cursor += args.batch_size
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, args.steps, args.lr, args.warmup)

        image_features, text_features, logit_scale = model(images[idx], tokens[idx])
        loss = loss_fn(image_features, text_features, logit_scale)

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # temperature at most 100, as in CLIP
        running += loss.item()

        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            record = {
                "step": step + 1,
                "loss": running / ((step % args.log_every) + 1),
                "lr": optimizer.param_groups[0]["lr"],
                "logit_scale": model.logit_scale.detach().exp().item(),
                "elapsed_s": round(time.perf_counter() - train_start, 1),
            }
            running = 0.0
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                record["monitor_accuracy"] = evaluate(model, tokenizer, preprocess, monitor_pairs, world)
                model.train()
            log.write(json.dumps(record) + "\n")
            log.flush()
            logger.info("%s", record)
    log.close()

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"name": MODEL_NAME, "format": "pt"})
    shutil.copyfile(CONFIG_DIR / f"{MODEL_NAME}.json", out / "config.json")


def finish(args: argparse.Namespace) -> dict:
    """Evaluate the saved weights and write the settings, metrics and README.

    The weights in ``args.out`` are reloaded in fp32 into a fresh model, so the figures
    are those of the shipped fp16 file. Training time and loss come from
    ``train_log.jsonl``.
    """
    with _torch_settings(args.threads):
        return _finish(args)


def _finish(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    weights = out / "model.safetensors"
    log_path = out / "train_log.jsonl"
    for path in (weights, log_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; train first (run without --evaluate-only).")
    log = [json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    world = ShapesWorldConfig()

    model, preprocess, tokenizer = build_model(args.seed + 1)
    load_weights(model, weights).eval()
    heldout = generate_pairs(args.n_eval, args.eval_seed, world)
    accuracy = evaluate(model, tokenizer, preprocess, heldout, world)
    subset = evaluate(model, tokenizer, preprocess, heldout[: args.n_test], world)

    settings = {
        "world": world.to_dict(),
        "factor_types": FACTOR_TYPES,
        "train": {"n_pairs": args.n_pairs, "seed": args.data_seed},
        "heldout": {"n_pairs": args.n_eval, "seed": args.eval_seed},
        "zero_shot_templates": list(ZERO_SHOT_TEMPLATES),
    }
    (out / "generator_settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    metrics = {
        "model": MODEL_NAME,
        "heldout_seed": args.eval_seed,
        "heldout": {"n_pairs": args.n_eval, "accuracy": accuracy},
        "test_subset": {"n_pairs": args.n_test, "accuracy": subset},
        "chance": {f: 1.0 / len(factor_values(f, world)) for f in SHARED_FACTORS},
        "final_loss": log[-1]["loss"],
        "train_seconds": log[-1]["elapsed_s"],
        "data_seconds": log[0].get("data_seconds"),
        "hardware": _hardware(args.threads),
        "command": " ".join(["python -m evaluation.train_shapes_clip", *_training_flags(sys.argv[1:])]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "evaluate_only"},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "README.md").write_text(_readme(metrics))
    return metrics


def _training_flags(argv: list[str]) -> list[str]:
    # The recorded command reproduces the training, so flags that only shape the
    # report (--note, --evaluate-only) are left out.
    flags, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--note":
            skip = True
        elif arg != "--evaluate-only" and not arg.startswith("--note="):
            flags.append(arg)
    return flags


def _hardware(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {threads} CPU thread(s), no GPU"


def _readme(metrics: dict) -> str:
    rows = "\n".join(
        f"| {f} | {len(factor_values(f))} | {metrics['chance'][f]:.3f} | "
        f"{metrics['heldout']['accuracy'][f]:.3f} | {metrics['test_subset']['accuracy'][f]:.3f} |"
        for f in SHARED_FACTORS
    )
    args = metrics["args"]
    return f"""# mmono-shapes

A tiny CLIP (open_clip, image 32 px, patch 8, width 64, 2 layers per tower, embed_dim 64,
text context 32 tokens, the real CLIP BPE tokenizer) trained from scratch on the shapes
world of `mmono_features.shapes_world`. It is mmono's offline default model: its inputs have
known shared, image-only and text-only factors, so offline results can be checked against
the truth.

## Files
- `model.safetensors`: fp16 weights; keys are those of the open_clip model's `state_dict`.
- `config.json`: open_clip model config (copy of `mmono_features/model_configs/mmono-shapes.json`).
- `generator_settings.json`: world settings, factor types, seeds of training and held-out data.
- `train_log.jsonl`: training loss, learning rate, temperature and zero-shot accuracy on
  {args['n_monitor']} monitor pairs during training (the first pairs of the held-out seed, used
  only to log progress: no checkpoint or setting was picked on them).
- `metrics.json`: the figures below, machine-readable (the tests read it).

## Training
- Command: `{metrics['command']}`
- Data: {args['n_pairs']} generated pairs (seed {args['data_seed']}), held in memory; each
  image preprocessed with the model's eval transform.
- Objective: symmetric CLIP contrastive loss with a learnable temperature (clamped at 100).
- Optimiser: AdamW, lr {args['lr']}, betas (0.9, 0.98), weight decay {args['weight_decay']} on
  weight matrices only, {args['warmup']} warm-up steps then cosine decay to 0;
  {args['steps']} steps of batch {args['batch_size']}; model init seed {args['seed']}.
- Time (wall clock): {metrics['train_seconds']:.0f} s of training plus {metrics['data_seconds']:.0f} s of data generation.{(' ' + args['note']) if args.get('note') else ''}
- Hardware: {metrics['hardware']}.
- Final training loss (mean of the last {args['log_every']} steps): {metrics['final_loss']:.3f}.

## Held-out zero-shot accuracy
Fresh pairs of seed {metrics['heldout_seed']} (training used seed {args['data_seed']}), scored
with the saved fp16 weights loaded in fp32. For each shared factor, the class embedding of
a value is the mean normalised text embedding of the prompts
{', '.join(f'`{t}`' for t in ZERO_SHOT_TEMPLATES)}, over the templates and over every value
of the other shared factors; an image gets the value with the most similar class embedding.

| factor | classes | chance | accuracy ({metrics['heldout']['n_pairs']} pairs) | accuracy (first {metrics['test_subset']['n_pairs']} pairs, used by the tests) |
|---|---|---|---|---|
{rows}

Image-only factors (background, style) and text-only factors (framing, adjective) have no
zero-shot counterpart by construction, because the other modality never contains them.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-pairs", type=int, default=20000, help="training pairs held in memory")
    parser.add_argument("--steps", type=int, default=1000, help="optimiser steps")
    parser.add_argument("--batch-size", type=int, default=256, help="pairs per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of AdamW")
    parser.add_argument("--warmup", type=int, default=100, help="steps of linear warm-up")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay of weight matrices")

    parser.add_argument("--seed", type=int, default=0, help="seed of model init and batch order")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the training pairs")
    parser.add_argument("--eval-seed", type=int, default=1000, help="seed of the held-out pairs")

    parser.add_argument("--n-eval", type=int, default=2000, help="held-out pairs for the final figures")
    parser.add_argument("--n-test", type=int, default=300, help="held-out pairs the tests use")
    parser.add_argument("--n-monitor", type=int, default=500, help="held-out pairs scored during training")
    parser.add_argument("--log-every", type=int, default=50, help="steps between loss records")
    parser.add_argument("--eval-every", type=int, default=250, help="steps between monitor evaluations")
    # The shipped weights were trained with one thread; the thread count can change the
    # order of float reductions, so the default keeps a rerun on the recorded path.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "assets" / "shapes_world")
    parser.add_argument("--note", default="", help="sentence added to the README after the training time")
    parser.add_argument(
        "--evaluate-only", action="store_true", help="skip training; evaluate the weights already in --out"
    )
    args = parser.parse_args(argv)

    for name in ("n_pairs", "steps", "batch_size", "n_eval", "n_test", "n_monitor", "log_every", "eval_every", "threads"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive; got {getattr(args, name)}.")
    if args.batch_size > args.n_pairs:
        parser.error(f"--batch-size {args.batch_size} exceeds --n-pairs {args.n_pairs}; lower it.")
    if args.n_test > args.n_eval:
        parser.error(f"--n-test {args.n_test} exceeds --n-eval {args.n_eval}; lower it.")
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    metrics = finish(args) if args.evaluate_only else train(args)
    logger.info("held-out zero-shot accuracy: %s (chance %s)", metrics["heldout"]["accuracy"], metrics["chance"])


if __name__ == "__main__":
    main()
