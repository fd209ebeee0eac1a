"""Sparse non-negative dictionaries over joint image-text embeddings.

Kinds (registry key -> config, class): ``topk`` -> TopKConfig, TopKSAE; ``relu`` ->
ReLUConfig, ReLUSAE; ``batchtopk`` -> BatchTopKConfig, BatchTopKSAE; ``matryoshka`` ->
MatryoshkaConfig, MatryoshkaSAE; ``ncl`` -> NCLConfig, NCLHead.
"""

from __future__ import annotations

from typing import Any

from mmono_features.dictionary.base import (
    Dictionary,
    DictionaryConfig,
    get_dictionary_class,
    list_kinds,
    load_dictionary,
    register_dictionary,
)
from mmono_features.dictionary.batchtopk import BatchTopKConfig, BatchTopKSAE
from mmono_features.dictionary.matryoshka import MatryoshkaConfig, MatryoshkaSAE
from mmono_features.dictionary.metrics import evaluate_dictionary
from mmono_features.dictionary.ncl import NCLConfig, NCLHead
from mmono_features.dictionary.relu import ReLUConfig, ReLUSAE
from mmono_features.dictionary.topk import TopKConfig, TopKSAE
from mmono_features.dictionary.train import TrainConfig, TrainResult, train_dictionary


def make_config(kind: str, d_in: int, d_sae: int, **options: Any) -> DictionaryConfig:
    """Build the config of dictionary ``kind`` with the kind's own options.

    Parameters
    ----------
    kind : str
        A registered kind (see :func:`list_kinds`).
    d_in, d_sae : int
        Embedding width and number of latents.
    **options
        Fields of the kind's config (``k``, ``l1_coefficient``, ``prefix_sizes``,
        ``shared_head``, ...) and of :class:`DictionaryConfig` (``center``,
        ``backbone``, ``seed``). An option the kind does not have raises ValueError
        listing the valid ones.

    Returns
    -------
    DictionaryConfig
        An instance of the kind's config class, validated.
    """
    import dataclasses

    config_class = get_dictionary_class(kind).config_class
    names = {f.name for f in dataclasses.fields(config_class)} - {"kind", "d_in", "d_sae"}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ValueError(f"options {unknown} do not apply to kind {kind!r}; valid options are {sorted(names)}.")
    return config_class(kind=kind, d_in=d_in, d_sae=d_sae, **options)


__all__ = [
    "BatchTopKConfig",
    "BatchTopKSAE",
    "Dictionary",
    "DictionaryConfig",
    "MatryoshkaConfig",
    "MatryoshkaSAE",
    "NCLConfig",
    "NCLHead",
    "ReLUConfig",
    "ReLUSAE",
    "TopKConfig",
    "TopKSAE",
    "TrainConfig",
    "TrainResult",
    "evaluate_dictionary",
    "get_dictionary_class",
    "list_kinds",
    "load_dictionary",
    "make_config",
    "register_dictionary",
    "train_dictionary",
]
