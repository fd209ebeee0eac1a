from __future__ import annotations

import math
import os
import stat

import numpy as np

from mmono_features.fileio import atomic_write, json_safe


def test_atomic_write_uses_umask_permissions(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write(target, lambda tmp: open(tmp, "w").write("hello"))
    umask = os.umask(0)
    os.umask(umask)
    assert target.read_text() == "hello"
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_atomic_write_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out.txt"

    def fail(tmp):
        raise RuntimeError("disk full")

    try:
        atomic_write(target, fail)
    except RuntimeError:
        pass
    assert list(tmp_path.iterdir()) == []


def test_json_safe_known_values():
    value = {"a": np.float32(1.5), "b": (np.int64(2), math.nan), "c": np.array([True, False]), 3: None}
    assert json_safe(value) == {"a": 1.5, "b": [2, None], "c": [True, False], "3": None}
