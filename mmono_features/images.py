"""Loading one image file into an RGB ``PIL.Image``, with every failure turned into a reason.

:func:`load_image` is the only entry point. A file that cannot become a usable RGB image
raises :class:`ImageLoadError`, whose ``reason`` is a short sentence meant for a
``skipped.jsonl`` record. Mode conversions (grayscale, 16-bit, palette, alpha, CMYK, ...)
change pixels, so each source mode is logged once per process and then counted. Read the
counts with :func:`conversion_counts`, or log them with :func:`log_conversion_summary`.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections import Counter

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageLoadError",
    "conversion_counts",
    "load_image",
    "log_conversion_summary",
    "reset_conversion_counts",
]

#: Largest accepted image area in pixels; the same value as Pillow's own default
#: ``Image.MAX_IMAGE_PIXELS`` (about 0.25 GiB of 24-bit pixels).
DEFAULT_MAX_PIXELS = 89_478_485

# Source mode -> number of images converted from it in this process.
_CONVERSIONS: Counter[str] = Counter()
_CONVERSIONS_LOCK = threading.Lock()

# Modes that Pillow's own ``convert("RGB")`` maps without loss of meaning.
_PLAIN_MODES = {"1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


class ImageLoadError(Exception):
    """An image file that cannot be used, with the reason in words.

    Parameters
    ----------
    reason : str
        Short description, e.g. ``"file not found"``; stored as ``.reason``.
    path : str or None
        The file concerned; stored as ``.path``.
    """

    def __init__(self, reason: str, path: str | None = None) -> None:
        super().__init__(reason, path)
        self.reason = reason
        self.path = path

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" if self.path else self.reason


def conversion_counts() -> dict[str, int]:
    """Return how many images of each source mode were converted to RGB in this process.

    Returns
    -------
    dict of str to int
        Source mode (``"L"``, ``"I;16"``, ``"RGBA"``, ...) to count; RGB images are absent.
    """
    with _CONVERSIONS_LOCK:
        return dict(_CONVERSIONS)


def reset_conversion_counts() -> None:
    """Forget the conversion counts (and log the first conversion of each mode again)."""
    with _CONVERSIONS_LOCK:
        _CONVERSIONS.clear()


def log_conversion_summary(counts: dict[str, int] | None = None) -> None:
    """Log one line with the number of converted images per source mode.

    Parameters
    ----------
    counts : dict of str to int, optional
        Counts to report, e.g. gathered from DataLoader workers through
        ``PairBatch.conversions``; by default this process's :func:`conversion_counts`.
    """
    counts = conversion_counts() if counts is None else counts
    if counts:
        parts = ", ".join(f"{mode}: {n}" for mode, n in sorted(counts.items()))
        logger.info("images converted to RGB, by source mode: %s", parts)


def _note_conversion(mode: str, how: str) -> None:
    with _CONVERSIONS_LOCK:
        first = mode not in _CONVERSIONS
        _CONVERSIONS[mode] += 1
    if first:
        logger.warning(
            "converting images of mode %r to RGB (%s); further ones are counted, not logged",
            mode, how,
        )


def _rescale_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Map a single-channel 16-bit, 32-bit integer or float array to uint8.

    16-bit data maps linearly from [0, 65535] to [0, 255] (v / 257, rounded), so 65535
    gives 255 and 32768 gives 128. Mode ``"I"`` data within [0, 65535] is taken as
    16-bit, because Pillow opens some 16-bit files as ``"I"``. Mode ``"F"`` data within
    [0, 1] is scaled by 255. Any other range is stretched from its minimum to its maximum.
    """
    data = values.astype(np.float64)
    if mode in _SIXTEEN_BIT_MODES:
        scaled = data / 257.0
    else:
        low, high = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
        if mode == "I" and low >= 0 and high <= 65535:
            scaled = data / 257.0
        elif mode == "F" and low >= 0 and high <= 1:
            scaled = data * 255.0
        elif high > low:
            scaled = (data - low) * (255.0 / (high - low))
        else:
            scaled = np.zeros_like(data)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _composite_on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """Convert a loaded image to RGB; return it and its source mode, or None if it was RGB."""
    mode = image.mode
    has_transparency = "transparency" in image.info
    if mode == "RGB" and not has_transparency:
        return image, None

    if mode in _SIXTEEN_BIT_MODES or mode in {"I", "F"}:
        _note_conversion(mode, "rescaled to 8 bits")
        gray = _rescale_to_uint8(np.asarray(image), mode)
        return Image.fromarray(gray).convert("RGB"), mode
    if mode in _ALPHA_MODES or has_transparency:
        _note_conversion(mode, "alpha composited on white")
        return _composite_on_white(image), mode
    if mode in _PLAIN_MODES:
        # NOTE: CMYK goes through Pillow's plain formula, so an embedded ICC profile is ignored.
        _note_conversion(mode, "Pillow convert")
        return image.convert("RGB"), mode
    raise ImageLoadError(f"unsupported image mode {mode!r}")


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation, or keep the image as stored if the EXIF block is malformed."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception as error:  # EXIF parsers raise many types on malformed blocks
        logger.warning("ignoring unreadable EXIF orientation of %s (%s)", image.filename, error)
        return image.copy()


def _open_checked(path: str, max_pixels: int | None) -> Image.Image:
    """Open, check the area against ``max_pixels`` and fully decode one image file."""
    try:
        with warnings.catch_warnings():
            # The area check below replaces Pillow's warning. Pillow still raises
            # DecompressionBombError above twice its own global limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as handle:
                width, height = handle.size
                if max_pixels is not None and width * height > max_pixels:
                    raise ImageLoadError(
                        f"image is {width}x{height} = {width * height} pixels, above "
                        f"max_pixels={max_pixels} (decompression-bomb limit)"
                    )
                # Force a full decode now, so that truncated data fails here.
                handle.load()
                return _upright(handle)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageLoadError(
            f"image exceeds Pillow's decompression-bomb limit ({error}); raise "
            "PIL.Image.MAX_IMAGE_PIXELS as well as max_pixels to accept it"
        ) from error
    except UnidentifiedImageError as error:
        raise ImageLoadError("not a readable image format") from error
    except PermissionError as error:
        raise ImageLoadError("permission denied") from error
    except OSError as error:
        message = str(error)
        if "truncated" in message:
            raise ImageLoadError("image data is truncated") from error
        raise ImageLoadError(f"image data is corrupt ({message})") from error
    except Exception as error:  # decoders raise many types (SyntaxError, ValueError, ...)
        raise ImageLoadError(f"image could not be decoded ({type(error).__name__}: {error})") from error


def _load_image(path: str | os.PathLike, max_pixels: int | None) -> tuple[Image.Image, str | None]:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ImageLoadError("file not found", path)
    if os.path.isdir(path):
        raise ImageLoadError("path is a folder, not an image file", path)
    if os.path.getsize(path) == 0:
        raise ImageLoadError("file is empty (0 bytes)", path)
    try:
        image = _open_checked(path, max_pixels)
        rgb, source_mode = _to_rgb(image)
    except ImageLoadError as error:
        raise ImageLoadError(error.reason, path) from error.__cause__
    return rgb, source_mode


def load_image(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open one image file as an upright 8-bit RGB image.

    Steps: check the file exists and is not empty; read the header and reject images
    larger than ``max_pixels``; decode all pixel data (so truncated files fail here);
    apply the EXIF orientation; convert to RGB.

    Conversions:

    - palette and alpha images are composited on white, so a fully transparent pixel
      becomes (255, 255, 255);
    - 16-bit grayscale maps [0, 65535] linearly to [0, 255];
    - 32-bit integer grayscale within [0, 65535] is read as 16-bit, float grayscale
      within [0, 1] is scaled by 255, and other ranges are stretched from min to max;
    - ``1``, ``L``, CMYK, YCbCr, LAB and HSV use Pillow's conversion.

    The first conversion of each source mode is logged as a
    warning; later ones are counted (:func:`conversion_counts`). Multi-frame files
    (GIF, TIFF) give their first frame.

    Parameters
    ----------
    path : str or os.PathLike
        Image file.
    max_pixels : int or None, default 89_478_485
        Largest accepted width * height; ``None`` leaves only Pillow's own global limit
        (``PIL.Image.MAX_IMAGE_PIXELS``, enforced at twice its value).

    Returns
    -------
    PIL.Image.Image
        Mode ``"RGB"``, size ``(width, height)`` after the EXIF rotation, detached from
        the file.

    Raises
    ------
    ImageLoadError
        With ``.reason`` one of: file not found, path is a folder, file is empty, above
        max_pixels, not a readable image format, permission denied, truncated, corrupt,
        could not be decoded, unsupported image mode.
    ValueError
        If ``max_pixels`` is not a positive integer or None.
    """
    _check_max_pixels(max_pixels)
    return _load_image(path, max_pixels)[0]


def _check_max_pixels(max_pixels: int | None) -> None:
    if max_pixels is None:
        return
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels <= 0:
        raise ValueError(
            f"max_pixels must be a positive integer or None, got {max_pixels!r}; "
            f"the default is {DEFAULT_MAX_PIXELS}"
        )
