"""One switch for every progress bar that library code shows.

Library functions wrap long loops in :func:`progress`; the CLI turns bars on, while
notebooks and tests may turn them off with :func:`set_progress`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

_ENABLED = True


def set_progress(enabled: bool) -> None:
    """Turn progress bars of library code on or off for this process."""
    global _ENABLED
    _ENABLED = bool(enabled)


def progress_enabled() -> bool:
    """Return whether progress bars are shown."""
    return _ENABLED


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it") -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar when bars are enabled, else return it as is."""
    if not _ENABLED:
        return iter(iterable)
    return iter(tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False))
