"""Reproduce the dictionary comparison on one feature store into one results folder.

For every dictionary kind (topk, relu, batchtopk, matryoshka, ncl) and every seed, the
script trains a dictionary, scores it, and then writes:

- ``dictionaries/<kind>-seed<s>/``: checkpoints, ``history.json`` and ``scores.csv``;
- ``comparison/``: metrics, EmbSim with intervals over the m sweep, WinRate of every
  dictionary over every other one and over random samples, group sizes;
- ``stability.csv``: Jaccard overlap of each group between seeds of the same kind;
- ``ablation.csv`` (with ``--labelled``): zero-shot accuracy with each group removed
  against random latent sets of the same size;
- ``settings.json``: every option of the run.

Usage (CC3M-scale, on a GPU; see evaluation/README.md)::

    python -m evaluation.reproduce --store cc3m-store/ --out results/ --d-sae 16384 --k 32 \\
        --steps 30000 --batch-size 4096 --device cuda --labelled imagenet-val/
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
from pathlib import Path

import pandas as pd

logger = logging.getLogger(__name__)

KINDS = ("topk", "relu", "batchtopk", "matryoshka", "ncl")


def _kind_options(kind: str, k: int, d_sae: int, l1_coefficient: float) -> dict:
    if kind in ("topk", "batchtopk"):
        return {"k": k}
    if kind == "matryoshka":
        sizes = sorted({max(k, d_sae // 8), max(k, d_sae // 4), max(k, d_sae // 2), d_sae})
        return {"k": k, "prefix_sizes": tuple(sizes)}
    if kind == "relu":
        return {"l1_coefficient": l1_coefficient}
    return {}


def reproduce(args: argparse.Namespace) -> Path:
    """Run the whole comparison; return the results folder."""
    from mmono_features.dictionary import TrainConfig, load_dictionary, make_config, train_dictionary
    from mmono_features.compare import compare_dictionaries, write_comparison
    from mmono_features.interpret import group_stability
    from mmono_features.modality import Scores, score_dictionary
    from mmono_features.store import FeatureStore

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "settings.json").write_text(json.dumps(vars(args), indent=2, default=str) + "\n", encoding="utf-8")
    store = FeatureStore.open(args.store)
    image_z = store.embeddings("image", normalize=False)
    text_z = store.embeddings("text", normalize=False)

    # 1. Train and score every kind and seed (finished ones are reused on a rerun).
    trained: dict[tuple[str, int], Path] = {}
    for kind, seed in itertools.product(args.kinds, args.seeds):
        path = out / "dictionaries" / f"{kind}-seed{seed}"
        if not (path / "scores.csv").is_file():
            config = make_config(kind, d_in=store.d, d_sae=args.d_sae, backbone=store.backbone_identity, seed=seed,
                                 **_kind_options(kind, args.k, args.d_sae, args.l1_coefficient))
            train_config = TrainConfig(n_steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=seed, device=args.device)
            result = train_dictionary(store, config, train_config)
            result.dictionary.save_pretrained(path)
            (path / "history.json").write_text(json.dumps(result.history, indent=1) + "\n", encoding="utf-8")
            scores = score_dictionary(result.dictionary, image_z, text_z, min_active=args.min_active, n_boot=args.n_boot, seed=seed)
            scores.save(path / "scores.csv")
            logger.info("trained and scored %s seed %d", kind, seed)
        trained[(kind, seed)] = path

    # 2. Compare all dictionaries on the store.
    labels = [f"{kind}-seed{seed}" for kind, seed in trained]
    tables = compare_dictionaries(store, list(trained.values()), labels=labels, ms=tuple(args.m), min_active=args.min_active,
                                  n_boot=args.n_boot, seed=0)
    write_comparison(tables, out / "comparison", settings=vars(args))

    # 3. Group stability between seeds of each kind.
    stability = []
    for kind in args.kinds:
        for seed_a, seed_b in itertools.combinations(args.seeds, 2):
            path_a, path_b = trained[(kind, seed_a)], trained[(kind, seed_b)]
            table = group_stability(
                load_dictionary(path_a), Scores.load(path_a / "scores.csv"), load_dictionary(path_b), Scores.load(path_b / "scores.csv")
            )
            table.insert(0, "kind", kind)
            table.insert(1, "seeds", f"{seed_a}-{seed_b}")
            stability.append(table)
    if stability:
        pd.concat(stability, ignore_index=True).to_csv(out / "stability.csv", index=False)

    # 4. Group-ablation check on a labelled image set.
    if args.labelled:
        from mmono_features.backbone import load_backbone_from_identity
        from evaluation.group_ablation import embed_labelled_images, group_ablation_table

        backbone = load_backbone_from_identity(store.backbone_identity, device=args.device, checkpoint=args.checkpoint)
        data = embed_labelled_images(backbone, args.labelled)
        frames = []
        for (kind, seed), path in trained.items():
            table = group_ablation_table(load_dictionary(path), Scores.load(path / "scores.csv"), data, n_random=args.n_random, seed=seed)
            table.insert(0, "dictionary", f"{kind}-seed{seed}")
            frames.append(table)
        pd.concat(frames, ignore_index=True).to_csv(out / "ablation.csv", index=False)
    logger.info("results in %s", out)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train, score and compare every dictionary kind over several seeds.")
    parser.add_argument("--store", required=True, help="feature store written by `mmono extract`")
    parser.add_argument("--out", required=True, help="results folder")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--l1-coefficient", type=float, default=1.0, help="L1 penalty weight of the relu kind")
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--m", nargs="+", type=int, default=[10, 20, 50], help="top-m sizes of the EmbSim sweep")
    parser.add_argument("--min-active", type=int, default=20)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--labelled", default=None, help="labelled image folder or CSV for the group-ablation check")
    parser.add_argument("--n-random", type=int, default=10, help="random latent sets per group in the ablation check")
    parser.add_argument("--checkpoint", default=None, help="the store's local backbone checkpoint, if it was extracted from one")
    parser.add_argument("--device", default="auto")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    reproduce(parse_args(argv))


if __name__ == "__main__":
    main()
