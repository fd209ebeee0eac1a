"""Reading an audit table: image paths, a sensitive attribute and optional labels.

Three layouts are read:

- ``plain``: a CSV, TSV or JSONL file with an ``image`` column (path relative to the
  file, or to ``image_root``), the sensitive column (``gender`` by default) and any
  label columns;
- ``celeba``: CelebA's ``list_attr_celeba.txt`` (a count line, a line of 40 attribute
  names, then ``<file> <+1/-1 x 40>`` rows) or its CSV export with an ``image_id``
  column. ``Male`` (+1/-1) becomes ``gender`` (male/female) and ``Young`` becomes ``age``
  (young/old); every other attribute becomes a ``yes``/``no`` column;
- ``fairface``: FairFace's ``fairface_label_train.csv`` / ``..._val.csv`` with columns
  ``file, age, gender, race`` (``service_test`` is kept as metadata).

Sensitive values are trimmed and lower-cased; gender spellings such as ``M``, ``man``
and ``Female`` are mapped to ``male`` / ``female``. A missing value, or one of
:data:`UNKNOWN_VALUES`, is unknown: with ``unknown="keep"`` the row joins the explicit
group ``unknown``; with ``unknown="reject"`` the table is refused with the column name
and the count.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from apps.bias_audit.metrics import UNKNOWN_GROUP

logger = logging.getLogger(__name__)

__all__ = ["LAYOUTS", "UNKNOWN_VALUES", "AuditTable", "normalize_group", "read_audit_table"]

LAYOUTS = ("plain", "celeba", "fairface")
"""Table layouts understood by :func:`read_audit_table`."""

UNKNOWN_VALUES = frozenset({"", "unknown", "na", "n/a", "nan", "none", "null", "?", "-"})
"""Values (after trimming and lower-casing) that count as a missing sensitive value."""

_GENDER_ALIASES = {
    "m": "male", "man": "male", "men": "male", "male": "male", "boy": "male",
    "f": "female", "w": "female", "woman": "female", "women": "female", "female": "female", "girl": "female",
}
_CELEBA_RENAMES = {"Male": ("gender", "male", "female"), "Young": ("age", "young", "old")}


@dataclass
class AuditTable:
    """An audit table after validation.

    Attributes
    ----------
    frame : pandas.DataFrame
        One row per input row: ``row`` (0-based data-row id in the file), ``image``
        (absolute path), ``group`` (normalised sensitive value or ``unknown``), and the
        other columns of the file as strings (labels, metadata).
    sensitive : str
        Name of the sensitive column.
    source : str
        Path of the file read.
    layout : str
        One of :data:`LAYOUTS`.
    group_counts : dict of str to int
        Rows per group; the counts add up to ``len(frame)``.
    n_unknown : int
        Rows in the ``unknown`` group.
    raw_unknown_values : dict of str to int
        The original spellings that were taken as unknown, with their counts.
    """

    frame: pd.DataFrame
    sensitive: str
    source: str
    layout: str
    group_counts: dict[str, int] = field(default_factory=dict)
    n_unknown: int = 0
    raw_unknown_values: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.frame)


def normalize_group(value: object, column: str) -> str | None:
    """Return the normalised group of one sensitive value, or None when it is unknown.

    Parameters
    ----------
    value : object
        A cell of the sensitive column (str, number, NaN or None).
    column : str
        Column name; ``gender`` values go through the alias table (``M`` -> ``male``).
    """
    if value is None or (isinstance(value, float) and value != value):
        return None
    text = str(value).strip().lower()
    if text in UNKNOWN_VALUES:
        return None
    if column == "gender":
        return _GENDER_ALIASES.get(text, text)
    return text


def _read_frame(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        try:
            frame = pd.read_json(path, lines=True, dtype=False)
        except ValueError as error:
            raise ValueError(f"{path} is not valid JSON lines (one object per line): {error}") from error
        return frame.astype(object).where(frame.notna(), None)
    if suffix in (".csv", ".tsv", ".txt"):
        sep = "\t" if suffix == ".tsv" else ","
        frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, skipinitialspace=True)
        return frame.astype(object)
    raise ValueError(f"unsupported audit table {path}: use a .csv, .tsv or .jsonl file (layout 'plain').")


def _read_celeba(path: Path) -> pd.DataFrame:
    if path.suffix.lower() == ".csv":
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        if "image_id" not in frame.columns:
            raise ValueError(f"{path}: a CelebA CSV needs an 'image_id' column; found {list(frame.columns)[:5]}...")
        frame = frame.rename(columns={"image_id": "image"})
    else:
        lines = path.read_text(encoding="utf-8").splitlines()
        if len(lines) < 2:
            raise ValueError(f"{path}: list_attr_celeba.txt needs a count line and an attribute-name line.")
        names = lines[1].split()
        rows = []
        for number, line in enumerate(lines[2:], start=3):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != len(names) + 1:
                raise ValueError(
                    f"{path} line {number}: expected a file name and {len(names)} values; got {len(parts)} fields."
                )
            rows.append(parts)
        frame = pd.DataFrame(rows, columns=["image", *names])
    out = pd.DataFrame({"image": frame["image"]})
    for column in frame.columns:
        if column == "image":
            continue
        values = frame[column].astype(str).str.strip()
        positive, negative = ("yes", "no")
        name = column
        if column in _CELEBA_RENAMES:
            name, positive, negative = _CELEBA_RENAMES[column]
        out[name] = values.map({"1": positive, "-1": negative}).astype(object)
        out[name] = out[name].where(out[name].notna(), None)
    return out.astype(object)


def _read_fairface(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in ("file", "age", "gender", "race") if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{path}: a FairFace label file needs the columns file, age, gender, race; missing {missing}."
        )
    return frame.rename(columns={"file": "image"}).astype(object)


def read_audit_table(
    path: str | os.PathLike,
    sensitive: str = "gender",
    layout: str = "plain",
    unknown: str = "keep",
    image_root: str | os.PathLike | None = None,
) -> AuditTable:
    """Read and validate an audit table.

    Parameters
    ----------
    path : str or os.PathLike
        The table file (see the module docstring for the layouts).
    sensitive : str
        Name of the sensitive column (after the layout's renames: ``gender``, ``age``,
        ``race``, ...).
    layout : {"plain", "celeba", "fairface"}
        File layout.
    unknown : {"keep", "reject"}
        What to do with rows whose sensitive value is missing or unknown.
    image_root : str or os.PathLike, optional
        Folder the image paths are relative to; by default the table's folder.

    Returns
    -------
    AuditTable

    Raises
    ------
    FileNotFoundError
        If the table or ``image_root`` does not exist.
    ValueError
        On an unknown layout, a missing column, or unknown values with ``unknown="reject"``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audit table {path} not found; pass a CSV/TSV/JSONL file with an image column.")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}.")
    if unknown not in ("keep", "reject"):
        raise ValueError(f"unknown must be 'keep' or 'reject'; got {unknown!r}.")
    root = Path(image_root) if image_root is not None else path.parent
    if not root.is_dir():
        raise FileNotFoundError(f"image_root {root} is not a folder; pass the folder the image paths are relative to.")

    if layout == "celeba":
        frame = _read_celeba(path)
    elif layout == "fairface":
        frame = _read_fairface(path)
    else:
        frame = _read_frame(path)
    if "image" not in frame.columns:
        raise ValueError(
            f"{path} has no 'image' column (columns: {list(frame.columns)}); "
            "add one with image paths relative to the file, or pick --layout celeba/fairface."
        )
    if sensitive not in frame.columns:
        raise ValueError(
            f"sensitive column {sensitive!r} not found in {path}; columns are {list(frame.columns)}. "
            "Pass --sensitive with one of them."
        )
    if "group" in frame.columns or "row" in frame.columns:
        raise ValueError(f"{path} defines a 'group' or 'row' column; rename it, the audit adds these itself.")

    frame = frame.reset_index(drop=True)
    raw = frame[sensitive].tolist()
    groups = [normalize_group(value, sensitive) for value in raw]
    unknown_raw = Counter("" if v is None else str(v) for v, g in zip(raw, groups) if g is None)
    n_unknown = sum(unknown_raw.values())
    if n_unknown and unknown == "reject":
        examples_text = ", ".join(f"{value!r} x{count}" for value, count in unknown_raw.most_common(5))
        raise ValueError(
            f"column {sensitive!r} has {n_unknown} of {len(frame)} rows with a missing or unknown value ({examples_text}); "
            "fix them or pass --unknown keep to audit them as the group 'unknown'."
        )
    if n_unknown:
        logger.warning(
            "column %r: %d of %d rows have a missing or unknown value; they form the group %r.",
            sensitive, n_unknown, len(frame), UNKNOWN_GROUP,
        )
    frame.insert(0, "row", range(len(frame)))
    frame["image"] = [str((root / str(p)).resolve()) if p else "" for p in frame["image"]]
    frame["group"] = [UNKNOWN_GROUP if g is None else g for g in groups]
    counts = dict(sorted(Counter(frame["group"]).items()))
    if sum(counts.values()) != len(frame):  # guards the documented invariant
        raise RuntimeError("group counts do not add up to the number of rows.")
    return AuditTable(
        frame=frame,
        sensitive=sensitive,
        source=str(path),
        layout=layout,
        group_counts=counts,
        n_unknown=n_unknown,
        raw_unknown_values=dict(unknown_raw),
    )


def label_values(table: AuditTable, column: str) -> list[str | None]:
    """Return the labels of ``column`` (trimmed, lower-cased; unknown spellings -> None).

    Gender spellings are mapped as for the sensitive column, so a gender task can use
    ``gender`` as its truth whichever attribute is audited.
    """
    if column not in table.frame.columns:
        raise ValueError(
            f"label column {column!r} not found in {table.source}; columns are {list(table.frame.columns)}."
        )
    return [normalize_group(value, column) for value in table.frame[column].tolist()]
