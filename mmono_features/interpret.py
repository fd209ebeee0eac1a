"""Interpretability measures: top-activating samples, EmbSim, WinRate and feature names.

Definitions, for a latent j and its top-m activating samples:

- **EmbSim_j**: the mean pairwise cosine similarity of those samples' embeddings in a
  reference space (by default the backbone's own embeddings; pass any other encoder's
  embeddings of the same samples as ``reference``). Samples where the latent is silent
  are not counted, and a latent with fewer than two active samples gets NaN.
- **WinRate of A over B**: each method's latents are sorted by activation frequency,
  most frequent first, and compared rank by rank. The WinRate is the share of compared
  ranks where EmbSim under A exceeds EmbSim under B. A tie counts one half, and a rank
  with NaN on either side is left out.
- **Random baseline**: the EmbSim of m samples drawn uniformly at random, once per latent.
- **Feature name**: the vocabulary entries whose text embeddings are nearest (cosine) to
  the latent's decoder direction.

Samples are indexed as in the store: ``0..n-1`` are the images of pairs ``0..n-1`` and,
for pooled measures, ``n..2n-1`` are their captions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mmono_features.stats import bootstrap_ci

logger = logging.getLogger(__name__)

DEFAULT_M_SWEEP = (10, 20, 50)
SOURCES = ("image", "text", "pooled")
NAME_TEMPLATE = "a photo of {}."


def top_activating(latents: torch.Tensor, m: int, latent_ids: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the top-m activations and sample indices of each latent.

    Parameters
    ----------
    latents : Tensor, shape (n_samples, d_sae)
    m : int
        Samples per latent; capped at ``n_samples``.
    latent_ids : sequence of int, optional
        Latents to look at (default all).

    Returns
    -------
    values, indices : Tensors of shape (n_latents, m)
        Best first. Entries whose value is 0 are samples where the latent is silent.
    """
    if m <= 0:
        raise ValueError(f"m must be positive; got {m}.")
    if latent_ids is not None:
        latents = latents[:, torch.as_tensor(list(latent_ids), dtype=torch.long)]
    m = min(m, latents.shape[0])
    values, indices = torch.topk(latents.T, m, dim=1)
    return values, indices


def pooled_latents(image_latents: torch.Tensor, text_latents: torch.Tensor) -> torch.Tensor:
    """Stack image and text latents (n, d_sae) each into one (2n, d_sae) sample axis."""
    if image_latents.shape != text_latents.shape:
        raise ValueError(f"image and text latents must have the same shape; got {tuple(image_latents.shape)} and {tuple(text_latents.shape)}.")
    return torch.cat([image_latents, text_latents], dim=0)


def mean_pairwise_cosine(embeddings: torch.Tensor) -> float:
    """Return the mean cosine over distinct pairs of rows of (m, d); NaN when m < 2."""
    m = embeddings.shape[0]
    if m < 2:
        return float("nan")
    unit = embeddings.float() / embeddings.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    total = unit.sum(dim=0)
    # sum_{a != b} <u_a, u_b> = ||sum u||^2 - sum ||u_a||^2, and each ||u_a|| is 1.
    pair_sum = float(total @ total) - m
    return pair_sum / (m * (m - 1))


def emb_sim(reference: torch.Tensor, indices: torch.Tensor, values: torch.Tensor | None = None) -> np.ndarray:
    """EmbSim of each latent from its top-sample indices.

    Parameters
    ----------
    reference : Tensor, shape (n_samples, d_ref)
        Embedding of every sample in the reference space.
    indices : Tensor, shape (n_latents, m)
        Top-sample indices from :func:`top_activating`.
    values : Tensor, shape (n_latents, m), optional
        Their activations; samples with value <= 0 are left out.

    Returns
    -------
    ndarray, shape (n_latents,)
    """
    result = np.full(indices.shape[0], np.nan)
    for row in range(indices.shape[0]):
        ids = indices[row]
        if values is not None:
            ids = ids[values[row] > 0]
        result[row] = mean_pairwise_cosine(reference[ids])
    return result


def random_baseline_emb_sim(reference: torch.Tensor, m: int, n_latents: int, seed: int = 0) -> np.ndarray:
    """EmbSim of ``n_latents`` draws of m uniformly random samples, shape (n_latents,)."""
    generator = torch.Generator().manual_seed(seed)
    m = min(m, reference.shape[0])
    result = np.empty(n_latents)
    for row in range(n_latents):
        ids = torch.randperm(reference.shape[0], generator=generator)[:m]
        result[row] = mean_pairwise_cosine(reference[ids])
    return result


@dataclass(frozen=True)
class WinRate:
    """A WinRate with its bootstrap 95% interval and the number of compared ranks."""

    value: float
    ci_low: float
    ci_high: float
    n_compared: int


def win_rate(
    emb_sim_a: np.ndarray,
    emb_sim_b: np.ndarray,
    frequency_a: np.ndarray | None = None,
    frequency_b: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> WinRate:
    """WinRate of method A over method B, compared rank by rank by activation frequency.

    Parameters
    ----------
    emb_sim_a, emb_sim_b : ndarray, shapes (n_a,), (n_b,)
        EmbSim of each latent of A and B.
    frequency_a, frequency_b : ndarray, optional
        Activation frequency of each latent; when absent the given orders are compared
        as they are (e.g. a latent against its own random baseline).
    """
    a = np.asarray(emb_sim_a, dtype=float)
    b = np.asarray(emb_sim_b, dtype=float)
    if frequency_a is not None:
        a = a[np.argsort(-np.asarray(frequency_a), kind="stable")]
    if frequency_b is not None:
        b = b[np.argsort(-np.asarray(frequency_b), kind="stable")]
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    keep = ~(np.isnan(a) | np.isnan(b))
    wins = np.where(a[keep] > b[keep], 1.0, np.where(a[keep] == b[keep], 0.5, 0.0))
    if wins.size == 0:
        return WinRate(float("nan"), float("nan"), float("nan"), 0)
    low, high = bootstrap_ci(wins, n_boot=n_boot, seed=seed)
    return WinRate(float(wins.mean()), float(low), float(high), int(wins.size))


def interpretability_table(
    image_latents: torch.Tensor,
    text_latents: torch.Tensor,
    image_reference: torch.Tensor,
    text_reference: torch.Tensor,
    ms: Sequence[int] = DEFAULT_M_SWEEP,
    sources: Sequence[str] = SOURCES,
    seed: int = 0,
) -> pd.DataFrame:
    """EmbSim of every latent and of its random baseline, for each m and sample source.

    Parameters
    ----------
    image_latents, text_latents : Tensor, shape (n_pairs, d_sae)
    image_reference, text_reference : Tensor, shape (n_pairs, d_ref)
        Reference-space embeddings of the same images and captions (the backbone's own
        by default; captions and images must share the space for the pooled source).
    ms : sequence of int
        Top-m sizes of the sweep.
    sources : sequence of str
        ``image``, ``text`` and/or ``pooled``.

    Returns
    -------
    DataFrame with columns latent, source, m, emb_sim, random_emb_sim, frequency.
    """
    for source in sources:
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}; got {source!r}.")
    frames = []
    n_latents = image_latents.shape[1]
    for source in sources:
        if source == "image":
            latents, reference = image_latents, image_reference
        elif source == "text":
            latents, reference = text_latents, text_reference
        else:
            latents = pooled_latents(image_latents, text_latents)
            reference = torch.cat([image_reference, text_reference], dim=0)
        frequency = (latents > 0).float().mean(dim=0).numpy()
        for m in ms:
            values, indices = top_activating(latents, m)
            frames.append(
                pd.DataFrame(
                    {
                        "latent": np.arange(n_latents),
                        "source": source,
                        "m": m,
                        "emb_sim": emb_sim(reference, indices, values),
                        "random_emb_sim": random_baseline_emb_sim(reference, m, n_latents, seed=seed + m),
                        "frequency": frequency,
                    }
                )
            )
    return pd.concat(frames, ignore_index=True)


def summarize_interpretability(table: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Mean EmbSim with a bootstrap interval and WinRate over random, per source and m."""
    rows = []
    for (source, m), part in table.groupby(["source", "m"], sort=True):
        values = part["emb_sim"].dropna().to_numpy()
        low, high = bootstrap_ci(values, n_boot=n_boot, seed=seed) if values.size else (np.nan, np.nan)
        versus_random = win_rate(part["emb_sim"].to_numpy(), part["random_emb_sim"].to_numpy(), n_boot=n_boot, seed=seed)
        rows.append(
            {
                "source": source,
                "m": int(m),
                "n_latents": int(values.size),
                "emb_sim": float(values.mean()) if values.size else np.nan,
                "emb_sim_ci_low": float(low),
                "emb_sim_ci_high": float(high),
                "win_rate_vs_random": versus_random.value,
                "win_rate_ci_low": versus_random.ci_low,
                "win_rate_ci_high": versus_random.ci_high,
            }
        )
    return pd.DataFrame(rows)


def default_vocabulary_path() -> Path:
    """Return ``assets/vocabulary/default.txt``."""
    from mmono_features.backbone import assets_dir

    return assets_dir() / "vocabulary" / "default.txt"


def load_vocabulary(path: str | Path | None = None) -> list[str]:
    """Read a word list, one entry per line (blank lines and ``#`` comments skipped).

    The default is the vocabulary built by ``evaluation/build_vocabulary.py``: the CLIP
    tokenizer's whole-word tokens and open_clip's ImageNet class names that are real
    English words.
    """
    path = Path(path) if path is not None else default_vocabulary_path()
    if not path.is_file():
        raise FileNotFoundError(f"vocabulary file {path} not found; pass a text file with one word or phrase per line.")
    words = []
    seen = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        word = line.strip()
        if word and not word.startswith("#") and word not in seen:
            seen.add(word)
            words.append(word)
    if not words:
        raise ValueError(f"vocabulary file {path} is empty; add one word or phrase per line.")
    return words


def vocabulary_cache_dir() -> Path:
    """Return the folder of cached vocabulary embeddings (``MMONO_CACHE`` or ~/.cache/mmono)."""
    import os

    return Path(os.environ.get("MMONO_CACHE", Path.home() / ".cache" / "mmono")) / "vocabulary"


def embed_vocabulary(
    backbone, words: Sequence[str], template: str = NAME_TEMPLATE, batch_size: int = 256, cache: bool = True
) -> torch.Tensor:
    """Embed each vocabulary entry in ``template`` with the backbone's text tower.

    With ``cache``, the result is stored as safetensors under :func:`vocabulary_cache_dir`,
    keyed by the backbone identity, the template and the words, and reused on later calls.

    Returns
    -------
    Tensor, shape (n_words, embed_dim), raw (not normalised) text embeddings.
    """
    import hashlib
    import json

    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(json.dumps([backbone.identity(), template, list(words)], sort_keys=True).encode()).hexdigest()[:24]
    path = vocabulary_cache_dir() / f"{key}.safetensors"
    if cache and path.is_file():
        return load_file(str(path))["embeddings"]
    embeddings = _embed_words(backbone, words, template, batch_size)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"embeddings": embeddings.contiguous()}, str(tmp))
        tmp.replace(path)
    return embeddings


def _embed_words(backbone, words: Sequence[str], template: str, batch_size: int) -> torch.Tensor:
    from mmono_features.progress import progress

    chunks = []
    starts = range(0, len(words), batch_size)
    for start in progress(starts, total=len(starts), desc="vocabulary"):
        batch = [template.format(word) for word in words[start : start + batch_size]]
        chunks.append(backbone.encode_texts(batch).cpu())
    return torch.cat(chunks, dim=0)


def name_latents(
    dictionary,
    words: Sequence[str],
    word_embeddings: torch.Tensor,
    latent_ids: Sequence[int] | None = None,
    top_n: int = 3,
) -> pd.DataFrame:
    """Name latents by the vocabulary entries nearest to their decoder directions.

    Parameters
    ----------
    dictionary : Dictionary
    words : sequence of str, length n_words
    word_embeddings : Tensor, shape (n_words, d_in)
        Raw text embeddings of ``words`` (see :func:`embed_vocabulary`); they are
        normalised as the dictionary's text inputs are.
    top_n : int
        Entries kept per latent.

    Returns
    -------
    DataFrame with columns latent, name (the nearest entry), names (top_n entries joined
    by ``"; "``), similarities (their cosines, joined likewise), similarity (the best).
    """
    if len(words) != word_embeddings.shape[0]:
        raise ValueError(f"{len(words)} words but {word_embeddings.shape[0]} embeddings; they must match.")
    with torch.no_grad():
        directions = dictionary.decoder_directions().detach().float().cpu()
        if latent_ids is not None:
            directions = directions[torch.as_tensor(list(latent_ids), dtype=torch.long)]
        text = dictionary.prepare(word_embeddings.float(), "text").cpu()
        text = text / text.norm(dim=1, keepdim=True).clamp_min(1e-12)
        similarity = directions @ text.T
        values, indices = torch.topk(similarity, min(top_n, len(words)), dim=1)
    ids = list(latent_ids) if latent_ids is not None else list(range(directions.shape[0]))
    rows = []
    for row, latent in enumerate(ids):
        names = [words[i] for i in indices[row].tolist()]
        sims = values[row].tolist()
        rows.append(
            {
                "latent": int(latent),
                "name": names[0],
                "names": "; ".join(names),
                "similarities": "; ".join(f"{s:.3f}" for s in sims),
                "similarity": float(sims[0]),
            }
        )
    return pd.DataFrame(rows)


def match_latents(directions_a: torch.Tensor, directions_b: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Match latents of two dictionaries one to one by decoder cosine (Hungarian method).

    Returns
    -------
    rows, cols, cosine : ndarrays
        Latent ``rows[i]`` of A is matched to latent ``cols[i]`` of B with ``cosine[i]``.
    """
    from scipy.optimize import linear_sum_assignment

    a = directions_a.float() / directions_a.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = directions_b.float() / directions_b.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    cosine = (a @ b.T).numpy()
    rows, cols = linear_sum_assignment(-cosine)
    return rows, cols, cosine[rows, cols]


def group_stability(
    dictionary_a,
    scores_a,
    dictionary_b,
    scores_b,
    min_cosine: float = 0.7,
    groups: Sequence[str] = ("ImgD", "TextD", "CrossD"),
) -> pd.DataFrame:
    """Jaccard overlap of each group between two dictionaries (e.g. two training seeds).

    Latents of B are mapped to A through the one-to-one matching of decoder directions;
    a pair whose cosine is below ``min_cosine`` counts as unmatched. For each group G,
    Jaccard = |G_A ∩ map(G_B)| / |G_A ∪ map(G_B)|, where an unmatched latent of B is a
    member of the union only.
    """
    rows_idx, cols_idx, cosine = match_latents(dictionary_a.decoder_directions().detach().cpu(), dictionary_b.decoder_directions().detach().cpu())
    b_to_a = {int(c): int(r) for r, c, s in zip(rows_idx, cols_idx, cosine) if s >= min_cosine}
    group_a = dict(zip(scores_a.table["latent"].astype(int), scores_a.table["group"]))
    group_b = dict(zip(scores_b.table["latent"].astype(int), scores_b.table["group"]))
    records = []
    for group in groups:
        members_a = {j for j, g in group_a.items() if g == group}
        members_b = [j for j, g in group_b.items() if g == group]
        mapped = {b_to_a[j] for j in members_b if j in b_to_a}
        unmatched = sum(1 for j in members_b if j not in b_to_a)
        union = len(members_a | mapped) + unmatched
        records.append(
            {
                "group": group,
                "size_a": len(members_a),
                "size_b": len(members_b),
                "intersection": len(members_a & mapped),
                "jaccard": len(members_a & mapped) / union if union else np.nan,
                "matched_fraction": float(np.mean(cosine >= min_cosine)),
            }
        )
    return pd.DataFrame(records)
