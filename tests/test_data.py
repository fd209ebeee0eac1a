"""Tests of mmono_features.data and mmono_features.images: manifests, image loading, skips."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fixtures_data import (
    asymmetric_rgb,
    build_messy_manifest,
    write_16bit_png,
    write_cmyk_jpeg,
    write_exif_rotated_jpeg,
    write_palette_png,
    write_rgb_jpeg,
    write_rgba_png,
)
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from mmono_features import images as images_module
from mmono_features.data import (
    ImageLoadError,
    PairDataset,
    SkipRecord,
    collate_pairs,
    load_image,
    read_labelled_images,
    read_manifest,
    read_skipped,
    write_skipped,
)

DEMO = Path(__file__).resolve().parents[1] / "assets" / "demo"


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int64)


# --------------------------------------------------------------------------- one messy manifest


def test_messy_manifest_skips_only_bad_rows(tmp_path):
    messy = build_messy_manifest(tmp_path)
    dataset = PairDataset(messy.path)
    items = [dataset[index] for index in range(len(dataset))]

    kept = [item["row"] for item in items if item["skip"] is None]
    assert kept == messy.good_rows
    skipped = {item["row"]: item["skip"] for item in items if item["skip"] is not None}
    assert set(skipped) == set(messy.skipped)
    for row, expected in messy.skipped.items():
        assert skipped[row].startswith(expected), (row, skipped[row])
    assert skipped[9] == "caption is not valid UTF-8 (byte 0xe9)"

    by_name = {Path(item["path"]).name: item for item in items if item["skip"] is None}
    for item in by_name.values():
        assert item["image"].mode == "RGB"
    assert by_name["cmyk.jpg"]["converted_from"] == "CMYK"
    assert np.abs(pixels(by_name["cmyk.jpg"]["image"])[6, 8] - [255, 0, 0]).max() <= 3
    assert pixels(by_name["gray16.png"]["image"])[0, :, 0].tolist() == [0, 128, 255]
    rgba = pixels(by_name["rgba.png"]["image"])
    assert rgba[0, 0].tolist() == [255, 255, 255]
    assert rgba[0, 7].tolist() == [0, 0, 255]
    rotated = by_name["rotated.jpg"]["image"]
    assert rotated.size == (20, 40)  # stored 40 wide, 20 high; Orientation 6 turns it upright
    assert items[10]["caption"] == "cr\u00e8me br\u00fbl\u00e9e, fine UTF-8"


def test_messy_manifest_skip_column_marks_row_level_problems(tmp_path):
    messy = build_messy_manifest(tmp_path)
    frame = read_manifest(messy.path)
    assert frame["row"].tolist() == list(range(11))
    assert frame["kind"].tolist() == [f"k{index}" for index in range(11)]
    marked = frame.loc[frame["skip"].notna(), "row"].tolist()
    assert marked == [8, 9]  # file problems are found only when the image is loaded
    assert pd.isna(frame.loc[9, "caption"])


def test_collate_reports_kept_and_skipped(tmp_path):
    messy = build_messy_manifest(tmp_path)
    dataset = PairDataset(messy.path, preprocess=_tensor_transform())
    batch = collate_pairs([dataset[index] for index in range(len(dataset))])
    assert batch.rows.dtype == torch.long
    assert batch.rows.tolist() == messy.good_rows
    assert batch.images.shape == (len(messy.good_rows), 3, 16, 16)
    assert len(batch.captions) == len(batch) == len(messy.good_rows)
    assert [record.row for record in batch.skipped] == sorted(messy.skipped)
    assert batch.conversions == {"CMYK": 1, "I;16": 1, "RGBA": 1}


# --------------------------------------------------------------------------- image loading


@pytest.mark.parametrize(("orientation", "red_corner"), [(6, "top_right"), (8, "bottom_left")])
def test_exif_orientation_is_applied(tmp_path, orientation, red_corner):
    image = load_image(write_exif_rotated_jpeg(tmp_path / "r.jpg", orientation))
    assert image.size == (20, 40)
    array = pixels(image)
    corners = {"top_left": array[2, 2], "top_right": array[2, -3], "bottom_left": array[-3, 2]}
    for name, value in corners.items():
        is_red = value[0] > 200 and value[1] < 60 and value[2] < 60
        assert is_red == (name == red_corner), (name, value)


def test_no_exif_keeps_the_stored_orientation(tmp_path):
    path = tmp_path / "plain.png"
    asymmetric_rgb().save(path)
    image = load_image(path)
    assert image.size == (40, 20)
    assert pixels(image)[0, 0].tolist() == [255, 0, 0]


def test_sixteen_bit_gray_is_scaled_not_clipped(tmp_path):
    image = load_image(write_16bit_png(tmp_path / "g.png", values=(0, 257, 32768, 65535)))
    row = pixels(image)[0]
    assert row[:, 0].tolist() == [0, 1, 128, 255]
    assert (row[:, 0] == row[:, 1]).all()
    assert (row[:, 1] == row[:, 2]).all()


def test_int32_and_float_gray_are_scaled(tmp_path):
    Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32)).save(tmp_path / "i.tif")
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "f.tif")
    Image.fromarray(np.array([[-10.0, 0.0, 10.0]], dtype=np.float32)).save(tmp_path / "wide.tif")
    assert pixels(load_image(tmp_path / "i.tif"))[0, :, 0].tolist() == [0, 128, 255]
    assert pixels(load_image(tmp_path / "f.tif"))[0, :, 0].tolist() == [0, 128, 255]
    assert pixels(load_image(tmp_path / "wide.tif"))[0, :, 0].tolist() == [0, 128, 255]


def test_rgba_is_composited_on_white(tmp_path):
    array = np.zeros((2, 3, 4), dtype=np.uint8)
    array[0, 1] = (255, 0, 0, 255)  # opaque red
    array[0, 2] = (0, 0, 0, 128)  # half-transparent black -> mid gray
    Image.fromarray(array).save(tmp_path / "a.png")
    image = pixels(load_image(tmp_path / "a.png"))
    assert image[0, 0].tolist() == [255, 255, 255]
    assert image[0, 1].tolist() == [255, 0, 0]
    assert np.abs(image[0, 2] - 127).max() <= 1


def test_gray_with_alpha_is_composited_on_white(tmp_path):
    Image.new("LA", (2, 2), (0, 0)).save(tmp_path / "la.png")
    assert pixels(load_image(tmp_path / "la.png"))[0, 0].tolist() == [255, 255, 255]


def test_palette_with_transparency(tmp_path):
    image = pixels(load_image(write_palette_png(tmp_path / "p.png")))
    assert image[0, 0].tolist() == [255, 255, 255]
    assert image[0, 5].tolist() == [0, 200, 0]


def test_palette_without_transparency_and_bilevel(tmp_path):
    Image.new("P", (2, 2), 0).save(tmp_path / "p.gif")
    Image.new("1", (2, 2), 1).save(tmp_path / "b.png")
    assert load_image(tmp_path / "p.gif").mode == "RGB"
    assert pixels(load_image(tmp_path / "b.png"))[0, 0].tolist() == [255, 255, 255]


def test_cmyk_becomes_rgb(tmp_path):
    image = load_image(write_cmyk_jpeg(tmp_path / "c.jpg"))
    assert image.mode == "RGB"
    assert np.abs(pixels(image)[5, 5] - [255, 0, 0]).max() <= 3


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda folder: folder / "absent.jpg", "file not found"),
        (lambda folder: _touch(folder / "zero.jpg"), "file is empty (0 bytes)"),
        (lambda folder: folder, "path is a folder, not an image file"),
        (lambda folder: _write(folder / "notes.jpg", b"not an image at all"), "not a readable image format"),
    ],
)
def test_unusable_files_raise_image_load_error(tmp_path, make, reason):
    path = make(tmp_path)
    with pytest.raises(ImageLoadError) as caught:
        load_image(path)
    assert caught.value.reason == reason
    assert caught.value.path == str(path)
    assert pickle.loads(pickle.dumps(caught.value)).reason == reason


def test_truncated_jpeg_fails_on_full_decode(tmp_path):
    from fixtures_data import write_truncated_jpeg

    path = write_truncated_jpeg(tmp_path / "t.jpg")
    with Image.open(path) as handle:  # the header alone is fine
        assert handle.size == (64, 64)
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(path)


def test_max_pixels_limit(tmp_path):
    path = write_rgb_jpeg(tmp_path / "p.jpg", size=(24, 16))  # 384 pixels
    assert load_image(path, max_pixels=384).size == (24, 16)
    with pytest.raises(ImageLoadError, match=r"24x16 = 384 pixels, above max_pixels=383"):
        load_image(path, max_pixels=383)
    pd.DataFrame({"image": ["p.jpg"], "caption": ["blue"]}).to_csv(tmp_path / "m.csv", index=False)
    item = PairDataset(tmp_path / "m.csv", max_pixels=100)[0]
    assert item["image"] is None
    assert "decompression-bomb" in item["skip"]


def test_pillow_bomb_error_becomes_a_skip(tmp_path, monkeypatch):
    path = write_rgb_jpeg(tmp_path / "p.jpg", size=(24, 16))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow raises above 2 * 100
    with pytest.raises(ImageLoadError, match="MAX_IMAGE_PIXELS"):
        load_image(path, max_pixels=None)


@pytest.mark.parametrize("bad", [0, -5, 2.5, True, "many"])
def test_max_pixels_must_be_positive_int(tmp_path, bad):
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(tmp_path / "x.jpg", max_pixels=bad)


def test_conversions_are_logged_once_per_mode_and_counted(tmp_path, caplog):
    Image.new("L", (4, 4), 9).save(tmp_path / "g.png")
    images_module.reset_conversion_counts()
    with caplog.at_level(logging.INFO, logger="mmono_features.images"):
        for _ in range(3):
            load_image(tmp_path / "g.png")
        images_module.log_conversion_summary()
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "'L'" in warnings[0].getMessage()
    assert images_module.conversion_counts() == {"L": 3}
    assert "L: 3" in caplog.records[-1].getMessage()
    images_module.reset_conversion_counts()


# --------------------------------------------------------------------------- manifest formats

RECORDS = [
    {"image": "a.jpg", "caption": 'a "quoted" word, a comma', "subject": "object", "score": "1"},
    {"image": "sub/b.jpg", "caption": "two\nlines", "subject": "scene", "score": "2"},
    {"image": "c.jpg", "caption": "tab\tinside and \u00fcml\u00e4uts \u2028 and emoji \U0001f600", "subject": "", "score": "NA"},
]


def _write_table(path: Path, records: list[dict], bom: bool = False) -> Path:
    suffix = path.suffix
    if suffix in (".csv", ".tsv"):
        frame = pd.DataFrame(records)
        text = frame.to_csv(index=False, sep="," if suffix == ".csv" else "\t")
    else:
        text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    path.write_bytes(("\ufeff" if bom else "").encode() + text.encode("utf-8"))
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json"])
@pytest.mark.parametrize("bom", [False, True])
def test_manifest_round_trip(tmp_path, monkeypatch, suffix, bom):
    path = _write_table(tmp_path / f"manifest{suffix}", RECORDS, bom=bom)
    monkeypatch.chdir("/")  # relative paths follow the manifest, not the working folder
    frame = read_manifest(path)
    assert list(frame.columns) == ["row", "image", "caption", "subject", "score", "skip"]
    assert frame["row"].tolist() == [0, 1, 2]
    assert frame["caption"].tolist() == [record["caption"] for record in RECORDS]
    assert frame["image"].tolist() == [str(tmp_path / record["image"]) for record in RECORDS]
    assert frame["subject"].fillna("").tolist() == ["object", "scene", ""]
    assert frame["score"].tolist() == ["1", "2", "NA"]  # values are not type-guessed
    assert frame["skip"].isna().all()


def test_json_array_file(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps(RECORDS), encoding="utf-8")
    assert read_manifest(tmp_path / "m.json")["caption"].tolist()[0] == RECORDS[0]["caption"]


def test_absolute_image_paths_are_kept(tmp_path):
    other = tmp_path / "elsewhere" / "x.jpg"
    _write_table(tmp_path / "m.csv", [{"image": str(other), "caption": "x"}])
    assert read_manifest(tmp_path / "m.csv")["image"].tolist() == [str(other)]


def test_tsv_named_csv_error_lists_columns_and_fix(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("image\tcaption\na.jpg\thello\n", encoding="utf-8")
    with pytest.raises(ValueError) as caught:
        read_manifest(path)
    message = str(caught.value)
    assert "found columns ['image\\tcaption']" in message
    assert "expected ['image', 'caption']" in message
    assert "rename the file to .tsv" in message


def test_csv_named_tsv_error_suggests_csv(tmp_path):
    path = tmp_path / "m.tsv"
    path.write_text("image,caption\na.jpg,hello\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"rename the file to \.csv"):
        read_manifest(path)


def test_missing_column_error(tmp_path):
    _write_table(tmp_path / "m.jsonl", [{"image": "a.jpg", "text": "hello"}])
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['caption'\]: found columns \['image', 'text'\]"):
        read_manifest(tmp_path / "m.jsonl")


@pytest.mark.parametrize(
    ("name", "content", "error", "match"),
    [
        ("m.txt", "image,caption\n", ValueError, "suffix '.txt'"),
        ("absent.csv", None, FileNotFoundError, "does not exist"),
        ("empty.csv", "", ValueError, "is empty"),
        ("header.csv", "image,caption\n", ValueError, "no data rows"),
        ("twice.csv", "image,caption,caption\na,b,c\n", ValueError, "repeats"),
        ("reserved.csv", "image,caption,row\na,b,1\n", ValueError, "mmono adds itself"),
        ("blank.jsonl", "\n\n", ValueError, "is empty"),
        ("broken.json", "[{", ValueError, "not valid JSON"),
    ],
)
def test_whole_file_errors(tmp_path, name, content, error, match):
    if content is not None:
        (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(error, match=match):
        read_manifest(tmp_path / name)


def test_manifest_path_that_is_a_folder(tmp_path):
    with pytest.raises(ValueError, match="read_labelled_images"):
        read_manifest(tmp_path)


def test_non_utf8_header_is_a_file_error(tmp_path):
    (tmp_path / "m.csv").write_bytes(b"image,capti\xf3n\na.jpg,x\n")
    with pytest.raises(ValueError, match="header line is not valid UTF-8"):
        read_manifest(tmp_path / "m.csv")


def test_row_level_problems_in_csv_and_jsonl(tmp_path):
    (tmp_path / "m.csv").write_bytes(b"image,caption,note\na.jpg,ok,x\nb.jpg\n\nc.jpg,fine,n\xffte\n,no image,\n")
    frame = read_manifest(tmp_path / "m.csv")
    assert frame["row"].tolist() == [0, 1, 2, 3]  # the blank line is not a row
    assert pd.isna(frame["skip"][0])
    assert frame["skip"][1] == "line 3 has 1 fields, the header has 3"
    assert frame["skip"][2] == "note is not valid UTF-8 (byte 0xff)"
    assert frame["note"][2] == "n\ufffdte"
    assert frame["caption"][2] == "fine"
    assert frame["skip"][3] == "image path is empty"

    lines = ['{"image": "a.jpg", "caption": "ok"}', "{not json", '{"image": "b.jpg"}',
             '{"image": "c.jpg", "caption": 7}', "[1, 2]", '{"image": null, "caption": "x"}']
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    skips = read_manifest(tmp_path / "m.jsonl")["skip"].tolist()
    assert pd.isna(skips[0])
    assert skips[1].startswith("line 2 is not valid JSON")
    assert skips[2] == "caption is missing"
    assert skips[3] == "caption is not a string (int)"
    assert skips[4] == "line 5 is a JSON list, not an object"
    assert skips[5] == "image path is missing"


# --------------------------------------------------------------------------- dataset, collate, loader


def _tensor_transform():
    return transforms.Compose([transforms.Resize((16, 16)), transforms.ToTensor()])


def _boom(image):
    raise RuntimeError("boom")


def test_dataset_from_frame_and_bad_arguments(tmp_path):
    write_rgb_jpeg(tmp_path / "a.jpg")
    frame = pd.DataFrame({"row": [0, 1], "image": [str(tmp_path / "a.jpg")] * 2, "caption": ["blue", " "]})
    dataset = PairDataset(frame)
    assert dataset[0]["skip"] is None
    assert dataset[1]["skip"] == "caption is empty"
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['row'\]"):
        PairDataset(frame.drop(columns="row"))
    with pytest.raises(TypeError, match="got list"):
        PairDataset([1, 2])
    with pytest.raises(TypeError, match="preprocess must be callable"):
        PairDataset(frame, preprocess="resize")


def test_preprocess_failure_is_a_skip(tmp_path):
    write_rgb_jpeg(tmp_path / "a.jpg")
    frame = pd.DataFrame({"row": [0], "image": [str(tmp_path / "a.jpg")], "caption": ["blue"]})
    item = PairDataset(frame, preprocess=_boom)[0]
    assert item["image"] is None
    assert item["skip"] == "preprocess failed (RuntimeError: boom)"


def test_collate_edge_cases(tmp_path):
    batch = collate_pairs([{"row": 3, "image": None, "caption": None, "path": "x", "skip": "file not found"}])
    assert batch.images is None
    assert batch.rows.shape == (0,)
    assert len(batch) == 0
    assert batch.skipped == [SkipRecord(3, "x", "file not found")]

    def item(row, image):
        return {"row": row, "image": image, "caption": "c", "path": "p", "skip": None}

    with pytest.raises(ValueError, match="fixed output size"):
        collate_pairs([item(0, torch.zeros(3, 4, 4)), item(1, torch.zeros(3, 5, 5))])
    pil = collate_pairs([item(0, Image.new("RGB", (2, 2)))])
    assert isinstance(pil.images, list) and pil.images[0].size == (2, 2)


def test_dataset_pickles(tmp_path):
    messy = build_messy_manifest(tmp_path)
    dataset = PairDataset(messy.path, preprocess=_tensor_transform())
    copy = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(copy[0]["image"], dataset[0]["image"])
    assert copy[3]["skip"] == dataset[3]["skip"]


def _run_loader(dataset, num_workers):
    loader = DataLoader(dataset, batch_size=3, num_workers=num_workers, collate_fn=collate_pairs)
    rows, images, captions, skipped, conversions = [], [], [], [], {}
    for batch in loader:
        rows += batch.rows.tolist()
        captions += batch.captions
        skipped += batch.skipped
        if batch.images is not None:
            images.append(batch.images)
        for mode, count in batch.conversions.items():
            conversions[mode] = conversions.get(mode, 0) + count
    return rows, torch.cat(images), captions, skipped, conversions


def test_dataloader_workers_give_the_same_items(tmp_path):
    messy = build_messy_manifest(tmp_path)
    dataset = PairDataset(messy.path, preprocess=_tensor_transform())
    serial = _run_loader(dataset, num_workers=0)
    parallel = _run_loader(dataset, num_workers=2)
    assert serial[0] == parallel[0] == messy.good_rows
    assert torch.equal(serial[1], parallel[1])
    assert serial[2:] == parallel[2:]
    assert sorted(record.row for record in parallel[3]) == sorted(messy.skipped)


# --------------------------------------------------------------------------- skip records


def test_skip_records_round_trip_sorted(tmp_path):
    records = [SkipRecord(5, "/d/b\u00e9.jpg", "file not found"), SkipRecord(1, "", "caption is empty"),
               SkipRecord(3, "/d/c.jpg", "image data is truncated")]
    path = write_skipped(tmp_path / "out" / "skipped.jsonl", records)
    assert [record.row for record in read_skipped(path)] == [1, 3, 5]
    assert read_skipped(path) == sorted(records, key=lambda record: record.row)
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert first == {"row": 1, "path": "", "reason": "caption is empty"}
    assert SkipRecord.from_dict(records[0].to_dict()) == records[0]
    assert not (tmp_path / "out" / "skipped.jsonl.partial").exists()


def test_skip_record_validation_and_bad_files(tmp_path):
    with pytest.raises(ValueError, match="non-negative int"):
        SkipRecord(-1, "x", "r")
    with pytest.raises(ValueError, match="non-empty"):
        SkipRecord(0, "x", "")
    with pytest.raises(FileNotFoundError):
        read_skipped(tmp_path / "none.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"row": 0, "path": "x", "reason": "r"}\n{"row": 1}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        read_skipped(tmp_path / "bad.jsonl")


# --------------------------------------------------------------------------- labelled images


def _touch(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_labelled_images_from_class_folders(tmp_path):
    for relative in ["tabby_cat/1.jpg", "tabby_cat/nested/2.PNG", "golden_retriever/3.jpg"]:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        write_rgb_jpeg(tmp_path / relative)
    _write(tmp_path / "tabby_cat" / "notes.txt", b"x")
    _write(tmp_path / "tabby_cat" / ".hidden.jpg", b"x")
    _write(tmp_path / "loose.jpg", b"x")
    (tmp_path / ".cache").mkdir()

    frame = read_labelled_images(tmp_path)
    assert list(frame.columns) == ["row", "image", "label", "skip"]
    assert frame["row"].tolist() == [0, 1, 2]
    assert frame["label"].tolist() == ["golden_retriever", "tabby_cat", "tabby_cat"]
    assert frame["image"].tolist() == [str(tmp_path / p) for p in
                                       ["golden_retriever/3.jpg", "tabby_cat/1.jpg", "tabby_cat/nested/2.PNG"]]
    spaced = read_labelled_images(tmp_path, underscores_to_spaces=True)
    assert spaced["label"].tolist() == ["golden retriever", "tabby cat", "tabby cat"]


def test_labelled_images_from_tables(tmp_path):
    records = [{"image": "a.jpg", "label": "tabby_cat", "split": "val"}, {"image": "b.jpg", "label": "", "split": "val"}]
    for suffix in (".csv", ".jsonl"):
        path = _write_table(tmp_path / f"labels{suffix}", records)
        frame = read_labelled_images(path, underscores_to_spaces=True)
        assert list(frame.columns) == ["row", "image", "label", "split", "skip"]
        assert frame["label"][0] == "tabby cat"
        assert frame["image"][0] == str(tmp_path / "a.jpg")
        assert frame["skip"][1] == "label is empty"
    _write_table(tmp_path / "wrong.csv", [{"image": "a.jpg", "caption": "x"}])
    with pytest.raises(ValueError, match=r"expected \['image', 'label'\]"):
        read_labelled_images(tmp_path / "wrong.csv")


def test_labelled_images_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_labelled_images(tmp_path / "absent")
    write_rgb_jpeg(tmp_path / "loose.jpg")
    with pytest.raises(ValueError, match="no class subfolders"):
        read_labelled_images(tmp_path)
    (tmp_path / "cat").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        read_labelled_images(tmp_path)


# --------------------------------------------------------------------------- demo assets


def test_demo_manifest_is_complete():
    frame = read_manifest(DEMO / "manifest.csv")
    assert frame["skip"].isna().all()
    assert {"row", "image", "caption", "subject", "skip"} <= set(frame.columns)
    counts = frame.groupby("image").size()
    assert len(counts) >= 20
    assert counts.between(2, 3).all(), counts[~counts.between(2, 3)]
    assert frame.groupby("image")["caption"].nunique().equals(counts)  # no repeated caption
    assert set(frame["subject"]) >= {"person", "animal", "object", "scene", "text", "texture"}
    readme = (DEMO / "README.md").read_text(encoding="utf-8")
    for image in counts.index:
        loaded = load_image(image)
        assert max(loaded.size) <= 512, (image, loaded.size)
        assert min(loaded.size) >= 64, (image, loaded.size)
        assert Path(image).name in readme
    listed = {path.name for path in DEMO.iterdir() if path.suffix in (".jpg", ".png")}
    assert listed == {Path(image).name for image in counts.index}
    assert sum(path.stat().st_size for path in DEMO.rglob("*") if path.is_file()) < 3_000_000
