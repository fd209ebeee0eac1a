"""Builders of awkward image files and manifests for the data-layer tests.

Each ``write_*`` function writes one small file and returns its path. ``build_messy_manifest``
puts one of every awkward case in a single CSV manifest. It also returns which rows should
load and which should be skipped, with what reason, so extraction tests may reuse it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

EXIF_ORIENTATION = 0x0112


def asymmetric_rgb(width: int = 40, height: int = 20) -> Image.Image:
    """A gray image with a red block in its top-left corner, so rotations are visible."""
    image = Image.new("RGB", (width, height), (128, 128, 128))
    image.paste((255, 0, 0), (0, 0, width // 4, height // 4))
    return image


def write_rgb_jpeg(path: Path, size: tuple[int, int] = (24, 16), color=(0, 128, 255)) -> Path:
    Image.new("RGB", size, color).save(path, quality=95)
    return path


def write_truncated_jpeg(path: Path) -> Path:
    """A JPEG cut to half its length: the header opens, the pixel data does not decode."""
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)  # noise keeps the file long
    Image.fromarray(noise).save(buffer, format="JPEG", quality=95)
    data = buffer.getvalue()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_cmyk_jpeg(path: Path) -> Path:
    """A pure red CMYK JPEG (C=0, M=255, Y=255, K=0)."""
    Image.new("CMYK", (16, 12), (0, 255, 255, 0)).save(path, quality=95)
    return path


def write_16bit_png(path: Path, values=(0, 32768, 65535)) -> Path:
    """A 16-bit grayscale PNG, one column per value, 4 rows high."""
    array = np.tile(np.asarray(values, dtype=np.uint16), (4, 1))
    Image.fromarray(array).save(path)
    return path


def write_rgba_png(path: Path) -> Path:
    """An 8x8 RGBA PNG: left half fully transparent black, right half opaque blue."""
    array = np.zeros((8, 8, 4), dtype=np.uint8)
    array[:, 4:] = (0, 0, 255, 255)
    Image.fromarray(array).save(path)
    return path


def write_palette_png(path: Path) -> Path:
    """A palette PNG of 6x6 with index 0 transparent (left half) and index 1 green."""
    image = Image.new("P", (6, 6), 1)
    image.putpalette([0, 0, 0, 0, 200, 0] + [0] * (256 * 3 - 6))
    image.paste(0, (0, 0, 3, 6))
    image.save(path, transparency=0)
    return path


def write_exif_rotated_jpeg(path: Path, orientation: int = 6) -> Path:
    """The :func:`asymmetric_rgb` image stored landscape with EXIF Orientation set."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    asymmetric_rgb().save(path, quality=95, exif=exif.tobytes())
    return path


@dataclass
class MessyManifest:
    path: Path
    good_rows: list[int]
    skipped: dict[int, str]  # row -> expected start of the skip reason


def build_messy_manifest(folder: Path) -> MessyManifest:
    """Write one CSV manifest holding every awkward case, with the expected outcome."""
    folder.mkdir(parents=True, exist_ok=True)
    images = folder / "images"
    images.mkdir(exist_ok=True)

    write_rgb_jpeg(images / "plain.jpg")
    (images / "empty.jpg").write_bytes(b"")
    write_truncated_jpeg(images / "truncated.jpg")
    write_cmyk_jpeg(images / "cmyk.jpg")
    write_16bit_png(images / "gray16.png")
    write_rgba_png(images / "rgba.png")
    write_exif_rotated_jpeg(images / "rotated.jpg")

    rows = [
        (b"images/plain.jpg", b"a plain blue rectangle", None),
        (b"images/missing.jpg", b"a file that was never written", "file not found"),
        (b"images/empty.jpg", b"a zero-byte file", "file is empty"),
        (b"images/truncated.jpg", b"a JPEG cut in half", "image data is truncated"),
        (b"images/cmyk.jpg", b"a red CMYK picture", None),
        (b"images/gray16.png", b"a 16-bit gray ramp", None),
        (b"images/rgba.png", b"half transparent, half blue", None),
        (b"images/rotated.jpg", b"a picture with EXIF orientation 6", None),
        (b"images/plain.jpg", b"   ", "caption is empty"),
        (b"images/plain.jpg", b"caf\xe9 au lait", "caption is not valid UTF-8"),  # Latin-1 byte
        (b"images/plain.jpg", "cr\u00e8me br\u00fbl\u00e9e, fine UTF-8".encode(), None),
    ]
    lines = [b"image,caption,kind"]
    for index, (image, caption, _) in enumerate(rows):
        lines.append(image + b',"' + caption + b'",k' + str(index).encode())
    path = folder / "manifest.csv"
    path.write_bytes(b"\n".join(lines) + b"\n")

    return MessyManifest(
        path=path,
        good_rows=[index for index, (_, _, reason) in enumerate(rows) if reason is None],
        skipped={index: reason for index, (_, _, reason) in enumerate(rows) if reason is not None},
    )
