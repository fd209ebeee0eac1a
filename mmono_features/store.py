"""On-disk feature store: raw image and text embeddings of paired data, sharded.

A store is a folder::

    manifest.json               written last: its presence marks a finished store
    images-00000.safetensors    tensor "embeddings" (n, d), tensor "rows" (n,) int64
    texts-00000.safetensors     same layout; pair i of images-k and texts-k is one pair
    ...
    pairs.jsonl                 one JSON object per kept pair, in store order: "row",
                                "image", "caption" and the source manifest's metadata
                                columns, so the store does not need the source manifest
    skipped.jsonl               one {"row", "path", "reason"} object per item that failed
                                to load, sorted by row

``manifest.json`` records the format version, the backbone identity (name, pretrained
tag, checkpoint hash), the preprocessing (image size, mean, std, the transform), the
dtype, the count, ``d``, the shard list (per-shard count, source row range and store
row range), the source manifest path and its SHA-256, and a summary of the source row
ids. The per-pair source row ids themselves are the ``rows`` tensors of the shards.

Embeddings are stored raw, as the backbone returns them. Readers normalise on the fly
(L2 per row, then times sqrt(d), see :func:`mmono_features.embeddings.normalize_embeddings`)
unless asked for raw values.

Shard ``k`` holds the usable pairs among source manifest rows
``[k * shard_size, (k + 1) * shard_size)``. Each shard file is written to a hidden
temporary name in the store folder and renamed into place, so a file with a shard's name
is always complete. A shard's safetensors metadata holds its skip records and a
fingerprint of the run (backbone, preprocessing, d, dtype, shard size, source hash),
which lets an interrupted extraction resume exactly and reject a mismatched resume.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save

from mmono_features.embeddings import MODALITIES, check_modality, normalize_embeddings

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MODALITY_CODES",
    "FeatureStore",
    "StoreMismatchError",
    "StoreWriter",
    "shard_filename",
]

FORMAT_NAME = "mmono-feature-store"
FORMAT_VERSION = 1
#: Code of each modality in the ``modality`` tensors that :meth:`FeatureStore.iter_batches` yields.
MODALITY_CODES = {"image": 0, "text": 1}
DTYPES = {"float32": torch.float32, "float16": torch.float16}
NORMALIZATION_NOTE = (
    "embeddings are stored raw; readers apply L2 normalisation of each row, then multiply by sqrt(d)"
)

MANIFEST_FILE = "manifest.json"
PAIRS_FILE = "pairs.jsonl"
SKIPPED_FILE = "skipped.jsonl"
_SHARD_PREFIX = {"image": "images", "text": "texts"}
_SHARD_PATTERN = re.compile(r"^(images|texts)-(\d{5,})\.safetensors$")
# Temporary files are hidden and carry the writer's process id, so that processes
# writing different shards never collide and a leftover one is never read as a shard.
# data.write_skipped writes skipped.jsonl through "skipped.jsonl.partial".
_TEMPORARY_PATTERN = re.compile(r"^(\.(images|texts|pairs|skipped|manifest)[-.].*\.\d+\.tmp|skipped\.jsonl\.partial)$")
_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16"}


def shard_filename(modality: str, index: int) -> str:
    """Return the file name of shard ``index`` of ``modality``, e.g. ``images-00003.safetensors``."""
    return f"{_SHARD_PREFIX[check_modality(modality)]}-{index:05d}.safetensors"


class StoreMismatchError(ValueError):
    """An existing store (or its shards) was written by a different backbone, source or setting."""


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _skip_dict(record: Any) -> dict[str, Any]:
    """Turn a SkipRecord or a mapping with row, path and reason into a plain dict."""
    if hasattr(record, "to_dict"):
        record = record.to_dict()
    if not isinstance(record, Mapping) or not {"row", "path", "reason"} <= set(record):
        raise ValueError(f"a skip record must be a SkipRecord or a mapping with row, path and reason; got {record!r}.")
    return {"row": int(record["row"]), "path": str(record["path"]), "reason": str(record["reason"])}


def _json_dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


# --------------------------------------------------------------------------- writing


class StoreWriter:
    """Write a feature store shard by shard, resumably, from one or several processes.

    Parameters
    ----------
    out_dir : path
        Store folder; created if missing.
    identity : dict
        Backbone identity, :meth:`mmono_features.backbone.Backbone.identity`.
    preprocessing : dict
        Image preprocessing: ``image_size``, ``mean``, ``std``, ``transform`` (its repr).
    d : int
        Embedding width; every shard must have ``d`` columns.
    shard_size : int
        Source manifest rows per shard.
    dtype : {"float32", "float16"}
        Storage dtype of the embeddings.
    source : dict, optional
        The source manifest: ``path``, ``sha256``, ``n_rows`` (its number of data rows).
        With ``n_rows`` given, shard row ranges are checked and the number of shards is known.

    Notes
    -----
    Several processes may share one writer folder as long as each shard index is written
    by one process; :meth:`finalize` runs once, in one process, after all have finished.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        identity: Mapping[str, Any],
        preprocessing: Mapping[str, Any],
        d: int,
        shard_size: int,
        dtype: str = "float32",
        source: Mapping[str, Any] | None = None,
    ) -> None:
        if isinstance(d, bool) or not isinstance(d, int) or d <= 0:
            raise ValueError(f"d must be a positive int; got {d!r}.")
        if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size <= 0:
            raise ValueError(f"shard_size must be a positive int; got {shard_size!r}.")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}; got {dtype!r}.")
        source = dict(source or {})
        n_rows = source.get("n_rows")
        if n_rows is not None and (isinstance(n_rows, bool) or not isinstance(n_rows, int) or n_rows < 0):
            raise ValueError(f"source['n_rows'] must be a non-negative int or None; got {n_rows!r}.")
        self.out_dir = Path(out_dir)
        # A JSON round trip makes tuples lists, so that settings compare equal to the
        # ones read back from shard metadata and manifest.json.
        self.identity = json.loads(json.dumps(dict(identity)))
        self.preprocessing = json.loads(json.dumps(dict(preprocessing)))
        self.d = d
        self.shard_size = shard_size
        self.dtype = dtype
        described = {"path": source.get("path"), "sha256": source.get("sha256"), "n_rows": n_rows}
        described.update((key, value) for key, value in source.items() if key not in described)
        self.source = json.loads(json.dumps(described))
        self.out_dir.mkdir(parents=True, exist_ok=True)

    # The fields whose equality decides whether an existing shard can be reused. The
    # source path is left out on purpose: moving an unchanged manifest keeps its hash.
    @property
    def fingerprint(self) -> dict[str, Any]:
        """Settings an existing shard must share to be reused."""
        return {
            "backbone": self.identity,
            "preprocessing": self.preprocessing,
            "d": self.d,
            "dtype": self.dtype,
            "shard_size": self.shard_size,
            "source_sha256": self.source["sha256"],
        }

    @property
    def n_shards(self) -> int | None:
        """Number of shards the source needs, or None when its row count is unknown."""
        n_rows = self.source["n_rows"]
        return None if n_rows is None else math.ceil(n_rows / self.shard_size)

    def shard_range(self, index: int) -> tuple[int, int]:
        """Return the source row range ``[start, stop)`` that shard ``index`` covers."""
        start = index * self.shard_size
        stop = start + self.shard_size
        if self.source["n_rows"] is not None:
            stop = min(stop, self.source["n_rows"])
        return start, stop

    def shard_path(self, modality: str, index: int) -> Path:
        """Return the path of shard ``index`` of ``modality``."""
        return self.out_dir / shard_filename(modality, index)

    # ---------------------------------------------------------------- existing state

    def check_existing(self) -> None:
        """Raise :class:`StoreMismatchError` if the folder contains a store or shards of another run.

        Reads only; safe to call from every process at once. Unreadable shard files are
        not an error here: :meth:`has_shard` reports them as missing and they are rewritten.
        """
        manifest_path = self.out_dir / MANIFEST_FILE
        if manifest_path.is_file():
            try:
                manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
                stored = {
                    "backbone": manifest["backbone"],
                    "preprocessing": manifest["preprocessing"],
                    "d": manifest["d"],
                    "dtype": manifest["dtype"],
                    "shard_size": manifest["shard_size"],
                    "source_sha256": manifest["source"]["sha256"],
                }
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise StoreMismatchError(
                    f"{manifest_path} exists but is not a feature store manifest ({error}). Pass "
                    "overwrite=True (--overwrite) to replace it, or choose another output folder."
                ) from error
            self._compare(stored, f"the store in {self.out_dir}")
        for path in sorted(self.out_dir.iterdir()):
            if not _SHARD_PATTERN.match(path.name):
                continue
            try:
                with safe_open(path, framework="pt") as handle:
                    metadata = handle.metadata() or {}
                stored = json.loads(metadata["fingerprint"])
            except (SafetensorError, json.JSONDecodeError, KeyError) as error:  # rewritten later, not fatal
                logger.warning("%s is unreadable (%s: %s); it will be recomputed.", path, type(error).__name__, error)
                continue
            self._compare(stored, f"shard {path}")

    def _compare(self, stored: Mapping[str, Any], what: str) -> None:
        expected = self.fingerprint
        for key, value in expected.items():
            if stored.get(key) != value:
                raise StoreMismatchError(
                    f"{what} was written with a different {key}: stored {stored.get(key)!r}, this run "
                    f"has {value!r}. Pass overwrite=True (--overwrite) to recompute the store, or "
                    "choose another output folder."
                )

    def remove_temporary_files(self) -> int:
        """Delete temporary files left by interrupted writes; return how many were removed.

        Call it only while no process is writing into the folder.
        """
        removed = 0
        for path in self.out_dir.iterdir():
            if _TEMPORARY_PATTERN.match(path.name):
                path.unlink(missing_ok=True)
                removed += 1
        if removed:
            logger.info("removed %d temporary file(s) left by an interrupted run in %s", removed, self.out_dir)
        return removed

    def clear(self) -> int:
        """Delete the store's own files (shards, manifest, pairs, skips, temporary files).

        Other files in the folder are left alone. Returns the number of files removed.
        """
        removed = self.remove_temporary_files()
        for path in self.out_dir.iterdir():
            if _SHARD_PATTERN.match(path.name) or path.name in (MANIFEST_FILE, PAIRS_FILE, SKIPPED_FILE):
                path.unlink()
                removed += 1
        if removed:
            logger.info("overwrite: removed %d file(s) of the previous store in %s", removed, self.out_dir)
        return removed

    def has_shard(self, index: int) -> bool:
        """Return whether shard ``index`` is complete, readable and written by this run's settings.

        Both modality files must exist, carry this writer's fingerprint, and hold the same
        ``rows`` with ``embeddings`` of shape ``(count, d)``.
        """
        try:
            header = self._read_shard_header(index)
        except FileNotFoundError:
            return False
        except (ValueError, OSError) as error:
            logger.warning("shard %d in %s is not usable (%s); it will be recomputed.", index, self.out_dir, error)
            return False
        return header["fingerprint"] == self.fingerprint

    def _read_shard_header(self, index: int) -> dict[str, Any]:
        rows_by_modality = {}
        header: dict[str, Any] = {}
        for modality in MODALITIES:
            path = self.shard_path(modality, index)
            if not path.is_file():
                raise FileNotFoundError(path)
            info = _read_shard(path, load_embeddings=False)
            if info["shape"] != (info["count"], self.d):
                raise ValueError(f"{path.name} has embeddings of shape {info['shape']}, expected ({info['count']}, {self.d})")
            rows_by_modality[modality] = info["rows"]
            if modality == "image":
                header = info
            elif info["fingerprint"] != header["fingerprint"]:
                raise ValueError(f"the image and text files of shard {index} carry different fingerprints")
        if not torch.equal(rows_by_modality["image"], rows_by_modality["text"]):
            raise ValueError(f"the image and text files of shard {index} hold different rows")
        return header

    # ---------------------------------------------------------------- writing

    def write_shard(
        self,
        index: int,
        image_embeddings: torch.Tensor,
        text_embeddings: torch.Tensor,
        rows: torch.Tensor,
        skipped: Iterable[Any] = (),
    ) -> None:
        """Write shard ``index`` atomically: the text file, then the image file.

        Parameters
        ----------
        index : int
            Shard index; it covers source rows ``[index * shard_size, (index + 1) * shard_size)``.
        image_embeddings, text_embeddings : Tensor, shape (n, d)
            Raw embeddings of the kept pairs of the shard, in row order.
        rows : LongTensor, shape (n,)
            Source manifest row ids of those pairs, strictly increasing.
        skipped : iterable of SkipRecord or dict
            The items of the shard that failed to load (``row``, ``path``, ``reason``).

        Raises
        ------
        ValueError
            On shapes that disagree, a width other than ``d``, or rows outside the shard's range.
        """
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"index must be a non-negative int; got {index!r}.")
        n = int(rows.shape[0]) if rows.ndim == 1 else -1
        if n < 0:
            raise ValueError(f"rows must have shape (n,); got {tuple(rows.shape)}.")
        for name, z in (("image_embeddings", image_embeddings), ("text_embeddings", text_embeddings)):
            if tuple(z.shape) != (n, self.d):
                raise ValueError(f"{name} must have shape ({n}, {self.d}) to match rows and d; got {tuple(z.shape)}.")
        rows = rows.detach().to("cpu", torch.int64).contiguous()
        start, stop = self.shard_range(index)
        records = sorted((_skip_dict(record) for record in skipped), key=lambda record: record["row"])
        if n and (int(rows[0]) < start or int(rows[-1]) >= stop or bool((rows[1:] <= rows[:-1]).any())):
            raise ValueError(
                f"rows of shard {index} must be strictly increasing within [{start}, {stop}); "
                f"got {rows.tolist()[:8]}{'...' if n > 8 else ''}."
            )
        metadata = {
            "format": f"{FORMAT_NAME}-shard",
            "format_version": str(FORMAT_VERSION),
            "index": str(index),
            "count": str(n),
            "source_rows": _json_dumps([start, stop]),
            "fingerprint": _json_dumps(self.fingerprint),
            "skipped": _json_dumps(records),
        }
        storage_dtype = DTYPES[self.dtype]
        # The image file goes last: has_shard needs both, so a kill between the two
        # renames leaves a shard that is simply recomputed.
        for modality, z in (("text", text_embeddings), ("image", image_embeddings)):
            tensors = {"embeddings": z.detach().to("cpu", storage_dtype).contiguous(), "rows": rows}
            data = safetensors_save(tensors, metadata=metadata | {"modality": modality})
            _atomic_write_bytes(self.shard_path(modality, index), data)

    def finalize(self, n_shards: int | None = None, pairs: pd.DataFrame | None = None) -> dict[str, Any]:
        """Check that every shard is present, then write pairs.jsonl, skipped.jsonl and manifest.json.

        Parameters
        ----------
        n_shards : int, optional
            Number of shards; defaults to the number the source's ``n_rows`` needs.
        pairs : pandas.DataFrame, optional
            The source manifest (:func:`mmono_features.data.read_manifest`) with a ``row``
            column; its kept rows are written to ``pairs.jsonl`` in store order. Without
            it, ``pairs.jsonl`` has only the ``row`` column.

        Returns
        -------
        dict
            The manifest written to ``manifest.json``.

        Raises
        ------
        RuntimeError
            If a shard is missing or unreadable.
        """
        from mmono_features.data import SkipRecord, write_skipped

        n_shards = self.n_shards if n_shards is None else n_shards
        if n_shards is None:
            raise ValueError("n_shards is required when the writer's source has no n_rows.")

        shards: list[dict[str, Any]] = []
        all_rows: list[torch.Tensor] = []
        all_skipped: list[dict[str, Any]] = []
        count = 0
        for index in range(n_shards):
            try:
                header = self._read_shard_header(index)
            except (ValueError, OSError) as error:  # FileNotFoundError included
                raise RuntimeError(
                    f"shard {index} of {n_shards} is missing or incomplete in {self.out_dir} ({error}); "
                    "run the extraction again to compute it."
                ) from error
            if header["fingerprint"] != self.fingerprint:
                raise RuntimeError(f"shard {index} in {self.out_dir} was written by another run; run the extraction again.")
            n = header["count"]
            shards.append(
                {
                    "index": index,
                    "images": shard_filename("image", index),
                    "texts": shard_filename("text", index),
                    "count": n,
                    "n_skipped": len(header["skipped"]),
                    "source_rows": list(self.shard_range(index)),
                    "store_rows": [count, count + n],
                }
            )
            count += n
            all_rows.append(header["rows"])
            all_skipped.extend(header["skipped"])
        stray = [
            path.name
            for path in self.out_dir.iterdir()
            if (match := _SHARD_PATTERN.match(path.name)) and int(match.group(2)) >= n_shards
        ]
        if stray:
            logger.warning("%s contains shard files beyond the %d shards of this source; they are ignored: %s", self.out_dir, n_shards, stray)

        rows = torch.cat(all_rows) if all_rows else torch.zeros(0, dtype=torch.int64)
        self._write_pairs(rows, pairs)
        write_skipped(self.out_dir / SKIPPED_FILE, [SkipRecord.from_dict(record) for record in all_skipped])
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "backbone": self.identity,
            "preprocessing": self.preprocessing,
            "normalization": NORMALIZATION_NOTE,
            "dtype": self.dtype,
            "d": self.d,
            "count": count,
            "n_skipped": len(all_skipped),
            "shard_size": self.shard_size,
            "shards": shards,
            "source": self.source,
            "rows": {
                "description": "source manifest row id of each pair: the int64 tensor 'rows' of every shard",
                "count": int(rows.numel()),
                "min": int(rows.min()) if rows.numel() else None,
                "max": int(rows.max()) if rows.numel() else None,
            },
            "files": {"pairs": PAIRS_FILE, "skipped": SKIPPED_FILE},
        }
        text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
        _atomic_write_bytes(self.out_dir / MANIFEST_FILE, text.encode("utf-8"))
        self.remove_temporary_files()
        return manifest

    def _write_pairs(self, rows: torch.Tensor, pairs: pd.DataFrame | None) -> None:
        if pairs is None:
            table = pd.DataFrame({"row": rows.numpy()})
        else:
            if "row" not in pairs.columns:
                raise ValueError(f"pairs must have a 'row' column (read_manifest's output); got columns {list(pairs.columns)}.")
            by_row = pairs.drop(columns=[c for c in ("skip",) if c in pairs.columns]).set_index("row", drop=False)
            missing = sorted(set(rows.tolist()) - set(by_row.index))
            if missing:
                raise ValueError(f"pairs lacks the stored rows {missing[:8]}; pass the manifest the store was built from.")
            table = by_row.loc[rows.tolist()].reset_index(drop=True)
        columns = list(table.columns)
        lines = [
            json.dumps(dict(zip(columns, map(_json_value, values))), ensure_ascii=False, default=str) + "\n"
            for values in table.itertuples(index=False, name=None)
        ]
        _atomic_write_bytes(self.out_dir / PAIRS_FILE, "".join(lines).encode("utf-8"))


def _json_value(value: Any) -> Any:
    """Turn a table cell into a JSON value: numpy scalars to Python, missing values to None."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()  # numpy scalar; Python floats keep every digit in json.dumps
    if value is None or value is pd.NA or value is pd.NaT or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    return value


def _read_shard(path: Path, load_embeddings: bool) -> dict[str, Any]:
    """Read a shard's metadata and rows (and embeddings if asked) through a memory map.

    Raises ValueError for a file that is not a readable shard of this format.
    """
    try:
        return _read_shard_unchecked(path, load_embeddings)
    except (SafetensorError, json.JSONDecodeError, KeyError) as error:
        raise ValueError(f"{path} is not a readable shard ({type(error).__name__}: {error})") from error


def _read_shard_unchecked(path: Path, load_embeddings: bool) -> dict[str, Any]:
    with safe_open(path, framework="pt", device="cpu") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != f"{FORMAT_NAME}-shard":
            raise ValueError(f"{path} is not a feature store shard (format {metadata.get('format')!r})")
        if int(metadata.get("format_version", -1)) > FORMAT_VERSION:
            raise ValueError(f"{path} has format version {metadata['format_version']}; this mmono reads up to {FORMAT_VERSION}")
        embeddings = handle.get_slice("embeddings")
        info = {
            "count": int(metadata["count"]),
            "shape": tuple(embeddings.get_shape()),
            "dtype": _SAFETENSORS_DTYPES.get(embeddings.get_dtype(), embeddings.get_dtype()),
            "rows": handle.get_tensor("rows"),
            "fingerprint": json.loads(metadata["fingerprint"]),
            "skipped": json.loads(metadata["skipped"]),
        }
        if load_embeddings:
            info["embeddings"] = handle.get_tensor("embeddings")
    if tuple(info["rows"].shape) != (info["count"],):
        raise ValueError(f"{path} has rows of shape {tuple(info['rows'].shape)}, expected ({info['count']},)")
    return info


# --------------------------------------------------------------------------- reading


class FeatureStore:
    """Read access to a finished feature store; open it with :meth:`FeatureStore.open`.

    Reads go through safetensors' memory maps one shard at a time, so streaming
    (:meth:`iter_batches`, :meth:`iter_pairs`) keeps a few shards in memory whatever the
    store's size; :meth:`embeddings` returns one modality in full.
    """

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self._manifest = manifest
        self._rows: torch.Tensor | None = None

    @classmethod
    def open(cls, path: str | os.PathLike) -> FeatureStore:
        """Open the store in folder ``path`` and validate its manifest and shard headers.

        Raises
        ------
        FileNotFoundError
            If the folder, its ``manifest.json`` or a listed shard is missing; the message
            suggests resuming the extraction when shards exist without a manifest.
        ValueError
            If the manifest is not a feature store manifest of a supported version, or a
            shard disagrees with it.
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"feature store folder {path} does not exist; run `mmono extract` to create it.")
        manifest_path = path / MANIFEST_FILE
        if not manifest_path.is_file():
            if any(_SHARD_PATTERN.match(entry.name) for entry in path.iterdir()):
                raise FileNotFoundError(
                    f"{path} has shards but no {MANIFEST_FILE}: the extraction did not finish. "
                    "Re-run the same `mmono extract` command to resume it."
                )
            raise FileNotFoundError(f"{path} is not a feature store (no {MANIFEST_FILE}); run `mmono extract` to create it.")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{manifest_path} is not valid JSON ({error}); re-run the extraction with --overwrite.") from error
        _validate_manifest(manifest, manifest_path)
        store = cls(path, manifest)
        store._validate_shards()
        return store

    def _validate_shards(self) -> None:
        dtype = self._manifest["dtype"]
        for shard in self._manifest["shards"]:
            for modality, key in (("image", "images"), ("text", "texts")):
                file = self.path / shard[key]
                if not file.is_file():
                    raise FileNotFoundError(
                        f"shard file {file} listed in {self.path / MANIFEST_FILE} is missing; re-run the "
                        "extraction command to recompute it."
                    )
                try:
                    with safe_open(file, framework="pt", device="cpu") as handle:
                        embeddings = handle.get_slice("embeddings")
                        shape = tuple(embeddings.get_shape())
                        stored_dtype = _SAFETENSORS_DTYPES.get(embeddings.get_dtype(), embeddings.get_dtype())
                        rows_shape = tuple(handle.get_slice("rows").get_shape())
                except SafetensorError as error:
                    raise ValueError(
                        f"{file} is not a readable safetensors file ({error}); the store is damaged, re-run "
                        "the extraction with --overwrite."
                    ) from error
                if shape != (shard["count"], self.d) or rows_shape != (shard["count"],) or stored_dtype != dtype:
                    raise ValueError(
                        f"{file} contains embeddings {shape} {stored_dtype} and rows {rows_shape}, but the manifest "
                        f"lists ({shard['count']}, {self.d}) {dtype}; the store is damaged, re-run the extraction "
                        "with --overwrite."
                    )

    # ---------------------------------------------------------------- properties

    @property
    def manifest(self) -> dict[str, Any]:
        """A copy of the parsed ``manifest.json``."""
        return json.loads(json.dumps(self._manifest))

    @property
    def n_pairs(self) -> int:
        """Number of stored pairs."""
        return int(self._manifest["count"])

    @property
    def d(self) -> int:
        """Embedding width."""
        return int(self._manifest["d"])

    @property
    def dtype(self) -> str:
        """Storage dtype of the embeddings, ``"float32"`` or ``"float16"``."""
        return str(self._manifest["dtype"])

    @property
    def n_shards(self) -> int:
        """Number of shards."""
        return len(self._manifest["shards"])

    @property
    def backbone_identity(self) -> dict[str, Any]:
        """Identity of the backbone that produced the embeddings (name, pretrained, checkpoint hash)."""
        return dict(self._manifest["backbone"])

    @property
    def rows(self) -> torch.Tensor:
        """LongTensor (n_pairs,): source manifest row id of each stored pair, in store order."""
        if self._rows is None:
            parts = [self._read(shard, "image", with_embeddings=False)[1] for shard in self._manifest["shards"]]
            self._rows = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
        return self._rows.clone()

    def __len__(self) -> int:
        return self.n_pairs

    def __repr__(self) -> str:
        identity = self._manifest["backbone"]
        return (
            f"FeatureStore({str(self.path)!r}, n_pairs={self.n_pairs}, d={self.d}, dtype={self.dtype}, "
            f"shards={self.n_shards}, backbone={identity.get('name')!r}/{identity.get('pretrained')!r})"
        )

    # ---------------------------------------------------------------- reading

    def _read(self, shard: Mapping[str, Any], modality: str, with_embeddings: bool = True):
        key = "images" if modality == "image" else "texts"
        with safe_open(self.path / shard[key], framework="pt", device="cpu") as handle:
            rows = handle.get_tensor("rows")
            embeddings = handle.get_tensor("embeddings") if with_embeddings else None
        return embeddings, rows

    @staticmethod
    def _convert(z: torch.Tensor, normalize: bool, dtype: torch.dtype) -> torch.Tensor:
        if normalize:
            z = normalize_embeddings(z)  # computes in float32 whatever the storage dtype
        return z.to(dtype)

    def embeddings(self, modality: str, normalize: bool = True, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Return every embedding of one modality, in store order.

        Parameters
        ----------
        modality : {"image", "text"}
        normalize : bool, default True
            L2-normalise each row, then multiply by sqrt(d); False returns the raw embeddings.
        dtype : torch.dtype, default torch.float32

        Returns
        -------
        Tensor, shape (n_pairs, d)
            Row i belongs to pair i (``rows[i]`` in the source manifest).
        """
        check_modality(modality)
        out = torch.empty(self.n_pairs, self.d, dtype=dtype)
        for shard in self._manifest["shards"]:
            start, stop = shard["store_rows"]
            if stop > start:
                z, _ = self._read(shard, modality)
                out[start:stop] = self._convert(z, normalize, dtype)
        return out

    def _shard_order(self, shuffle: bool, generator: torch.Generator) -> list[Mapping[str, Any]]:
        shards = [shard for shard in self._manifest["shards"] if shard["count"] > 0]
        if shuffle:
            shards = [shards[i] for i in torch.randperm(len(shards), generator=generator).tolist()]
        return shards

    def iter_batches(
        self,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        normalize: bool = True,
        modalities: Sequence[str] = MODALITIES,
        shards_in_memory: int = 2,
        drop_last: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Stream image and text embeddings mixed in batches, shard by shard.

        Parameters
        ----------
        batch_size : int
        shuffle : bool, default True
            Visit shards in a seeded random order and shuffle the embeddings of the
            ``shards_in_memory`` shards loaded together. Without shuffling, batches follow
            store order, each shard's images before its texts.
        seed : int, default 0
        normalize : bool, default True
            L2 then times sqrt(d), as in :meth:`embeddings`.
        modalities : sequence of {"image", "text"}, default both
        shards_in_memory : int, default 2
            Shards pooled before shuffling; peak memory is about this many shards of
            every requested modality plus one batch.
        drop_last : bool, default False
            Leave out the last batch when it is smaller than ``batch_size``.
        dtype : torch.dtype, default torch.float32

        Yields
        ------
        z : Tensor, shape (b, d)
        modality : LongTensor, shape (b,)
            0 for an image embedding, 1 for a text embedding (:data:`MODALITY_CODES`).
        """
        _check_positive("batch_size", batch_size)
        _check_positive("shards_in_memory", shards_in_memory)
        modalities = tuple(modalities)
        if not modalities or len(set(modalities)) != len(modalities):
            raise ValueError(f"modalities must be a non-empty sequence of distinct names from {MODALITIES}; got {modalities!r}.")
        for modality in modalities:
            check_modality(modality)
        generator = torch.Generator().manual_seed(seed)
        shards = self._shard_order(shuffle, generator)

        def chunks() -> Iterator[tuple[torch.Tensor, ...]]:
            for start in range(0, len(shards), shards_in_memory):
                parts, codes = [], []
                for shard in shards[start : start + shards_in_memory]:
                    for modality in modalities:
                        z, _ = self._read(shard, modality)
                        parts.append(self._convert(z, normalize, dtype))
                        codes.append(torch.full((z.shape[0],), MODALITY_CODES[modality], dtype=torch.int64))
                z, code = torch.cat(parts), torch.cat(codes)
                if shuffle:
                    order = torch.randperm(z.shape[0], generator=generator)
                    z, code = z[order], code[order]
                yield z, code

        yield from _rebatch(chunks(), batch_size, drop_last)

    def iter_pairs(
        self,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        normalize: bool = True,
        shards_in_memory: int = 2,
        drop_last: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Stream aligned image and text embeddings of the same pairs, shard by shard.

        Parameters are as in :meth:`iter_batches`; without shuffling, pairs come in store order.

        Yields
        ------
        image_z : Tensor, shape (b, d)
        text_z : Tensor, shape (b, d)
            Row j of both is the same pair.
        rows : LongTensor, shape (b,)
            Source manifest row ids of the pairs.
        """
        _check_positive("batch_size", batch_size)
        _check_positive("shards_in_memory", shards_in_memory)
        generator = torch.Generator().manual_seed(seed)
        shards = self._shard_order(shuffle, generator)

        def chunks() -> Iterator[tuple[torch.Tensor, ...]]:
            for start in range(0, len(shards), shards_in_memory):
                images, texts, rows = [], [], []
                for shard in shards[start : start + shards_in_memory]:
                    image_z, shard_rows = self._read(shard, "image")
                    text_z, _ = self._read(shard, "text")
                    images.append(self._convert(image_z, normalize, dtype))
                    texts.append(self._convert(text_z, normalize, dtype))
                    rows.append(shard_rows)
                image_z, text_z, chunk_rows = torch.cat(images), torch.cat(texts), torch.cat(rows)
                if shuffle:
                    order = torch.randperm(image_z.shape[0], generator=generator)
                    image_z, text_z, chunk_rows = image_z[order], text_z[order], chunk_rows[order]
                yield image_z, text_z, chunk_rows

        yield from _rebatch(chunks(), batch_size, drop_last)

    def metadata(self) -> pd.DataFrame:
        """Return one row per stored pair, in store order, read from ``pairs.jsonl``.

        Returns
        -------
        pandas.DataFrame
            Columns ``row``, ``image``, ``caption`` and the source manifest's metadata
            columns; row i describes pair i of :meth:`embeddings`.
        """
        path = self.path / PAIRS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; re-run the extraction with --overwrite to rebuild the store.")
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
        columns = list(records[0]) if records else ["row"]
        table = pd.DataFrame.from_records(records, columns=columns)
        if len(table) != self.n_pairs or (len(table) and not torch.equal(torch.tensor(table["row"].to_numpy(dtype="int64")), self.rows)):
            raise ValueError(f"{path} does not match the shards' rows; re-run the extraction with --overwrite.")
        table["row"] = table["row"].astype("int64")
        return table

    def skipped(self) -> list[dict[str, Any]]:
        """Return the items that failed to load: dicts with ``row``, ``path``, ``reason``, sorted by row."""
        from mmono_features.data import read_skipped

        path = self.path / SKIPPED_FILE
        return [record.to_dict() for record in read_skipped(path)] if path.is_file() else []


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int; got {value!r}.")


def _rebatch(
    chunks: Iterable[tuple[torch.Tensor, ...]], batch_size: int, drop_last: bool
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Cut aligned chunks of tensors into batches of ``batch_size`` rows across chunk borders."""
    pending: list[tuple[torch.Tensor, ...]] = []
    n_pending = 0
    for chunk in chunks:
        n, start = chunk[0].shape[0], 0
        while start < n:
            take = min(batch_size - n_pending, n - start)
            pending.append(tuple(tensor[start : start + take] for tensor in chunk))
            n_pending += take
            start += take
            if n_pending == batch_size:
                yield _join(pending)
                pending, n_pending = [], 0
    if n_pending and not drop_last:
        yield _join(pending)


def _join(parts: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    if len(parts) == 1:
        return tuple(tensor.clone() for tensor in parts[0])  # a clone frees the chunk behind the view
    return tuple(torch.cat(tensors) for tensors in zip(*parts))


def _validate_manifest(manifest: Any, path: Path) -> None:
    fix = "re-run the extraction with --overwrite"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{path} is not a feature store manifest (format {found!r}, expected {FORMAT_NAME!r}).")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {version!r}; this mmono reads versions up to {FORMAT_VERSION}. "
            "Upgrade mmono or re-extract."
        )
    required = ("backbone", "preprocessing", "dtype", "d", "count", "shard_size", "shards", "source")
    missing = [key for key in required if key not in manifest]
    if missing:
        raise ValueError(f"{path} lacks the field(s) {missing}; {fix}.")
    if manifest["dtype"] not in DTYPES:
        raise ValueError(f"{path} has dtype {manifest['dtype']!r}, expected one of {tuple(DTYPES)}; {fix}.")
    expected_start = 0
    for position, shard in enumerate(manifest["shards"]):
        keys = ("index", "images", "texts", "count", "store_rows")
        if not isinstance(shard, dict) or any(key not in shard for key in keys):
            raise ValueError(f"{path}: shard entry {position} must have the fields {keys}; {fix}.")
        if shard["store_rows"] != [expected_start, expected_start + shard["count"]]:
            raise ValueError(
                f"{path}: shard {shard['index']} covers store rows {shard['store_rows']}, expected "
                f"{[expected_start, expected_start + shard['count']]}; {fix}."
            )
        expected_start += shard["count"]
    if expected_start != manifest["count"]:
        raise ValueError(f"{path}: the shard counts add up to {expected_start}, but count is {manifest['count']}; {fix}.")
