"""Planted ground truth and small trained dictionaries shared by the dictionary tests."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch

from mmono_features.dictionary import TrainConfig, make_config, train_dictionary

D_IN = 32
N_ATOMS = 64
D_SAE = 128
ACTIVE = 3


@pytest.fixture(autouse=True)
def _one_thread():
    # The tensors here are tiny: thread start-up and contention on shared cores cost
    # more than they save (a 2-thread run was measured 10x slower under load).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class Planted:
    """Synthetic embeddings with known sparse non-negative codes over known atoms.

    Attributes
    ----------
    atoms : Tensor, shape (n_atoms, d_in)
        Unit-norm ground-truth directions.
    codes : Tensor, shape (n, n_atoms)
        ``ACTIVE`` non-zero entries per row, uniform in [0.5, 1.5].
    image, text : Tensor, shape (n, d_in)
        ``codes @ atoms`` plus independent noise per modality (row i of both is pair i).
    """

    atoms: torch.Tensor
    codes: torch.Tensor
    image: torch.Tensor
    text: torch.Tensor


def make_planted(n: int = 8192, d_in: int = D_IN, n_atoms: int = N_ATOMS, active: int = ACTIVE, noise: float = 0.0, seed: int = 0) -> Planted:
    generator = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, d_in, generator=generator)
    atoms = atoms / atoms.norm(dim=1, keepdim=True)
    chosen = torch.rand(n, n_atoms, generator=generator).topk(active, dim=1).indices
    magnitudes = 0.5 + torch.rand(n, active, generator=generator)
    codes = torch.zeros(n, n_atoms).scatter_(1, chosen, magnitudes)
    clean = codes @ atoms
    image = clean + noise * torch.randn(n, d_in, generator=generator)
    text = clean + noise * torch.randn(n, d_in, generator=generator)
    return Planted(atoms, codes, image, text)


def recovery(directions: torch.Tensor, atoms: torch.Tensor, threshold: float = 0.9) -> float:
    """Share of ``atoms`` (n_atoms, d) matched by some row of ``directions`` with cosine > threshold."""
    directions = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return float(((atoms @ directions.T).max(dim=1).values > threshold).double().mean())


# Options and training length of each kind on the planted data (d_in 32, 64 atoms,
# 3 active, d_sae 128).
PLANTED_OPTIONS = {
    "topk": {"k": ACTIVE},
    "batchtopk": {"k": ACTIVE},
    "matryoshka": {"k": ACTIVE},
    "relu": {"l1_coefficient": 1.0, "l1_warmup_steps": 100},
    "ncl": {},
}
PLANTED_STEPS = 400


@functools.lru_cache(maxsize=None)
def _train_planted(kind: str):
    planted = make_planted(noise=0.05 if kind == "ncl" else 0.0)
    if kind == "ncl":
        source = (planted.image, planted.text)
    else:
        # The SAE kinds ignore pairing: give them distinct samples for both modalities.
        half = planted.image.shape[0] // 2
        source = (planted.image[:half], planted.image[half:])
    config = make_config(kind, D_IN, D_SAE, seed=0, **PLANTED_OPTIONS[kind])
    train_config = TrainConfig(
        n_steps=PLANTED_STEPS, batch_size=256, lr=3e-3, warmup_steps=50, log_every=200, device="cpu",
        dead_after_samples=20_000, seed=0,
    )
    result = train_dictionary(source, config, train_config)
    return planted, source, result


@pytest.fixture(scope="session")
def trained_planted():
    """``trained_planted(kind) -> (planted, (image_z, text_z), TrainResult)``, trained once per session."""
    return _train_planted


@pytest.fixture(scope="session")
def planted_maker():
    """The generator of planted data, :func:`make_planted`."""
    return make_planted


@pytest.fixture(scope="session")
def atom_recovery():
    """The planted-atom recovery measure, :func:`recovery`."""
    return recovery
