"""Throughput and peak memory of ``mmono extract`` against a plain extraction loop.

Both sides embed the image and the caption of every pair with the same model, the same
pairs and the same batch size, in one run:

- plain loop: in the main process, open each image, preprocess it, and encode one batch of
  images and captions at a time, keeping the embeddings in memory;
- mmono: :func:`mmono_features.extract.extract` into a temporary store (DataLoader worker
  processes, shards written to disk).

The model has random weights (``open_clip.create_model_and_transforms(name,
pretrained=None)``, seeded), saved to a temporary safetensors file and loaded through
``load_backbone(name, checkpoint=...)``, so no download is needed and the speed is that
of the real architecture. Peak memory is the proportional set size (PSS: resident memory,
with pages shared between processes split among them) of the process and its DataLoader
workers, sampled every 20 ms, and on CUDA ``torch.cuda.max_memory_allocated``. PSS rather
than RSS because forked workers share the parent's pages, which a sum of RSS would count
once per process.

Example::

    python -m evaluation.benchmarks.extract --model ViT-B-32 --images assets/demo --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

from mmono_features.backbone import Backbone, load_backbone
from mmono_features.data import IMAGE_SUFFIXES, load_image, read_manifest
from mmono_features.extract import extract
from mmono_features.progress import set_progress

logger = logging.getLogger(__name__)

MIB = 1024 * 1024


@dataclass
class Measurement:
    """Speed and memory of one extraction method."""

    method: str
    pairs: int
    seconds: float
    pairs_per_second: float
    peak_pss_mib: float
    pss_increase_mib: float
    cuda_peak_mib: float | None


class PeakPSS:
    """Sample the PSS of this process and its children in a background thread."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def current() -> int:
        import psutil

        process = psutil.Process()
        total = process.memory_full_info().pss
        for child in process.children(recursive=True):
            try:
                total += child.memory_full_info().pss
            except psutil.Error:  # a DataLoader worker that just exited
                pass
        return total

    def __enter__(self) -> PeakPSS:
        self.baseline = self.peak = self.current()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.current())

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self.current())


def random_backbone(name: str, folder: Path, device: str, seed: int) -> Backbone:
    """Build ``name`` with seeded random weights, save them, and load them via load_backbone."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model, _, _ = open_clip.create_model_and_transforms(name, pretrained=None)
    path = folder / f"{name}-random-seed{seed}.safetensors"
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(path))
    del model
    return load_backbone(name, checkpoint=path, device=device)


def build_manifest(images: Path, n_pairs: int | None, folder: Path) -> Path:
    """Write a CSV manifest of ``n_pairs`` pairs from a manifest file or an image folder.

    A folder with a ``manifest.csv`` uses it; another folder gives one pair per image,
    captioned with the file name. Rows are repeated in order until ``n_pairs`` is reached.
    """
    if images.is_dir() and (images / "manifest.csv").is_file():
        images = images / "manifest.csv"
    if images.is_dir():
        paths = sorted(path for path in images.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise ValueError(f"--images {images} contains no images (suffixes {IMAGE_SUFFIXES}) and no manifest.csv.")
        table = pd.DataFrame({"image": [str(path.resolve()) for path in paths], "caption": [f"a photo of {path.stem.replace('_', ' ')}" for path in paths]})
    else:
        table = read_manifest(images)
        table = table[table["skip"].isna()][["image", "caption"]]
    if n_pairs is not None:
        repeats = -(-n_pairs // len(table))
        table = pd.concat([table] * repeats, ignore_index=True).iloc[:n_pairs]
    path = folder / "benchmark-manifest.csv"
    table.to_csv(path, index=False)
    return path


def plain_loop(backbone: Backbone, manifest: pd.DataFrame, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed images and captions one batch at a time in this process; return both (n, d)."""
    images, texts = [], []
    for start in range(0, len(manifest), batch_size):
        batch = manifest.iloc[start : start + batch_size]
        pixels = torch.stack([backbone.preprocess(load_image(path)) for path in batch["image"]])
        images.append(backbone.encode_images(pixels))
        texts.append(backbone.encode_texts(list(batch["caption"])))
    return torch.cat(images), torch.cat(texts)


def measure(method: str, run: Callable[[], int], device: torch.device) -> Measurement:
    """Time ``run`` (which returns the number of pairs it embedded) and record its peak memory."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with PeakPSS() as pss:
        start = time.perf_counter()
        pairs = run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    cuda_peak = torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else None
    return Measurement(
        method=method,
        pairs=pairs,
        seconds=seconds,
        pairs_per_second=pairs / seconds,
        peak_pss_mib=pss.peak / MIB,
        pss_increase_mib=(pss.peak - pss.baseline) / MIB,
        cuda_peak_mib=cuda_peak,
    )


def run_benchmark(args: argparse.Namespace) -> dict:
    """Run the plain loop and mmono's extract on the same pairs; return the measurements."""
    set_progress(False)
    with tempfile.TemporaryDirectory(prefix="mmono-bench-") as temporary:
        folder = Path(temporary)
        backbone = random_backbone(args.model, folder, args.device, args.seed)
        manifest_path = build_manifest(Path(args.images), args.n_pairs, folder)
        manifest = read_manifest(manifest_path)

        # Warm-up: the first forward passes allocate buffers and pick kernels.
        plain_loop(backbone, manifest.iloc[: args.batch_size], args.batch_size)

        results = []
        outputs = {}
        for _ in range(args.repeats):

            def run_plain() -> int:
                outputs["plain"] = plain_loop(backbone, manifest, args.batch_size)
                return len(outputs["plain"][0])

            def run_mmono() -> int:
                store = extract(
                    backbone,
                    manifest_path,
                    folder / "store",
                    batch_size=args.batch_size,
                    shard_size=args.shard_size,
                    num_workers=args.num_workers,
                    overwrite=True,
                )
                outputs["mmono"] = store
                return store.n_pairs

            results.append(measure("plain loop", run_plain, backbone.device))
            results.append(measure("mmono extract", run_mmono, backbone.device))

        store = outputs["mmono"]
        image_difference = (store.embeddings("image", normalize=False) - outputs["plain"][0].cpu()).abs().max().item()
        text_difference = (store.embeddings("text", normalize=False) - outputs["plain"][1].cpu()).abs().max().item()

    best = {}
    for result in results:
        if result.method not in best or result.seconds < best[result.method].seconds:
            best[result.method] = result
    return {
        "model": args.model,
        "device": str(backbone.device),
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "pairs": best["plain loop"].pairs,
        "runs": [asdict(result) for result in results],
        "best": {method: asdict(result) for method, result in best.items()},
        "speedup": best["mmono extract"].pairs_per_second / best["plain loop"].pairs_per_second,
        "max_abs_difference": {"image": image_difference, "text": text_difference},
    }


def format_report(report: dict) -> str:
    lines = [
        f"model {report['model']} (random weights) on {report['device']}, {report['threads']} threads, "
        f"{report['pairs']} pairs, batch size {report['batch_size']}, {report['num_workers']} DataLoader workers",
        f"{'method':<14} {'seconds':>8} {'pairs/s':>8} {'peak PSS MiB':>13} {'PSS increase MiB':>17} {'CUDA peak MiB':>14}",
    ]
    for method, result in report["best"].items():
        cuda = "-" if result["cuda_peak_mib"] is None else f"{result['cuda_peak_mib']:.0f}"
        lines.append(
            f"{method:<14} {result['seconds']:>8.2f} {result['pairs_per_second']:>8.1f} "
            f"{result['peak_pss_mib']:>13.0f} {result['pss_increase_mib']:>17.0f} {cuda:>14}"
        )
    lines.append(f"speed ratio mmono / plain: {report['speedup']:.2f}")
    differences = report["max_abs_difference"]
    lines.append(f"max |mmono - plain| embedding difference: image {differences['image']:.2e}, text {differences['text']:.2e}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Images/s and peak memory of mmono extract against a plain loop.")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture, built with random weights.")
    parser.add_argument("--images", default="assets/demo", help="Folder of images (or with a manifest.csv), or a manifest file.")
    parser.add_argument("--n-pairs", type=int, default=None, help="Repeat the pairs until there are this many (default: each once).")
    parser.add_argument("--batch-size", type=int, default=32, help="Pairs per forward pass, for both methods.")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes of mmono extract.")
    parser.add_argument("--shard-size", type=int, default=1024, help="Manifest rows per shard of mmono extract.")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda.")
    parser.add_argument("--repeats", type=int, default=1, help="Runs of each method; the fastest is reported.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the measurements to this JSON file.")
    args = parser.parse_args(argv)
    for name in ("batch_size", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}.")
    if args.n_pairs is not None and args.n_pairs < 1:
        parser.error(f"--n-pairs must be at least 1; got {args.n_pairs}.")
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    report = run_benchmark(args)
    print(format_report(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
