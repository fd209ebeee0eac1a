"""Batched, resumable extraction of image and caption embeddings into a feature store.

:func:`extract` reads a manifest, embeds every usable pair with a backbone and writes a
:class:`~mmono_features.store.FeatureStore`. Shard ``k`` covers manifest rows
``[k * shard_size, (k + 1) * shard_size)``, whatever the number of processes, and is
the unit of work and of resuming:

1. every process checks the output folder: shards or a store written with another
   backbone, preprocessing, dtype, shard size or manifest content stop the run unless
   ``overwrite`` is set;
2. shards go round-robin to processes (shard ``k`` to rank ``k % world_size``); a
   process skips its shards that are already complete and computes the rest;
3. after all processes finish, the main process checks that every shard is present and
   writes ``manifest.json``, ``pairs.jsonl`` and ``skipped.jsonl``.

Several processes come from ``accelerate launch --multi_gpu`` (GPUs) or ``torchrun
--nproc_per_node N`` (GPUs or CPU processes over gloo; ``accelerate launch --cpu`` starts
a single process). Under a launcher, rank and world size are read through
``accelerate.PartialState``; a plain ``python`` call is one process and leaves
accelerate's process-wide state alone.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmono_features.backbone import Backbone, file_sha256
from mmono_features.progress import progress
from mmono_features.store import DTYPES, FeatureStore, StoreWriter

logger = logging.getLogger(__name__)

__all__ = ["extract", "preprocessing_of"]

# Variables through which torchrun, accelerate and MPI launchers give the number of processes.
_WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def preprocessing_of(backbone: Backbone) -> dict[str, Any]:
    """Describe the image preprocessing of ``backbone``: image size, mean, std and the transform."""
    # Function reprs contain memory addresses, which differ between runs.
    transform = re.sub(r" at 0x[0-9a-fA-F]+", "", repr(backbone.preprocess))
    return {
        "image_size": backbone.image_size,
        "mean": list(backbone.image_mean),
        "std": list(backbone.image_std),
        "transform": transform,
    }


def extract(
    backbone: Backbone,
    manifest_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    batch_size: int = 64,
    shard_size: int = 1024,
    num_workers: int = 0,
    overwrite: bool = False,
    accelerator: Any | None = None,
    dtype: str = "float32",
) -> FeatureStore:
    """Embed every image-caption pair of a manifest into a feature store, resuming if possible.

    Parameters
    ----------
    backbone : Backbone
        From :func:`mmono_features.backbone.load_backbone`. With several CUDA processes
        the model is moved to each process's device.
    manifest_path : path
        CSV, TSV or JSONL manifest (:func:`mmono_features.data.read_manifest`).
    out_dir : path
        Store folder. Re-running with the same arguments keeps complete shards and
        computes the rest; the result equals an uninterrupted run (bitwise on the CPU).
    batch_size : int, default 64
        Pairs per forward pass. Batches never cross a shard border.
    shard_size : int, default 1024
        Manifest rows per shard.
    num_workers : int, default 0
        DataLoader worker processes that load and preprocess images; 0 loads them in
        the main process.
    overwrite : bool, default False
        Delete an existing store (and shards) in ``out_dir`` and recompute everything.
    accelerator : accelerate.Accelerator or accelerate.PartialState, optional
        Source of rank and world size. By default ``accelerate.PartialState()`` when a
        launcher set ``WORLD_SIZE`` (or an MPI equivalent) above 1, else a single process.
    dtype : {"float32", "float16"}, default "float32"
        Storage dtype of the embeddings (the backbone's output is float32).

    Returns
    -------
    FeatureStore
        The finished store, opened in every process.

    Raises
    ------
    ValueError
        Invalid arguments, or an existing store/shards from another backbone, manifest
        or setting (:class:`~mmono_features.store.StoreMismatchError`) without ``overwrite``.
    FileNotFoundError
        Missing manifest.
    RuntimeError
        A shard still missing after every process finished.

    Notes
    -----
    A process that fails leaves the others waiting at the next synchronisation point
    until torch.distributed's timeout; re-run the command to resume.
    """
    from mmono_features.data import read_manifest

    _check_arguments(batch_size, shard_size, num_workers, dtype)
    start_time = time.perf_counter()
    state = _process_state(accelerator, backbone)
    _place_backbone(backbone, state)

    # 1. Read the manifest and describe the run.
    manifest_path = Path(manifest_path)
    manifest = read_manifest(manifest_path)
    source = {"path": str(manifest_path.resolve()), "sha256": file_sha256(manifest_path), "n_rows": len(manifest)}
    writer = StoreWriter(
        out_dir,
        identity=backbone.identity(),
        preprocessing=preprocessing_of(backbone),
        d=backbone.embed_dim,
        shard_size=shard_size,
        dtype=dtype,
        source=source,
    )
    n_shards = writer.n_shards

    # 2. Check or clear the folder: every process checks (reads only) so that all of them
    # raise together, and only the main process deletes.
    if not overwrite:
        writer.check_existing()
    if state.is_main_process:
        if overwrite:
            writer.clear()
        else:
            writer.remove_temporary_files()
    state.wait_for_everyone()

    # 3. Compute this process's missing shards.
    mine = list(range(state.process_index, n_shards, state.num_processes))
    todo = [index for index in mine if not writer.has_shard(index)]
    logger.info(
        "process %d of %d: %d shard(s) assigned, %d already complete, %d to compute",
        state.process_index,
        state.num_processes,
        len(mine),
        len(mine) - len(todo),
        len(todo),
    )
    tally = _compute_shards(backbone, manifest, writer, todo, batch_size, num_workers, state.is_main_process)
    state.wait_for_everyone()

    # 4. Every process checks completeness, so that none waits on a main process that failed.
    missing = [index for index in range(n_shards) if not writer.has_shard(index)]
    if missing:
        raise RuntimeError(
            f"shard(s) {missing[:10]} of {n_shards} are missing in {writer.out_dir} after extraction; "
            "re-run the same command to compute them."
        )
    if state.is_main_process:
        writer.finalize(n_shards, pairs=manifest)
    state.wait_for_everyone()

    store = FeatureStore.open(writer.out_dir)
    if store.d != backbone.embed_dim:
        raise RuntimeError(f"the store's d ({store.d}) differs from the backbone's embed_dim ({backbone.embed_dim}).")
    _log_summary(store, state, tally, len(mine) - len(todo), time.perf_counter() - start_time)
    return store


# --------------------------------------------------------------------------- steps


def _check_arguments(batch_size: int, shard_size: int, num_workers: int, dtype: str) -> None:
    for name, value, minimum in (("batch_size", batch_size, 1), ("shard_size", shard_size, 1), ("num_workers", num_workers, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}.")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}; got {dtype!r}.")


def _process_state(accelerator: Any | None, backbone: Backbone) -> Any:
    """Return an object with process_index, num_processes, is_main_process, device, wait_for_everyone."""
    if accelerator is not None:
        needed = ("process_index", "num_processes", "is_main_process", "wait_for_everyone")
        if not all(hasattr(accelerator, name) for name in needed):
            raise ValueError(
                f"accelerator must be an accelerate.Accelerator or PartialState; got {type(accelerator).__name__}."
            )
        return accelerator
    launched = any(os.environ.get(name, "1").strip() not in ("", "0", "1") for name in _WORLD_SIZE_VARIABLES)
    if not launched and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        # A plain single process: no launcher, so accelerate's process-wide state is left untouched.
        return _SingleProcess(backbone.device)
    from accelerate import PartialState

    # accelerate (1.16) starts a gloo process group from launcher variables (RANK,
    # WORLD_SIZE, ...) only with cpu=True; without it, on a machine without GPUs, every
    # process would run alone and compute every shard.
    return PartialState(cpu=backbone.device.type == "cpu")


@dataclass(frozen=True)
class _SingleProcess:
    """The process state of a run without a launcher."""

    device: torch.device
    process_index: int = 0
    num_processes: int = 1
    is_main_process: bool = True

    def wait_for_everyone(self) -> None:
        return None


def _place_backbone(backbone: Backbone, state: Any) -> None:
    # NOTE: this CUDA placement and pin_memory have not run on a GPU yet; the tests cover
    # CPU processes over gloo.
    # Under accelerate each process owns one GPU; a backbone loaded with device="cuda"
    # before the launcher chose the device would put every process on the same GPU.
    device = getattr(state, "device", None)
    if (
        state.num_processes > 1
        and device is not None
        and backbone.device.type == "cuda"
        and device.type == "cuda"
        and backbone.device != device
    ):
        logger.info("process %d: moving the backbone from %s to %s", state.process_index, backbone.device, device)
        backbone.model.to(device)
        backbone.device = device


@dataclass
class _Tally:
    """Counts of one process's extraction."""

    shards: int = 0
    pairs: int = 0
    skipped: int = 0
    conversions: Counter = field(default_factory=Counter)


@dataclass
class _ShardBuffer:
    """Embeddings of one shard, collected batch by batch until the shard is complete."""

    image: list[torch.Tensor] = field(default_factory=list)
    text: list[torch.Tensor] = field(default_factory=list)
    rows: list[torch.Tensor] = field(default_factory=list)
    skipped: list[Any] = field(default_factory=list)

    def tensors(self, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.rows:
            empty = torch.zeros(0, d)
            return empty, empty, torch.zeros(0, dtype=torch.int64)
        return torch.cat(self.image), torch.cat(self.text), torch.cat(self.rows)


class _ShardBatchSampler:
    """Batches of manifest positions, shard after shard, never crossing a shard border.

    Batches are made lazily, so that a manifest of millions of rows costs no index lists
    up front. ``batches_per_shard`` gives the number of batches of each shard, in order.
    """

    def __init__(self, ranges: list[tuple[int, int]], batch_size: int) -> None:
        self.ranges = ranges
        self.batch_size = batch_size
        self.batches_per_shard = [math.ceil((stop - start) / batch_size) for start, stop in ranges]

    def __iter__(self) -> Iterator[list[int]]:
        for start, stop in self.ranges:
            for first in range(start, stop, self.batch_size):
                yield list(range(first, min(first + self.batch_size, stop)))

    def __len__(self) -> int:
        return sum(self.batches_per_shard)


def _compute_shards(
    backbone: Backbone,
    manifest: Any,
    writer: StoreWriter,
    shards: list[int],
    batch_size: int,
    num_workers: int,
    show_progress: bool,
) -> _Tally:
    """Embed and write ``shards``; return the counts of this process."""
    from torch.utils.data import DataLoader

    from mmono_features.data import PairDataset, collate_pairs

    tally = _Tally()
    if not shards:
        return tally
    sampler = _ShardBatchSampler([writer.shard_range(index) for index in shards], batch_size)
    loader = DataLoader(
        PairDataset(manifest, backbone.preprocess),
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_pairs,
        pin_memory=backbone.device.type == "cuda",
    )
    iterator = loader if not show_progress else progress(loader, total=len(sampler), desc="extract", unit="batch")

    # The loader returns batches in sampler order, so a count of batches per shard marks when the
    # current shard is complete and can be written.
    plan = iter(zip(shards, sampler.batches_per_shard))
    index, batches_left = next(plan)
    buffer = _ShardBuffer()
    for batch in iterator:
        if len(batch):
            image_z, text_z = _encode_batch(backbone, batch)
            buffer.image.append(image_z)
            buffer.text.append(text_z)
            buffer.rows.append(batch.rows.to(torch.int64))
            tally.pairs += len(batch)
        buffer.skipped.extend(batch.skipped)
        tally.skipped += len(batch.skipped)
        tally.conversions.update(batch.conversions)

        batches_left -= 1
        if batches_left == 0:
            image_z, text_z, rows = buffer.tensors(writer.d)
            writer.write_shard(index, image_z, text_z, rows, buffer.skipped)
            tally.shards += 1
            buffer = _ShardBuffer()
            index, batches_left = next(plan, (-1, 0))
    return tally


def _encode_batch(backbone: Backbone, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed the images and captions of one batch; return CPU float32 (b, d) tensors."""
    image_z = backbone.encode_images(batch.images).cpu()
    text_z = backbone.encode_texts(batch.captions).cpu()
    expected = (len(batch), backbone.embed_dim)
    for name, z in (("image", image_z), ("text", text_z)):
        if tuple(z.shape) != expected:
            raise RuntimeError(
                f"{backbone.name} returned {name} embeddings of shape {tuple(z.shape)}, expected {expected} "
                "(batch, embed_dim); the model and its embed_dim disagree."
            )
    return image_z, text_z


def _log_summary(store: FeatureStore, state: Any, tally: _Tally, reused: int, seconds: float) -> None:
    counts: list[Mapping[str, Any]] = [{"computed": tally.shards, "reused": reused, "conversions": dict(tally.conversions)}]
    if state.num_processes > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        from accelerate.utils import gather_object

        counts = gather_object(counts)
    if not state.is_main_process:
        return
    conversions: Counter = Counter()
    for entry in counts:
        conversions.update(entry["conversions"])
    if conversions:
        described = ", ".join(f"{n} from {mode}" for mode, n in sorted(conversions.items()))
        logger.warning("converted images to RGB before preprocessing: %s", described)
    reasons = Counter(record["reason"] for record in store.skipped())
    described = "; ".join(f"{reason}: {n}" for reason, n in reasons.most_common()) or "none"
    logger.info(
        "extracted %d pairs into %s in %.1f s; skipped %d (%s); shards: %d computed, %d reused, %d process(es)",
        store.n_pairs,
        store.path,
        seconds,
        sum(reasons.values()),
        described,
        sum(entry["computed"] for entry in counts),
        sum(entry["reused"] for entry in counts),
        state.num_processes,
    )
