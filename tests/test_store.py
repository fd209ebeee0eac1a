"""Tests of the feature store: write/read round trips, atomic shards, validation, streaming."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from safetensors import safe_open

from mmono_features.embeddings import normalize_embeddings
from mmono_features.store import (
    MODALITY_CODES,
    FeatureStore,
    StoreMismatchError,
    StoreWriter,
    shard_filename,
)

D = 8
SHARD_SIZE = 5
N_ROWS = 13  # shards of 5, 5 and 3 source rows
IDENTITY = {"name": "test-model", "pretrained": None, "checkpoint_sha256": "abc", "embed_dim": D}
PREPROCESSING = {"image_size": 32, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "transform": "Compose()"}
SOURCE = {"path": "/data/manifest.csv", "sha256": "f" * 64, "n_rows": N_ROWS}
# Source rows that failed to load: row 3 (shard 0), rows 11 and 12 (shard 2 keeps only row 10).
SKIPPED_ROWS = {3: "file not found", 11: "image data is truncated", 12: "caption is empty"}


def make_writer(folder, **changes) -> StoreWriter:
    arguments = dict(
        identity=IDENTITY, preprocessing=PREPROCESSING, d=D, shard_size=SHARD_SIZE, dtype="float32", source=SOURCE
    )
    arguments.update(changes)
    return StoreWriter(folder, **arguments)


def source_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "row": range(N_ROWS),
            "image": [f"/data/images/{i}.jpg" for i in range(N_ROWS)],
            "caption": [f"caption {i}" for i in range(N_ROWS)],
            "split": ["train" if i % 2 else "test" for i in range(N_ROWS)],
            "score": [i / 7 if i != 4 else float("nan") for i in range(N_ROWS)],
            "count": [i * 10**12 for i in range(N_ROWS)],
            "skip": [SKIPPED_ROWS.get(i) for i in range(N_ROWS)],
        }
    )


def planted(rows: torch.Tensor, modality: str) -> torch.Tensor:
    """Embeddings that encode their own row: row r, modality m -> known values of shape (n, D)."""
    offset = 0.0 if modality == "image" else 100.0
    columns = torch.arange(D, dtype=torch.float32)
    return (rows.float()[:, None] + offset) * (columns[None, :] + 1) - columns[None, :] ** 2


def write_all(writer: StoreWriter, shards=None) -> None:
    n_shards = writer.n_shards
    for index in range(n_shards) if shards is None else shards:
        start, stop = writer.shard_range(index)
        rows = torch.tensor([r for r in range(start, stop) if r not in SKIPPED_ROWS], dtype=torch.int64)
        skipped = [{"row": r, "path": f"/data/images/{r}.jpg", "reason": SKIPPED_ROWS[r]} for r in range(start, stop) if r in SKIPPED_ROWS]
        writer.write_shard(index, planted(rows, "image"), planted(rows, "text"), rows, skipped)


@pytest.fixture()
def store(tmp_path) -> FeatureStore:
    writer = make_writer(tmp_path / "store")
    write_all(writer)
    writer.finalize(pairs=source_frame())
    return FeatureStore.open(tmp_path / "store")


KEPT = torch.tensor([r for r in range(N_ROWS) if r not in SKIPPED_ROWS])


def test_round_trip_embeddings_and_rows(store):
    assert store.n_pairs == len(KEPT)
    assert store.d == D
    assert torch.equal(store.rows, KEPT)
    for modality in ("image", "text"):
        raw = store.embeddings(modality, normalize=False)
        assert raw.dtype == torch.float32
        assert torch.equal(raw, planted(KEPT, modality))
        normalized = store.embeddings(modality)
        assert torch.allclose(normalized, normalize_embeddings(planted(KEPT, modality)))
        assert torch.allclose(normalized.norm(dim=1), torch.full((len(KEPT),), math.sqrt(D)))
    assert store.embeddings("text", dtype=torch.float64).dtype == torch.float64


def test_round_trip_metadata_and_skipped(store):
    table = store.metadata()
    assert list(table.columns) == ["row", "image", "caption", "split", "score", "count"]
    assert table["row"].tolist() == KEPT.tolist()
    assert table["caption"].tolist() == [f"caption {r}" for r in KEPT.tolist()]
    assert table["split"].tolist() == ["train" if r % 2 else "test" for r in KEPT.tolist()]
    scores = table["score"].tolist()
    assert math.isnan(scores[KEPT.tolist().index(4)])
    assert [score for row, score in zip(KEPT.tolist(), scores) if row != 4] == [r / 7 for r in KEPT.tolist() if r != 4]
    assert table["count"].tolist() == [r * 10**12 for r in KEPT.tolist()]
    assert store.skipped() == [
        {"row": r, "path": f"/data/images/{r}.jpg", "reason": reason} for r, reason in sorted(SKIPPED_ROWS.items())
    ]


def test_manifest_fields(store):
    manifest = store.manifest
    assert manifest["format"] == "mmono-feature-store"
    assert manifest["backbone"] == IDENTITY
    assert store.backbone_identity == IDENTITY
    assert manifest["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    assert manifest["dtype"] == "float32"
    assert manifest["count"] == len(KEPT)
    assert manifest["n_skipped"] == len(SKIPPED_ROWS)
    assert manifest["source"] == SOURCE
    assert "sqrt(d)" in manifest["normalization"]
    assert manifest["rows"]["min"] == 0
    assert manifest["rows"]["max"] == 10
    assert [shard["source_rows"] for shard in manifest["shards"]] == [[0, 5], [5, 10], [10, 13]]
    assert [shard["store_rows"] for shard in manifest["shards"]] == [[0, 4], [4, 9], [9, 10]]
    assert [shard["count"] for shard in manifest["shards"]] == [4, 5, 1]


def test_shard_files_layout(store):
    with safe_open(store.path / "texts-00001.safetensors", framework="pt") as handle:
        assert set(handle.keys()) == {"embeddings", "rows"}
        assert handle.get_tensor("rows").dtype == torch.int64
        assert torch.equal(handle.get_tensor("embeddings"), planted(torch.arange(5, 10), "text"))
        assert handle.metadata()["modality"] == "text"


def test_float16_storage(tmp_path):
    writer = make_writer(tmp_path, dtype="float16")
    write_all(writer)
    writer.finalize()
    store = FeatureStore.open(tmp_path)
    assert store.dtype == "float16"
    raw16 = store.embeddings("image", normalize=False, dtype=torch.float16)
    assert torch.equal(raw16, planted(KEPT, "image").half())
    assert torch.allclose(store.embeddings("image"), normalize_embeddings(planted(KEPT, "image")), atol=1e-2)
    assert store.metadata()["row"].tolist() == KEPT.tolist()  # without pairs: only the row column


def test_empty_shard_all_skipped(tmp_path):
    writer = make_writer(tmp_path, source=SOURCE | {"n_rows": 2}, shard_size=1)
    writer.write_shard(0, torch.zeros(0, D), torch.zeros(0, D), torch.zeros(0, dtype=torch.int64), [{"row": 0, "path": "a", "reason": "file is empty"}])
    writer.write_shard(1, torch.ones(1, D), torch.ones(1, D), torch.tensor([1]))
    assert writer.has_shard(0)
    writer.finalize()
    store = FeatureStore.open(tmp_path)
    assert store.n_pairs == 1
    assert store.rows.tolist() == [1]
    batches = list(store.iter_batches(4, shuffle=False))
    assert len(batches) == 1
    assert batches[0][0].shape == (2, D)


def test_iter_batches_covers_each_embedding_once(store):
    expected = {("image", r) for r in KEPT.tolist()} | {("text", r) for r in KEPT.tolist()}
    normalized = {m: normalize_embeddings(planted(KEPT, m)) for m in ("image", "text")}
    for shuffle in (False, True):
        seen = []
        sizes = []
        for z, modality in store.iter_batches(3, shuffle=shuffle, seed=1):
            sizes.append(len(z))
            for vector, code in zip(z, modality.tolist()):
                name = "image" if code == MODALITY_CODES["image"] else "text"
                matches = torch.nonzero(torch.isclose(normalized[name], vector[None]).all(dim=1)).flatten()
                assert len(matches) == 1
                seen.append((name, int(KEPT[matches[0]])))
        assert sorted(seen) == sorted(expected)
        assert sizes == [3] * 6 + [2]


def test_iter_batches_seeded_order(store):
    first = torch.cat([z for z, _ in store.iter_batches(4, seed=3)])
    again = torch.cat([z for z, _ in store.iter_batches(4, seed=3)])
    other = torch.cat([z for z, _ in store.iter_batches(4, seed=4)])
    plain = torch.cat([z for z, _ in store.iter_batches(4, shuffle=False)])
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first, plain)


def test_iter_batches_one_modality_raw(store):
    batches = list(store.iter_batches(100, shuffle=False, normalize=False, modalities=("text",)))
    assert len(batches) == 1
    z, modality = batches[0]
    assert torch.equal(z, planted(KEPT, "text"))
    assert modality.tolist() == [MODALITY_CODES["text"]] * len(KEPT)
    assert len(list(store.iter_batches(4, modalities=("image",), drop_last=True))) == len(KEPT) // 4


def test_iter_pairs_aligned(store):
    for shuffle in (False, True):
        rows_seen = []
        for image_z, text_z, rows in store.iter_pairs(4, shuffle=shuffle, normalize=False):
            assert torch.equal(image_z, planted(rows, "image"))
            assert torch.equal(text_z, planted(rows, "text"))
            rows_seen.extend(rows.tolist())
        assert sorted(rows_seen) == KEPT.tolist()
        assert (rows_seen == KEPT.tolist()) is not shuffle


def test_iter_batches_streams_shards(store, monkeypatch):
    # Peak memory follows the number of shards read before a batch is handed out.
    reads = []
    original = FeatureStore._read

    def counting_read(self, shard, modality, with_embeddings=True):
        reads.append((shard["index"], modality))
        return original(self, shard, modality, with_embeddings)

    monkeypatch.setattr(FeatureStore, "_read", counting_read)
    batches = store.iter_batches(2, shuffle=True, shards_in_memory=1)
    next(batches)
    assert len(reads) == 2  # one shard, both modalities
    list(batches)
    assert len(reads) == 2 * store.n_shards


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2, "modalities": ("audio",)}, "modality"),
        ({"batch_size": 2, "modalities": ()}, "modalities"),
        ({"batch_size": 2, "shards_in_memory": 0}, "shards_in_memory"),
    ],
)
def test_iter_batches_rejects_bad_arguments(store, arguments, message):
    with pytest.raises(ValueError, match=message):
        next(store.iter_batches(**arguments))


def test_open_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FeatureStore.open(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="not a feature store"):
        FeatureStore.open(tmp_path)


def test_open_unfinished_store_says_resume(tmp_path):
    writer = make_writer(tmp_path)
    write_all(writer, shards=[0])
    with pytest.raises(FileNotFoundError, match="resume"):
        FeatureStore.open(tmp_path)


def test_open_rejects_damaged_store(store):
    manifest_path = store.path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())

    manifest_path.write_text(json.dumps(manifest | {"format_version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        FeatureStore.open(store.path)

    manifest_path.write_text(json.dumps(manifest | {"format": "other"}))
    with pytest.raises(ValueError, match="not a feature store manifest"):
        FeatureStore.open(store.path)

    manifest_path.write_text(json.dumps(manifest | {"count": 99}))
    with pytest.raises(ValueError, match="add up to 10"):
        FeatureStore.open(store.path)

    manifest_path.write_text(json.dumps(manifest | {"d": 16}))
    with pytest.raises(ValueError, match="damaged"):
        FeatureStore.open(store.path)

    manifest_path.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        FeatureStore.open(store.path)

    manifest_path.write_text(json.dumps(manifest))
    (store.path / "texts-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="texts-00002"):
        FeatureStore.open(store.path)


def test_temporary_file_is_ignored_and_removed(tmp_path):
    writer = make_writer(tmp_path)
    write_all(writer, shards=[0])
    leftover = tmp_path / f".{shard_filename('image', 1)}.4242.tmp"
    leftover.write_bytes(b"half a shard")
    assert not writer.has_shard(1)
    writer.check_existing()  # a temporary file is neither a shard nor a mismatch
    write_all(writer, shards=[1, 2])
    writer.finalize()
    assert not leftover.exists()
    assert FeatureStore.open(tmp_path).n_pairs == len(KEPT)


def test_half_written_shard_is_not_complete(tmp_path):
    writer = make_writer(tmp_path)
    write_all(writer, shards=[0, 1])
    assert writer.has_shard(0)
    (tmp_path / shard_filename("image", 0)).unlink()  # killed between the two renames
    assert not writer.has_shard(0)
    (tmp_path / shard_filename("text", 1)).write_bytes(b"\x00" * 20)  # damaged on disk
    assert not writer.has_shard(1)
    with pytest.raises(RuntimeError, match="shard 0 of 3 is missing"):
        writer.finalize()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"identity": IDENTITY | {"checkpoint_sha256": "other"}}, "backbone"),
        ({"source": SOURCE | {"sha256": "0" * 64}}, "source_sha256"),
        ({"dtype": "float16"}, "dtype"),
        ({"preprocessing": PREPROCESSING | {"image_size": 224}}, "preprocessing"),
    ],
)
def test_mismatched_existing_shards_are_rejected(tmp_path, change, field):
    write_all(make_writer(tmp_path), shards=[0])
    other = make_writer(tmp_path, **change)
    with pytest.raises(StoreMismatchError, match=f"different {field}.*overwrite"):
        other.check_existing()
    assert not other.has_shard(0)
    other.clear()
    assert not any(tmp_path.iterdir())


def test_mismatched_finished_store_is_rejected(store):
    other = make_writer(store.path, shard_size=4)
    with pytest.raises(StoreMismatchError, match="different shard_size"):
        other.check_existing()
    make_writer(store.path).check_existing()  # the same settings pass


def test_clear_keeps_foreign_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    writer = make_writer(tmp_path)
    write_all(writer)
    writer.finalize()
    writer.clear()
    assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(
    ("index", "image", "rows", "message"),
    [
        (0, torch.zeros(2, D + 1), torch.tensor([0, 1]), r"shape \(2, 8\)"),
        (0, torch.zeros(2, D), torch.tensor([0, 7]), "strictly increasing within"),
        (0, torch.zeros(2, D), torch.tensor([1, 1]), "strictly increasing"),
        (-1, torch.zeros(2, D), torch.tensor([0, 1]), "index"),
    ],
)
def test_write_shard_rejects_bad_input(tmp_path, index, image, rows, message):
    writer = make_writer(tmp_path)
    with pytest.raises(ValueError, match=message):
        writer.write_shard(index, image, torch.zeros(2, D), rows)


def test_writer_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        make_writer(tmp_path, dtype="int8")
    with pytest.raises(ValueError, match="shard_size"):
        make_writer(tmp_path, shard_size=0)
    with pytest.raises(ValueError, match="d must"):
        make_writer(tmp_path, d=0)
