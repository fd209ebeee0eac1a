"""Shared fixtures: tiny backbones loaded once per session, offline settings."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Vocabulary embeddings are cached per backbone; keep the test run's cache out of $HOME.
os.environ.setdefault("MMONO_CACHE", tempfile.mkdtemp(prefix="mmono-test-cache-"))
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch

from mmono_features.progress import set_progress

set_progress(False)


@pytest.fixture(scope="session")
def tiny_backbone():
    """The random-weight tiny CLIP (image 32 px, width 64, 2 layers) on the CPU."""
    from mmono_features.backbone import load_backbone

    return load_backbone("mmono-tiny", device="cpu", seed=0)


@pytest.fixture(scope="session")
def shapes_backbone():
    """The tiny CLIP trained on the synthetic shapes world, from the committed weights."""
    from mmono_features.backbone import load_backbone

    return load_backbone("mmono-shapes", device="cpu")


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
