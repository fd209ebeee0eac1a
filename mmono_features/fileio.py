"""Small file helpers shared by the writers of stores, dictionaries, scores and reports."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np


def atomic_write(target: Path, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``target``, then rename it.

    A crash mid-write leaves no partial ``target``; the temporary file keeps the target's
    suffix because some writers (pandas' parquet engine) choose the format from it.
    """
    target = Path(target)
    handle, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=target.suffix)
    os.close(handle)
    try:
        write(tmp)
        # mkstemp creates the file readable by its owner only; give the result the
        # permissions of an ordinary new file (0o666 less the umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def json_safe(value: Any) -> Any:
    """Turn numpy scalars, tuples and non-finite floats into plain JSON values (NaN -> None).

    Objects that JSON cannot hold otherwise (paths, dtypes) become their ``str``.
    """
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [json_safe(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    return str(value)
