"""Tests of extraction: known results, skipped rows, resuming after a kill, several processes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from fixtures_data import build_messy_manifest
from mmono_features.backbone import file_sha256, load_backbone
from mmono_features.extract import extract
from mmono_features.store import FeatureStore, StoreMismatchError

N_IMAGES = 14
SHARD_SIZE = 4  # 15 manifest rows -> shards of 4, 4, 4, 3
BATCH_SIZE = 3  # batches of 3 and 1 inside each full shard


def write_pairs(folder: Path) -> Path:
    """Write N_IMAGES noise PNGs of varied sizes and a CSV manifest with one missing image."""
    images = folder / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = ["image,caption,color"]
    for i in range(N_IMAGES):
        size = (20 + 3 * i, 40 - i)
        Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(images / f"{i:02d}.png")
        lines.append(f"images/{i:02d}.png,a noisy picture number {i},c{i % 3}")
    lines.insert(7, "images/never-written.png,a file that does not exist,c9")  # manifest row 6
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("pairs"))


@pytest.fixture(scope="module")
def reference(tiny_backbone, manifest, tmp_path_factory) -> FeatureStore:
    """An uninterrupted single-process extraction that other runs must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "store"
    return extract(tiny_backbone, manifest, out, batch_size=BATCH_SIZE, shard_size=SHARD_SIZE)


KEPT_ROWS = [row for row in range(N_IMAGES + 1) if row != 6]


def read_store_file(path: Path):
    """Return a shard's metadata and tensors, or another file's bytes."""
    if path.suffix != ".safetensors":
        return path.read_bytes()
    with safe_open(path, framework="pt") as handle:
        return handle.metadata(), {key: handle.get_tensor(key) for key in handle.keys()}


def assert_same_store(store: FeatureStore, reference: FeatureStore) -> None:
    """Check that the two stores hold the same files with bitwise equal contents.

    Shards are compared by metadata and tensors, because safetensors orders metadata keys
    differently from one process to the next. The other files are compared byte by byte.
    """
    names = sorted(path.name for path in store.path.iterdir())
    assert names == sorted(path.name for path in reference.path.iterdir())
    for name in names:
        found, expected = read_store_file(store.path / name), read_store_file(reference.path / name)
        if isinstance(expected, bytes):
            assert found == expected, name
            continue
        assert found[0] == expected[0], name
        assert found[1].keys() == expected[1].keys(), name
        for key, tensor in expected[1].items():
            assert torch.equal(found[1][key], tensor), f"{name}: {key}"


def test_embeddings_match_direct_encoding(reference, tiny_backbone, manifest):
    assert reference.rows.tolist() == KEPT_ROWS
    assert reference.d == tiny_backbone.embed_dim
    table = reference.metadata()
    pixels = torch.stack([tiny_backbone.preprocess(Image.open(path).convert("RGB")) for path in table["image"]])
    expected_images = tiny_backbone.encode_images(pixels)
    expected_texts = tiny_backbone.encode_texts(list(table["caption"]))
    torch.testing.assert_close(reference.embeddings("image", normalize=False), expected_images, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reference.embeddings("text", normalize=False), expected_texts, atol=1e-5, rtol=1e-5)
    assert table["caption"].tolist() == [f"a noisy picture number {i}" for i in range(N_IMAGES)]
    assert table["color"].tolist() == [f"c{i % 3}" for i in range(N_IMAGES)]


def test_manifest_records_run(reference, tiny_backbone, manifest):
    recorded = reference.manifest
    assert recorded["backbone"] == tiny_backbone.identity()
    assert recorded["source"] == {"path": str(manifest.resolve()), "sha256": file_sha256(manifest), "n_rows": N_IMAGES + 1}
    assert recorded["preprocessing"]["image_size"] == 32
    assert recorded["preprocessing"]["mean"] == list(tiny_backbone.image_mean)
    assert "Normalize" in recorded["preprocessing"]["transform"]
    assert [shard["count"] for shard in recorded["shards"]] == [4, 3, 4, 3]
    assert reference.skipped() == [
        {"row": 6, "path": str(manifest.parent / "images" / "never-written.png"), "reason": "file not found"}
    ]


def test_worker_processes_give_same_store(reference, tiny_backbone, manifest, tmp_path):
    store = extract(tiny_backbone, manifest, tmp_path, batch_size=BATCH_SIZE, shard_size=SHARD_SIZE, num_workers=2)
    assert_same_store(store, reference)


def test_partial_state_argument(reference, tiny_backbone, manifest, tmp_path):
    from accelerate import PartialState

    state = PartialState(cpu=True)
    store = extract(tiny_backbone, manifest, tmp_path, batch_size=BATCH_SIZE, shard_size=SHARD_SIZE, accelerator=state)
    assert_same_store(store, reference)


def test_float16_storage(reference, tiny_backbone, manifest, tmp_path):
    store = extract(tiny_backbone, manifest, tmp_path, batch_size=BATCH_SIZE, shard_size=SHARD_SIZE, dtype="float16")
    assert store.dtype == "float16"
    raw = reference.embeddings("image", normalize=False)
    assert torch.equal(store.embeddings("image", normalize=False, dtype=torch.float16), raw.half())


def test_bad_rows_are_listed_in_skipped(tiny_backbone, tmp_path):
    messy = build_messy_manifest(tmp_path / "messy")
    store = extract(tiny_backbone, messy.path, tmp_path / "store", batch_size=4, shard_size=5)
    assert store.rows.tolist() == messy.good_rows
    skipped = store.skipped()
    assert [record["row"] for record in skipped] == sorted(messy.skipped)
    for record in skipped:
        assert record["reason"].startswith(messy.skipped[record["row"]])
    lines = (store.path / "skipped.jsonl").read_text().splitlines()
    assert len(lines) == len(messy.skipped)
    assert store.metadata()["kind"].tolist() == [f"k{row}" for row in messy.good_rows]


def test_rerun_recomputes_missing_shard_only(reference, tiny_backbone, manifest, tmp_path):
    out = tmp_path / "store"
    shutil.copytree(reference.path, out)
    (out / "manifest.json").unlink()
    (out / "images-00002.safetensors").unlink()
    leftover = out / ".texts-00002.safetensors.999.tmp"
    leftover.write_bytes(b"interrupted")
    kept_mtime = (out / "images-00000.safetensors").stat().st_mtime_ns

    store = extract(tiny_backbone, manifest, out, batch_size=BATCH_SIZE, shard_size=SHARD_SIZE)
    assert (out / "images-00000.safetensors").stat().st_mtime_ns == kept_mtime
    assert not leftover.exists()
    assert_same_store(store, reference)


def run_script(tmp_path: Path) -> Path:
    """Write a script that extracts argv[1] into argv[2], sleeping argv[3] seconds per batch."""
    script = tmp_path / "run_extract.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import logging, sys, time
            logging.basicConfig(level=logging.INFO)
            from mmono_features.backbone import load_backbone
            from mmono_features.extract import extract
            from mmono_features.progress import set_progress

            set_progress(False)
            backbone = load_backbone("mmono-tiny", device="cpu", seed=0)
            delay = float(sys.argv[3])
            encode_images = backbone.encode_images

            def slow_encode_images(pixels):
                time.sleep(delay)
                return encode_images(pixels)

            backbone.encode_images = slow_encode_images
            extract(backbone, sys.argv[1], sys.argv[2], batch_size={BATCH_SIZE}, shard_size={SHARD_SIZE})
            """
        )
    )
    return script


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.update(extra)
    return env


def test_resume_after_kill_equals_uninterrupted_run(reference, tiny_backbone, manifest, tmp_path):
    out = tmp_path / "store"
    process = subprocess.Popen(
        [sys.executable, str(run_script(tmp_path)), str(manifest), str(out), "0.4"],
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "images-00000.safetensors").exists():
            assert process.poll() is None, "the extraction ended before its first shard appeared"
            assert time.monotonic() < deadline, "no shard appeared within 120 s"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()

    assert not (out / "manifest.json").exists()
    assert not (out / "images-00003.safetensors").exists()
    with pytest.raises(FileNotFoundError, match="resume"):
        FeatureStore.open(out)

    store = extract(tiny_backbone, manifest, out, batch_size=BATCH_SIZE, shard_size=SHARD_SIZE)
    assert_same_store(store, reference)


def test_mismatched_backbone_is_rejected(reference, manifest, tmp_path):
    out = tmp_path / "store"
    shutil.copytree(reference.path, out)
    (out / "manifest.json").unlink()  # an interrupted run: only shards remain
    other = load_backbone("mmono-tiny", device="cpu", seed=1)
    with pytest.raises(StoreMismatchError, match="different backbone.*--overwrite"):
        extract(other, manifest, out, batch_size=BATCH_SIZE, shard_size=SHARD_SIZE)

    store = extract(other, manifest, out, batch_size=BATCH_SIZE, shard_size=SHARD_SIZE, overwrite=True)
    assert store.backbone_identity["checkpoint_sha256"] == "random-init-seed-1"
    assert store.rows.tolist() == KEPT_ROWS
    assert not torch.equal(store.embeddings("image"), reference.embeddings("image"))


def test_changed_manifest_is_rejected(reference, tiny_backbone, manifest, tmp_path):
    out = tmp_path / "store"
    shutil.copytree(reference.path, out)
    changed = manifest.with_name("changed.csv")
    changed.write_text(manifest.read_text() + "images/00.png,one more pair,c0\n")
    try:
        with pytest.raises(StoreMismatchError, match="different source_sha256"):
            extract(tiny_backbone, changed, out, batch_size=BATCH_SIZE, shard_size=SHARD_SIZE)
        with pytest.raises(StoreMismatchError, match="different shard_size"):
            extract(tiny_backbone, manifest, out, batch_size=BATCH_SIZE, shard_size=SHARD_SIZE + 1)
    finally:
        changed.unlink()


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"shard_size": -1}, ValueError, "shard_size"),
        ({"num_workers": -1}, ValueError, "num_workers"),
        ({"dtype": "bfloat16"}, ValueError, "dtype"),
        ({"accelerator": object()}, ValueError, "accelerator"),
    ],
)
def test_bad_arguments(tiny_backbone, manifest, tmp_path, arguments, error, message):
    with pytest.raises(error, match=message):
        extract(tiny_backbone, manifest, tmp_path, **arguments)


def test_missing_manifest(tiny_backbone, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        extract(tiny_backbone, tmp_path / "absent.csv", tmp_path / "store")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ThreadRank:
    """Rank and barrier of one of several extraction threads, standing in for PartialState."""

    def __init__(self, rank: int, world_size: int, barrier: threading.Barrier) -> None:
        self.process_index = rank
        self.num_processes = world_size
        self.is_main_process = rank == 0
        self.device = torch.device("cpu")
        self._barrier = barrier

    def wait_for_everyone(self) -> None:
        self._barrier.wait(timeout=120)


def test_ranks_share_shards_round_robin(reference, tiny_backbone, manifest, tmp_path, monkeypatch):
    import mmono_features.extract as extract_module

    written: dict[int, list[int]] = {0: [], 1: [], 2: []}
    write_shard = extract_module.StoreWriter.write_shard

    def recording_write_shard(self, index, *arguments, **options):
        written[int(threading.current_thread().name)].append(index)
        return write_shard(self, index, *arguments, **options)

    monkeypatch.setattr(extract_module.StoreWriter, "write_shard", recording_write_shard)
    barrier = threading.Barrier(3)
    results: dict[int, object] = {}

    def run(rank: int) -> None:
        try:
            state = ThreadRank(rank, 3, barrier)
            results[rank] = extract(
                tiny_backbone, manifest, tmp_path, batch_size=BATCH_SIZE, shard_size=SHARD_SIZE, accelerator=state
            )
        except BaseException as error:  # reported by the main thread below
            results[rank] = error
            barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,), name=str(rank)) for rank in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    for rank in range(3):
        assert isinstance(results[rank], FeatureStore), results[rank]
    assert written == {0: [0, 3], 1: [1], 2: [2]}
    assert_same_store(results[1], reference)


@pytest.mark.slow
def test_two_processes_match_one(reference, manifest, tmp_path):
    # The variables torchrun would set, for a gloo process group on the loopback.
    out = tmp_path / "store"
    script = run_script(tmp_path)
    port = str(free_port())
    processes = []
    for rank in range(2):
        env = subprocess_env(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            OMP_NUM_THREADS="1",
        )
        processes.append(
            subprocess.Popen(
                [sys.executable, str(script), str(manifest), str(out), "0"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    for process in processes:
        output, _ = process.communicate(timeout=180)
        outputs.append(output)
        assert process.returncode == 0, output

    # Shards 0 and 2 belong to rank 0, shards 1 and 3 to rank 1.
    assert "process 0 of 2: 2 shard(s) assigned, 0 already complete, 2 to compute" in outputs[0]
    assert "process 1 of 2: 2 shard(s) assigned, 0 already complete, 2 to compute" in outputs[1]
    store = FeatureStore.open(out)
    assert store.rows.tolist() == KEPT_ROWS  # each pair exactly once, in store order
    assert store.skipped() == reference.skipped()
    assert store.metadata().equals(reference.metadata())
    for modality in ("image", "text"):
        torch.testing.assert_close(
            store.embeddings(modality, normalize=False), reference.embeddings(modality, normalize=False), atol=1e-6, rtol=1e-6
        )
