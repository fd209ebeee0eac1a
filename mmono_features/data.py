"""Paired image-caption data: manifests, a dataset that never raises on bad items, skip records.

A manifest is a CSV, TSV or JSON-lines file with an ``image`` column (path relative to
the manifest's folder, or absolute) and a ``caption`` column; any other column is kept as
metadata. Problems of one row (bytes that are not UTF-8, an empty caption, a missing
file, a truncated JPEG, ...) never stop a run: the row is skipped, with the reason kept
as a :class:`SkipRecord`. Problems of the whole file (missing columns, a wrong
separator, an undecodable header) raise ``ValueError``.

Every frame returned here carries a ``skip`` column: missing (``pandas.isna``) for a
usable row, else the reason the row cannot be used. :class:`PairDataset` reports those rows as skipped items,
together with the images that fail to load.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from mmono_features.images import (
    DEFAULT_MAX_PIXELS,
    ImageLoadError,
    _check_max_pixels,
    _load_image,
    load_image,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_SUFFIXES",
    "ImageLoadError",
    "PairBatch",
    "PairDataset",
    "SkipRecord",
    "collate_pairs",
    "load_image",
    "read_labelled_images",
    "read_manifest",
    "read_skipped",
    "write_skipped",
]

#: File name endings taken as images when scanning class folders (compared in lower case).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

_SEPARATORS = {".csv": ",", ".tsv": "\t"}
_JSON_SUFFIXES = (".jsonl", ".json")
# Columns that read_manifest adds itself; a manifest may not define them.
_RESERVED = ("row", "skip")
# Lone surrogates are where "surrogateescape" decoding kept bytes that are not UTF-8.
_UNDECODABLE = re.compile("[\udc80-\udcff]")


# --------------------------------------------------------------------------- tables


@dataclass
class _Table:
    """Rows of a CSV/TSV/JSONL file before validation: one dict and one problem per row."""

    columns: list[str]
    records: list[dict[str, Any]]
    problems: list[str | None]


def _check_table_path(path: str | os.PathLike, argument: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{argument} {str(path)!r} does not exist")
    if path.is_dir():
        raise ValueError(
            f"{argument} {str(path)!r} is a folder; pass a .csv, .tsv or .jsonl file "
            "(image folders with class subfolders go to read_labelled_images)"
        )
    suffix = path.suffix.lower()
    if suffix not in _SEPARATORS and suffix not in _JSON_SUFFIXES:
        raise ValueError(
            f"{argument} {str(path)!r} has suffix {suffix!r}; supported suffixes are "
            ".csv, .tsv, .jsonl and .json (JSON lines); rename the file to match its format"
        )
    return path


def _read_text(path: Path) -> str:
    # surrogateescape keeps every undecodable byte as a lone surrogate, so that one bad
    # row can be skipped later instead of losing the whole file.
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    return text.removeprefix("\ufeff")


def _read_delimited(path: Path, text: str, separator: str) -> _Table:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=separator)
    header: list[str] | None = None
    records: list[dict[str, Any]] = []
    problems: list[str | None] = []
    try:
        for fields in reader:
            if not fields:
                continue  # a blank line is not a data row
            if header is None:
                header = [name.strip() for name in fields]
                if any(_UNDECODABLE.search(name) for name in header):
                    raise ValueError(f"manifest {str(path)!r}: the header line is not valid UTF-8")
                continue
            record = dict(zip(header, fields))
            problem = None
            if len(fields) != len(header):
                problem = f"line {reader.line_num} has {len(fields)} fields, the header has {len(header)}"
                record.update({name: None for name in header[len(fields):]})
            records.append(record)
            problems.append(problem)
    except csv.Error as error:
        raise ValueError(f"manifest {str(path)!r}: CSV syntax error near line {reader.line_num}: {error}") from error
    if header is None:
        raise ValueError(f"manifest {str(path)!r} is empty; expected a header line and data rows")
    return _Table(header, records, problems)


def _read_json_lines(path: Path, text: str) -> _Table:
    records: list[dict[str, Any]] = []
    problems: list[str | None] = []
    if text.lstrip().startswith("["):  # a .json file holding one array of objects
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"manifest {str(path)!r} is not valid JSON: {error}") from error
        entries = [(index + 1, item, None) for index, item in enumerate(items)]
        where = "item"
    else:
        entries = []
        # split on "\n" only: str.splitlines would also split inside strings at U+2028.
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                entries.append((number, json.loads(line), None))
            except json.JSONDecodeError as error:
                entries.append((number, {}, f"line {number} is not valid JSON ({error.msg})"))
        where = "line"
    columns: dict[str, None] = {}
    for number, item, problem in entries:
        if problem is None and not isinstance(item, dict):
            item, problem = {}, f"{where} {number} is a JSON {type(item).__name__}, not an object"
        columns.update(dict.fromkeys(item))
        records.append(item)
        problems.append(problem)
    if not entries:
        raise ValueError(f"manifest {str(path)!r} is empty; expected one JSON object per line")
    return _Table(list(columns), records, problems)


def _read_table(path: Path, required: Sequence[str]) -> _Table:
    text = _read_text(path)
    suffix = path.suffix.lower()
    if suffix in _SEPARATORS:
        table = _read_delimited(path, text, _SEPARATORS[suffix])
    else:
        table = _read_json_lines(path, text)

    duplicated = sorted(name for name, n in Counter(table.columns).items() if n > 1)
    if duplicated:
        raise ValueError(f"manifest {str(path)!r} repeats the column(s) {duplicated}; give each column one name")
    missing = [name for name in required if name not in table.columns]
    if missing:
        hint = ""
        if suffix in _SEPARATORS and len(table.columns) == 1:
            other = {".csv": ("\t", "tab", ".tsv"), ".tsv": (",", "comma", ".csv")}[suffix]
            if other[0] in table.columns[0]:
                hint = (
                    f"; the header looks {other[1]}-separated, but {suffix!r} files are read as "
                    f"{'comma' if suffix == '.csv' else 'tab'}-separated: rename the file to {other[2]}"
                )
        raise ValueError(
            f"manifest {str(path)!r} lacks the column(s) {missing}: found columns "
            f"{table.columns}, expected {list(required)} (other columns are kept as metadata){hint}"
        )
    clashing = [name for name in _RESERVED if name in table.columns]
    if clashing:
        raise ValueError(
            f"manifest {str(path)!r} has the column(s) {clashing}, which mmono adds itself; rename them"
        )
    if not table.records:
        raise ValueError(f"manifest {str(path)!r} has a header but no data rows")
    return table


def _repair(value: str) -> str:
    """Replace the escaped undecodable bytes of ``value`` by U+FFFD, for display."""
    return value.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")


def _frame_from_table(path: Path, table: _Table, text_column: str) -> pd.DataFrame:
    """Validate rows, resolve image paths and record one reason per unusable row."""
    folder = path.resolve().parent
    metadata = [name for name in table.columns if name not in ("image", text_column)]
    rows: list[dict[str, Any]] = []
    for index, (record, problem) in enumerate(zip(table.records, table.problems)):
        reasons = [problem] if problem else []
        values: dict[str, Any] = {}
        for name in table.columns:
            value = record.get(name)
            bad = _UNDECODABLE.search(value) if isinstance(value, str) else None
            if bad is not None:
                # surrogateescape stores byte b as U+DC00 + b
                reasons.append(f"{name} is not valid UTF-8 (byte 0x{ord(bad.group()) - 0xDC00:02x})")
                value = None if name == text_column else _repair(value)
            values[name] = value

        image = values["image"]
        if image is None:
            reasons.append("image path is missing")
            image = ""
        elif not isinstance(image, str):
            reasons.append(f"image path is not a string ({type(image).__name__})")
            image = ""
        elif not image.strip():
            reasons.append("image path is empty")
            image = ""
        else:
            image = os.path.normpath(os.path.join(folder, image))

        text = values[text_column]
        if isinstance(text, str):
            if not text.strip():
                reasons.append(f"{text_column} is empty")
        elif text is not None:
            reasons.append(f"{text_column} is not a string ({type(text).__name__})")
            text = None
        elif not any(reason.startswith(text_column) for reason in reasons):
            reasons.append(f"{text_column} is missing")

        rows.append(
            {"row": index, "image": image, text_column: text}
            | {name: values[name] for name in metadata}
            | {"skip": reasons[0] if reasons else None}
        )
    frame = pd.DataFrame(rows, columns=["row", "image", text_column, *metadata, "skip"])
    frame["row"] = frame["row"].astype("int64")
    n_skipped = int(frame["skip"].notna().sum())
    if n_skipped:
        logger.warning("%s: %d of %d rows cannot be used (see the 'skip' column)", path, n_skipped, len(frame))
    return frame


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """Read a manifest of image-caption pairs.

    The format follows the suffix: ``.csv`` (comma), ``.tsv`` (tab), ``.jsonl`` or
    ``.json`` (one JSON object per line, or one JSON array of objects). Text is UTF-8,
    with or without a byte-order mark. Blank lines are not rows. CSV/TSV values stay
    strings (no type guessing); JSON values keep their JSON types.

    A row that cannot be used is kept with a reason in ``skip`` instead of failing the
    file. Reasons: bytes that are not UTF-8 (``"caption is not valid UTF-8 (byte 0xe9)"``),
    an empty or missing caption or image path, a wrong number of fields, a JSON line that
    does not parse. A caption with invalid bytes becomes missing, and other columns get
    U+FFFD in place of the bad bytes.

    Parameters
    ----------
    path : str or os.PathLike
        Manifest file; relative image paths are taken from its folder.

    Returns
    -------
    pandas.DataFrame
        One row per data row, in file order, with columns ``row`` (int64, 0-based index
        of the data row), ``image`` (absolute path str, ``""`` if missing), ``caption``
        (str; missing where it cannot be used), the metadata columns in file order, then
        ``skip`` (the reason the row is unusable; missing for a usable row). Missing
        values are pandas NA: test them with ``pandas.isna``.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        For an unsupported suffix, a folder, an empty file, a header that is not UTF-8,
        repeated column names, a missing ``image`` or ``caption`` column (the message
        lists the columns found and suggests the right suffix when the separator looks
        wrong), or a column named ``row`` or ``skip``.
    """
    path = _check_table_path(path, "manifest")
    table = _read_table(path, ("image", "caption"))
    return _frame_from_table(path, table, "caption")


def _as_manifest_frame(manifest: pd.DataFrame | str | os.PathLike) -> pd.DataFrame:
    if isinstance(manifest, (str, os.PathLike)):
        return read_manifest(manifest)
    if not isinstance(manifest, pd.DataFrame):
        raise TypeError(
            f"manifest must be a path or a pandas.DataFrame from read_manifest, got {type(manifest).__name__}"
        )
    missing = [name for name in ("row", "image", "caption") if name not in manifest.columns]
    if missing:
        raise ValueError(
            f"manifest frame lacks the column(s) {missing} (found {list(manifest.columns)}); "
            "build it with read_manifest"
        )
    frame = manifest.reset_index(drop=True).copy()
    frame["skip"] = frame["skip"].astype(object) if "skip" in frame.columns else None
    for index, caption in enumerate(frame["caption"]):
        if not isinstance(frame.at[index, "skip"], str) and (not isinstance(caption, str) or not caption.strip()):
            frame.at[index, "skip"] = "caption is empty" if isinstance(caption, str) else "caption is missing"
    return frame


# --------------------------------------------------------------------------- skips


@dataclass(frozen=True)
class SkipRecord:
    """One item left out of a run, with the reason.

    Parameters
    ----------
    row : int
        0-based data-row id in the manifest.
    path : str
        Image path of the row (``""`` when the row had none).
    reason : str
        Why the item was left out, e.g. ``"image data is truncated"``.
    """

    row: int
    path: str
    reason: str

    def __post_init__(self) -> None:
        if isinstance(self.row, bool) or not isinstance(self.row, int) or self.row < 0:
            raise ValueError(f"SkipRecord.row must be a non-negative int, got {self.row!r}")
        if not isinstance(self.path, str) or not isinstance(self.reason, str) or not self.reason:
            raise ValueError(
                f"SkipRecord.path must be a str and reason a non-empty str, got {self.path!r}, {self.reason!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Return ``{"row", "path", "reason"}``, ready for ``json.dumps``."""
        return {"row": self.row, "path": self.path, "reason": self.reason}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SkipRecord:
        """Build a record from :meth:`to_dict` output."""
        return cls(row=int(data["row"]), path=str(data["path"]), reason=str(data["reason"]))


def write_skipped(path: str | os.PathLike, records: Iterable[SkipRecord]) -> Path:
    """Write skip records as JSON lines, sorted by row, replacing the file in one step.

    Parameters
    ----------
    path : str or os.PathLike
        Output file, usually ``skipped.jsonl``; parent folders are created.
    records : iterable of SkipRecord

    Returns
    -------
    pathlib.Path
        The written file.
    """
    path = Path(path)
    ordered = sorted(records, key=lambda record: (record.row, record.path, record.reason))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", encoding="utf-8") as handle:
        for record in ordered:
            handle.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")
    os.replace(partial, path)
    return path


def read_skipped(path: str | os.PathLike) -> list[SkipRecord]:
    """Read a file written by :func:`write_skipped`.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If a line is not a JSON object with ``row``, ``path`` and ``reason``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"skip list {str(path)!r} does not exist")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(SkipRecord.from_dict(json.loads(line)))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"skip list {str(path)!r} line {number} is not a JSON object with row, path, reason: {error}"
            ) from error
    return records


# --------------------------------------------------------------------------- dataset


class PairDataset(Dataset):
    """Image-caption pairs of a manifest; bad items come back marked, never raised.

    Parameters
    ----------
    manifest : str, os.PathLike or pandas.DataFrame
        A manifest file or the frame :func:`read_manifest` returns.
    preprocess : callable, optional
        Applied to each RGB ``PIL.Image``, e.g. ``Backbone.preprocess`` (giving a
        ``(3, H, W)`` tensor). ``None`` returns the PIL image.
    max_pixels : int or None, default 89_478_485
        Decompression-bomb limit passed to :func:`load_image`.

    Notes
    -----
    Item ``i`` is a dict with ``row`` (int), ``image`` (tensor, PIL image or None),
    ``caption`` (str or None), ``path`` (str), ``skip`` (None or the reason) and
    ``converted_from`` (the source image mode when it was not RGB, else None). A skipped
    item has ``image`` and ``caption`` None. Reasons come from the manifest (see
    :func:`read_manifest`), from :func:`load_image`, or from ``preprocess`` raising.
    The dataset holds plain lists, so it pickles into DataLoader worker processes.
    """

    def __init__(
        self,
        manifest: pd.DataFrame | str | os.PathLike,
        preprocess: Callable[[Image.Image], Any] | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        _check_max_pixels(max_pixels)
        if preprocess is not None and not callable(preprocess):
            raise TypeError(f"preprocess must be callable or None, got {type(preprocess).__name__}")
        self.manifest = _as_manifest_frame(manifest)
        self.preprocess = preprocess
        self.max_pixels = max_pixels
        self._rows = [int(row) for row in self.manifest["row"]]
        self._paths = [str(image) if isinstance(image, str) else "" for image in self.manifest["image"]]
        self._captions = list(self.manifest["caption"])
        self._skips = [skip if isinstance(skip, str) else None for skip in self.manifest["skip"]]

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row, path = self._rows[index], self._paths[index]
        if self._skips[index] is not None:
            return _skipped_item(row, path, self._skips[index])
        try:
            image, source_mode = _load_image(path, self.max_pixels)
        except ImageLoadError as error:
            return _skipped_item(row, path, error.reason)
        if self.preprocess is not None:
            try:
                image = self.preprocess(image)
            except Exception as error:  # a user transform failed on one item, so skip that item
                logger.debug("preprocess failed on %s", path, exc_info=True)
                return _skipped_item(row, path, f"preprocess failed ({type(error).__name__}: {error})")
        return {
            "row": row,
            "image": image,
            "caption": self._captions[index],
            "path": path,
            "skip": None,
            "converted_from": source_mode,
        }


def _skipped_item(row: int, path: str, reason: str) -> dict[str, Any]:
    return {"row": row, "image": None, "caption": None, "path": path, "skip": reason, "converted_from": None}


@dataclass(frozen=True)
class PairBatch:
    """The usable items of one batch, and the skipped ones.

    Attributes
    ----------
    rows : torch.LongTensor
        ``(b,)`` manifest row ids of the kept items.
    images : torch.Tensor, list of PIL.Image.Image, or None
        ``(b, 3, H, W)`` stacked preprocessed images. A list of PIL images when the
        dataset had no ``preprocess``, and None when every item was skipped (``b == 0``).
    captions : list of str
        ``b`` captions, aligned with ``rows``.
    skipped : list of SkipRecord
        The items left out of this batch.
    conversions : dict of str to int
        Source image mode to the number of kept images converted from it; summed over
        batches it gives the run's count across worker processes.
    """

    rows: torch.Tensor
    images: torch.Tensor | list[Image.Image] | None
    captions: list[str]
    skipped: list[SkipRecord]
    conversions: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.captions)


def collate_pairs(items: Sequence[dict[str, Any]]) -> PairBatch:
    """Collate :class:`PairDataset` items into a :class:`PairBatch` (DataLoader ``collate_fn``).

    Raises
    ------
    ValueError
        If the kept images are tensors of different shapes (give the dataset a
        ``preprocess`` with a fixed output size) or mix tensors and PIL images.
    """
    kept = [item for item in items if item["skip"] is None]
    skipped = [SkipRecord(item["row"], item["path"], item["skip"]) for item in items if item["skip"] is not None]
    rows = torch.tensor([item["row"] for item in kept], dtype=torch.long)
    images: torch.Tensor | list[Image.Image] | None = None
    if kept:
        pixels = [item["image"] for item in kept]
        if all(isinstance(image, torch.Tensor) for image in pixels):
            shapes = sorted({tuple(image.shape) for image in pixels})
            if len(shapes) > 1:
                raise ValueError(
                    f"cannot stack images of shapes {shapes}; give PairDataset a preprocess "
                    "with a fixed output size (e.g. the backbone's preprocess)"
                )
            images = torch.stack(pixels)
        elif all(isinstance(image, Image.Image) for image in pixels):
            images = pixels
        else:
            kinds = sorted({type(image).__name__ for image in pixels})
            raise ValueError(f"cannot collate images of types {kinds}; preprocess must return tensors")
    conversions = Counter(item["converted_from"] for item in kept if item.get("converted_from"))
    return PairBatch(
        rows=rows,
        images=images,
        captions=[item["caption"] for item in kept],
        skipped=skipped,
        conversions=dict(conversions),
    )


# --------------------------------------------------------------------------- labelled images


def _scan_class_folders(root: Path, underscores_to_spaces: bool) -> pd.DataFrame:
    classes = sorted(entry for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise ValueError(
            f"image folder {str(root)!r} has no class subfolders; expected {str(root)}/<label>/<image>"
        )
    loose = [entry.name for entry in root.iterdir() if entry.is_file() and not entry.name.startswith(".")]
    if loose:
        logger.warning("%s: ignoring %d file(s) outside the class subfolders", root, len(loose))
    rows: list[dict[str, Any]] = []
    ignored = 0
    for folder in classes:
        label = folder.name.replace("_", " ") if underscores_to_spaces else folder.name
        for current, subfolders, files in os.walk(folder):
            subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
            for name in sorted(files):
                if name.startswith("."):
                    continue
                if not name.lower().endswith(IMAGE_SUFFIXES):
                    ignored += 1
                    continue
                image = os.path.abspath(os.path.join(current, name))
                rows.append({"row": len(rows), "image": image, "label": label, "skip": None})
    if ignored:
        logger.info("%s: ignored %d file(s) whose suffix is not one of %s", root, ignored, IMAGE_SUFFIXES)
    if not rows:
        raise ValueError(
            f"image folder {str(root)!r} has class subfolders {[c.name for c in classes]} but no image "
            f"files in them (suffixes {IMAGE_SUFFIXES})"
        )
    return pd.DataFrame(rows, columns=["row", "image", "label", "skip"])


def read_labelled_images(path: str | os.PathLike, underscores_to_spaces: bool = False) -> pd.DataFrame:
    """Read a labelled image set: a folder of class subfolders, or a table of image,label.

    Parameters
    ----------
    path : str or os.PathLike
        Either a folder laid out as ``path/<label>/<image>``, or a ``.csv``, ``.tsv`` or
        ``.jsonl`` file with columns ``image`` and ``label``, read like
        :func:`read_manifest` (other columns are kept as metadata). In a folder, images
        in nested folders of a class folder belong to that class, and hidden files and
        other suffixes are ignored.
    underscores_to_spaces : bool, default False
        Replace ``_`` by a space in every label (``"golden_retriever"`` ->
        ``"golden retriever"``), as zero-shot prompts need words.

    Returns
    -------
    pandas.DataFrame
        Columns ``row`` (int64), ``image`` (absolute path str), ``label`` (str),
        metadata columns (tables only), ``skip`` (the reason the row is unusable;
        missing, as pandas NA, for a usable row). Folders are listed in sorted order of label, then path.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        For a folder without class subfolders or images, or a table as in
        :func:`read_manifest` (with ``label`` in place of ``caption``).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"labelled images {str(path)!r} do not exist")
    if path.is_dir():
        return _scan_class_folders(path, underscores_to_spaces)
    path = _check_table_path(path, "labelled image table")
    frame = _frame_from_table(path, _read_table(path, ("image", "label")), "label")
    if underscores_to_spaces:
        frame["label"] = [label.replace("_", " ") if isinstance(label, str) else label for label in frame["label"]]
    return frame
