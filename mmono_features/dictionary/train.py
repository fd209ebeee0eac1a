"""One training entry point for every dictionary kind.

:func:`train_dictionary` takes a feature store or a pair of raw tensors, holds out a
share of the pairs for evaluation, and trains with Adam under a linear warm-up (and an
optional linear decay) of the learning rate.

- SAE kinds (``topk``, ``relu``, ``batchtopk``, ``matryoshka``) train on the union of the
  image and text embeddings, shuffled together, each normalised by
  ``dictionary.prepare`` (with the per-modality means when ``config.center``).
- ``ncl`` trains on the pairs (image i with caption i); ``batch_size`` counts pairs.

Data is streamed in batches: from a store through ``store.iter_batches`` (``iter_pairs``
for ``ncl``), from tensors by indexing, so peak memory does not grow with the data.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from mmono_features.dictionary.base import Dictionary, DictionaryConfig, get_dictionary_class
from mmono_features.dictionary.metrics import evaluate_dictionary
from mmono_features.embeddings import modality_mean
from mmono_features.progress import progress

logger = logging.getLogger(__name__)

DEFAULT_STEPS = 1000
MODALITY_CODES = {"image": 0, "text": 1}


@dataclass(frozen=True)
class TrainConfig:
    """Options of :func:`train_dictionary`.

    Attributes
    ----------
    lr : float
        Peak learning rate of Adam.
    batch_size : int
        Embeddings per step (pairs per step for ``ncl``).
    n_steps : int, optional
        Optimiser steps. Give ``n_steps`` or ``epochs``, not both; with neither,
        1000 steps.
    epochs : float, optional
        Passes over the training split (rounded up to whole steps).
    warmup_steps : int
        Steps of linear learning-rate warm-up from 0.
    lr_decay_fraction : float
        Final share of the steps over which the learning rate falls linearly to 0,
        in [0, 1) (0: no decay).
    seed : int
        Seed of the held-out split and the batch order.
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"mps"``.
    log_every : int
        Steps between evaluations on the held-out split (0: only after the last step).
    eval_fraction : float
        Share of the pairs held out for evaluation, in [0, 0.5].
    max_eval : int
        Upper bound on the held-out pairs.
    eval_batch_size : int
        Embeddings encoded at once in evaluation.
    dead_after_samples : int
        A latent that has not fired on this many training embeddings is dead and feeds
        the auxiliary loss of the TopK kinds (the TopK paper uses 10M tokens).
    init_samples : int
        Training embeddings whose geometric median initialises ``b_dec``; for ``ncl``,
        the embeddings on which the decoder is refitted at each log step.
    adam_betas : tuple of float
    adam_eps : float
    max_grad_norm : float, optional
        Clip the global gradient norm to this value (None: no clipping).
    """

    lr: float = 4e-4
    batch_size: int = 4096
    n_steps: int | None = None
    epochs: float | None = None
    warmup_steps: int = 100
    lr_decay_fraction: float = 0.2
    seed: int = 0
    device: str = "auto"
    log_every: int = 100
    eval_fraction: float = 0.05
    max_eval: int = 2048
    eval_batch_size: int = 1024
    dead_after_samples: int = 1_000_000
    init_samples: int = 8192
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite number; got {self.lr!r}.")
        for name in ("batch_size", "max_eval", "eval_batch_size", "dead_after_samples", "init_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}.")
        for name in ("warmup_steps", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0; got {value!r}.")
        if self.n_steps is not None and self.epochs is not None:
            raise ValueError(f"give n_steps or epochs, not both; got n_steps={self.n_steps!r}, epochs={self.epochs!r}.")
        if self.n_steps is not None and (not isinstance(self.n_steps, int) or self.n_steps < 1):
            raise ValueError(f"n_steps must be a positive integer; got {self.n_steps!r}.")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs must be > 0; got {self.epochs!r}.")
        if not 0.0 <= self.lr_decay_fraction < 1.0:
            raise ValueError(f"lr_decay_fraction must be in [0, 1); got {self.lr_decay_fraction!r}.")
        if not 0.0 <= self.eval_fraction <= 0.5:
            raise ValueError(f"eval_fraction must be in [0, 0.5]; got {self.eval_fraction!r}.")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None; got {self.max_grad_norm!r}.")
        if len(self.adam_betas) != 2 or not all(0.0 <= beta < 1.0 for beta in self.adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1); got {self.adam_betas!r}.")
        object.__setattr__(self, "adam_betas", tuple(self.adam_betas))

    def to_dict(self) -> dict[str, Any]:
        """Return the config as a JSON-serialisable dict."""
        data = dataclasses.asdict(self)
        data["adam_betas"] = list(self.adam_betas)
        return data

    def total_steps(self, n_train: int) -> int:
        """Number of optimiser steps for a training split of ``n_train`` items."""
        if self.n_steps is not None:
            return self.n_steps
        if self.epochs is not None:
            return max(1, math.ceil(self.epochs * n_train / self.batch_size))
        return DEFAULT_STEPS

    def learning_rate(self, step: int, n_steps: int) -> float:
        """Learning rate at 0-based ``step`` of ``n_steps``: linear warm-up, then constant, then linear decay."""
        factor = 1.0
        if self.warmup_steps > 0:
            factor = min(factor, (step + 1) / self.warmup_steps)
        n_decay = int(round(self.lr_decay_fraction * n_steps))
        if n_decay > 0 and step >= n_steps - n_decay:
            factor = min(factor, (n_steps - step) / n_decay)
        return self.lr * factor


@dataclass(frozen=True)
class TrainResult:
    """Output of :func:`train_dictionary`.

    Attributes
    ----------
    dictionary : Dictionary
        The trained dictionary, in eval mode.
    history : list of dict
        One entry per log step: ``step``, ``samples``, ``lr``, ``loss`` (mean training
        loss since the previous entry), ``train`` (means of the loss parts) and the
        held-out metrics of :func:`evaluate_dictionary` (``image``, ``text``, ``all``
        and, for ``ncl``, ``retrieval``).
    """

    dictionary: Dictionary
    history: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------
# Data sources
# ---------------------------------------------------------------------------


def _check_raw(name: str, z: Any) -> torch.Tensor:
    if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[0] == 0:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"{name} must be a tensor of shape (n, d_in) with n >= 1; got {shape}.")
    if not torch.is_floating_point(z):
        raise ValueError(f"{name} must be a floating-point tensor; got dtype {z.dtype}.")
    return z


def _n_eval(n: int, config: TrainConfig) -> int:
    return min(config.max_eval, int(math.floor(config.eval_fraction * n)))


class _TensorData:
    """Raw (image, text) tensors, split into training and held-out rows by a seeded permutation."""

    def __init__(self, image_z: torch.Tensor, text_z: torch.Tensor, config: TrainConfig) -> None:
        self.image = _check_raw("image_z", image_z)
        self.text = _check_raw("text_z", text_z)
        if self.image.shape[1] != self.text.shape[1]:
            raise ValueError(f"image_z and text_z must have the same width; got {self.image.shape[1]} and {self.text.shape[1]}.")
        self.d = self.image.shape[1]
        self.paired = self.image.shape[0] == self.text.shape[0]
        generator = torch.Generator().manual_seed(int(config.seed))
        if self.paired:
            order = torch.randperm(self.image.shape[0], generator=generator)
            n_eval = _n_eval(self.image.shape[0], config)
            self.image_eval_rows = self.text_eval_rows = order[:n_eval]
            self.image_rows = self.text_rows = order[n_eval:]
        else:
            image_order = torch.randperm(self.image.shape[0], generator=generator)
            text_order = torch.randperm(self.text.shape[0], generator=generator)
            n_image, n_text = _n_eval(self.image.shape[0], config), _n_eval(self.text.shape[0], config)
            self.image_eval_rows, self.image_rows = image_order[:n_image], image_order[n_image:]
            self.text_eval_rows, self.text_rows = text_order[:n_text], text_order[n_text:]
        if self.image_rows.numel() == 0 or self.text_rows.numel() == 0:
            raise ValueError("no training embeddings left after the held-out split; lower eval_fraction or add data.")
        self.chunk = config.batch_size

    @property
    def n_train(self) -> int:
        return int(self.image_rows.numel() + self.text_rows.numel())

    @property
    def n_train_pairs(self) -> int:
        return int(self.image_rows.numel())

    def eval_sets(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image[self.image_eval_rows], self.text[self.text_eval_rows]

    def union_chunks(self, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield one shuffled pass over the training embeddings of both modalities: (z_raw, modality codes)."""
        n_image = self.image_rows.numel()
        order = torch.randperm(self.n_train, generator=torch.Generator().manual_seed(seed))
        for start in range(0, self.n_train, self.chunk):
            ids = order[start : start + self.chunk]
            is_text = ids >= n_image
            device = self.image.device
            z = torch.empty(ids.numel(), self.d, dtype=self.image.dtype, device=device)
            # Index tensors are built on the CPU and moved, so the data may live on any device.
            z[(~is_text).to(device)] = self.image[self.image_rows[ids[~is_text]].to(device)]
            z[is_text.to(device)] = self.text[self.text_rows[ids[is_text] - n_image].to(self.text.device)].to(device)
            yield z, is_text.long()

    def pair_chunks(self, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield one shuffled pass over the training pairs: (image_raw, text_raw), row i the same pair."""
        if not self.paired:
            raise ValueError(
                f"ncl trains on pairs: image_z and text_z need the same number of rows (row i is pair i); "
                f"got {self.image.shape[0]} and {self.text.shape[0]}."
            )
        order = torch.randperm(self.n_train_pairs, generator=torch.Generator().manual_seed(seed))
        for start in range(0, self.n_train_pairs, self.chunk):
            rows = self.image_rows[order[start : start + self.chunk]]
            yield self.image[rows.to(self.image.device)], self.text[rows.to(self.text.device)]


def _row_keys(z: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
    # Exact, order-independent fingerprint of each row's float32 bits: integer
    # arithmetic wraps modulo 2^64, so the same row always gets the same key.
    bits = z.float().contiguous().view(torch.int32).long()
    return (bits * multipliers).sum(dim=1)


class _StoreData:
    """A FeatureStore, streamed.

    The held-out pairs are a seeded random subset of the store's rows, read once with
    ``iter_pairs``. Pair passes (``ncl``) skip them by row id. Union passes come from
    ``iter_batches``, which does not report row ids, so they skip every embedding whose
    exact float32 bit pattern is held out.
    """

    def __init__(self, store: Any, config: TrainConfig) -> None:
        for name in ("iter_batches", "iter_pairs", "rows", "n_pairs", "d"):
            if not hasattr(store, name):
                raise ValueError(
                    f"source must be a FeatureStore or a pair (image_z, text_z) of tensors; "
                    f"got {type(store).__name__} without {name!r}."
                )
        self.store = store
        self.d = int(store.d)
        self.n_pairs = int(store.n_pairs)
        self.chunk = config.batch_size

        generator = torch.Generator().manual_seed(int(config.seed))
        rows = store.rows
        order = torch.randperm(rows.numel(), generator=generator)
        self._eval_rows = torch.sort(rows[order[: _n_eval(self.n_pairs, config)]]).values
        self._multipliers = torch.randint(1, 2**62, (self.d,), generator=generator) | 1

        image, text = [], []
        n_found = 0
        if self._eval_rows.numel():
            for image_z, text_z, batch_rows in store.iter_pairs(config.batch_size, shuffle=False, normalize=False):
                is_held_out = torch.isin(batch_rows, self._eval_rows)
                image.append(image_z[is_held_out])
                text.append(text_z[is_held_out])
                n_found += int(is_held_out.sum())
                if n_found >= self._eval_rows.numel():
                    break
        self._eval = (torch.cat(image) if image else torch.zeros(0, self.d), torch.cat(text) if text else torch.zeros(0, self.d))
        self._eval_keys = torch.sort(_row_keys(torch.cat(self._eval), self._multipliers)).values

        self.n_train_pairs = self.n_pairs - int(self._eval_rows.numel())
        self.n_train = 2 * self.n_train_pairs
        if self.n_train_pairs < 1:
            raise ValueError("no training pairs left after the held-out split; lower eval_fraction or add data.")

    def eval_sets(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._eval

    def union_chunks(self, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for z, modality in self.store.iter_batches(self.chunk, shuffle=True, seed=seed, normalize=False):
            if self._eval_keys.numel():
                keep = ~torch.isin(_row_keys(z, self._multipliers), self._eval_keys)
                z, modality = z[keep], modality[keep]
            if z.shape[0]:
                yield z, modality.long()

    def pair_chunks(self, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for image_z, text_z, batch_rows in self.store.iter_pairs(self.chunk, shuffle=True, seed=seed, normalize=False):
            if self._eval_rows.numel():
                keep = ~torch.isin(batch_rows, self._eval_rows)
                image_z, text_z = image_z[keep], text_z[keep]
            if image_z.shape[0]:
                yield image_z, text_z


def _make_data(source: Any, config: TrainConfig):
    if isinstance(source, (tuple, list)):
        if len(source) != 2:
            raise ValueError(f"a tensor source must be a pair (image_z, text_z); got {len(source)} items.")
        return _TensorData(source[0], source[1], config)
    return _StoreData(source, config)


def _stream(chunks, batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless batches of exactly ``batch_size`` rows cut from successive ``chunks(epoch)`` passes."""
    pending: list[tuple[torch.Tensor, ...]] = []
    n_pending = 0
    epoch = 0
    while True:
        n_rows = 0
        for chunk in chunks(epoch):
            n, start = chunk[0].shape[0], 0
            n_rows += n
            while start < n:
                take = min(batch_size - n_pending, n - start)
                pending.append(tuple(part[start : start + take] for part in chunk))
                n_pending += take
                start += take
                if n_pending == batch_size:
                    yield tuple(torch.cat(parts) for parts in zip(*pending))
                    pending, n_pending = [], 0
        if n_rows == 0:
            raise ValueError("a pass over the training data yielded no embeddings; check the source and the held-out split.")
        epoch += 1


def _epoch_seed(seed: int, epoch: int) -> int:
    return (int(seed) * 1_000_003 + epoch * 7919 + 17) % (2**63 - 1)


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def _prepare(dictionary: Dictionary, z_raw: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
    """Normalise a mixed batch (batch, d_in) with each row's modality (0 image, 1 text)."""
    if not dictionary.config.center:
        # Without centring the normalisation is the same for both modalities.
        return dictionary.prepare(z_raw, "image")
    z = torch.empty(z_raw.shape, dtype=torch.float32, device=z_raw.device)
    for name, code in MODALITY_CODES.items():
        mask = modality == code
        if bool(mask.any()):
            z[mask] = dictionary.prepare(z_raw[mask], name)
    return z


def _check_config(config: DictionaryConfig, d: int) -> None:
    if not isinstance(config, DictionaryConfig):
        raise ValueError(f"config must be a DictionaryConfig (see make_config); got {type(config).__name__}.")
    if config.d_in != d:
        raise ValueError(f"config.d_in={config.d_in} does not match the embedding width {d} of the source; use d_in={d}.")


@torch.no_grad()
def _set_centers(dictionary: Dictionary, data, device: torch.device) -> None:
    sums = {name: torch.zeros(data.d, dtype=torch.float64) for name in MODALITY_CODES}
    counts = dict.fromkeys(MODALITY_CODES, 0)
    for z, modality in data.union_chunks(_epoch_seed(dictionary.config.seed, -1)):
        for name, code in MODALITY_CODES.items():
            mask = modality == code
            if bool(mask.any()):
                sums[name] += modality_mean(z[mask]).double() * int(mask.sum())
                counts[name] += int(mask.sum())
    for name in MODALITY_CODES:
        if counts[name] == 0:
            raise ValueError(f"center=True needs {name} embeddings in the training split; got none.")
    dictionary.image_center.copy_((sums["image"] / counts["image"]).float().to(device))
    dictionary.text_center.copy_((sums["text"] / counts["text"]).float().to(device))


def _initial_sample(dictionary: Dictionary, data, n: int, seed: int, device: torch.device) -> torch.Tensor:
    parts, total = [], 0
    for z_raw, modality in data.union_chunks(_epoch_seed(seed, -2)):
        parts.append(_prepare(dictionary, z_raw.to(device), modality.to(device)))
        total += parts[-1].shape[0]
        if total >= n:
            break
    return torch.cat(parts)[:n]


def _pair_batches_prepared(dictionary: Dictionary, data, seed: int, device: torch.device, limit: int | None = None):
    """Yield (normalised z, modality) from one pass over the training pairs, both modalities."""
    seen = 0
    for image_raw, text_raw in data.pair_chunks(seed):
        yield dictionary.prepare(image_raw.to(device), "image"), "image"
        yield dictionary.prepare(text_raw.to(device), "text"), "text"
        seen += image_raw.shape[0]
        if limit is not None and seen >= limit:
            return


def make_optimizer(dictionary: Dictionary, train_config: TrainConfig, device: torch.device) -> torch.optim.Adam:
    """Adam over the trainable parameters; the fused kernel on CPU and CUDA (several times faster on the CPU)."""
    fused = device.type in ("cpu", "cuda")
    return torch.optim.Adam(
        [p for p in dictionary.parameters() if p.requires_grad],
        lr=train_config.lr,
        betas=train_config.adam_betas,
        eps=train_config.adam_eps,
        fused=fused,
    )


def _optimizer_step(
    dictionary: Dictionary,
    optimizer: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, ...],
    step: int,
    dead: torch.Tensor,
    train_config: TrainConfig,
    device: torch.device,
):
    """One optimiser step on a raw batch; returns ``(StepOutput, n_embeddings)``.

    ``batch`` is ``(z_raw, modality_codes)`` for the SAE kinds and ``(image_raw,
    text_raw)`` pairs for ``ncl``.
    """
    if getattr(dictionary, "paired_training", False):
        image_z = dictionary.prepare(batch[0].to(device), "image")
        text_z = dictionary.prepare(batch[1].to(device), "text")
        output = dictionary.training_step(image_z, text_z, step)
        n_samples = 2 * image_z.shape[0]
    else:
        z = _prepare(dictionary, batch[0].to(device), batch[1].to(device))
        output = dictionary.training_step(z, step, dead)
        n_samples = z.shape[0]
    optimizer.zero_grad(set_to_none=True)
    output.loss.backward()
    dictionary.before_optimizer_step()
    if train_config.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(dictionary.parameters(), train_config.max_grad_norm)
    optimizer.step()
    dictionary.after_optimizer_step()
    return output, n_samples


def train_dictionary(source: Any, config: DictionaryConfig, train_config: TrainConfig) -> TrainResult:
    """Train a dictionary of ``config.kind`` on image and text embeddings.

    Parameters
    ----------
    source : FeatureStore or tuple of Tensor
        A feature store, or raw ``(image_z, text_z)`` tensors of shape (n, d_in) each,
        where row i of both is pair i. The SAE kinds also accept different row counts.
    config : DictionaryConfig
        The dictionary to build, e.g. from :func:`make_config`. When the source is a
        store and ``config.backbone`` is empty, the store's backbone identity is
        recorded.
    train_config : TrainConfig
        Optimisation, split and logging options.

    Returns
    -------
    TrainResult
        The trained dictionary (eval mode) and its metrics history.
    """
    if not isinstance(train_config, TrainConfig):
        raise ValueError(f"train_config must be a TrainConfig; got {type(train_config).__name__}.")
    from mmono_features.backbone import resolve_device

    device = resolve_device(train_config.device)
    data = _make_data(source, train_config)
    _check_config(config, data.d)
    identity = getattr(source, "backbone_identity", None)
    if not config.backbone and isinstance(identity, dict) and identity:
        config = dataclasses.replace(config, backbone=dict(identity))
    dictionary = get_dictionary_class(config.kind)(config)
    paired = bool(getattr(dictionary, "paired_training", False))
    if not hasattr(dictionary, "training_step"):
        raise ValueError(f"dictionary kind {config.kind!r} ({type(dictionary).__name__}) has no training_step; it cannot be trained here.")
    dictionary.to(device)
    if config.center:
        _set_centers(dictionary, data, device)

    n_train = data.n_train_pairs if paired else data.n_train
    n_steps = train_config.total_steps(n_train)
    seed = int(train_config.seed)
    logger.info(
        "training a %s dictionary (d_in=%d, d_sae=%d) for %d steps of %d on %d training %s, device %s",
        config.kind, config.d_in, config.d_sae, n_steps, train_config.batch_size, n_train,
        "pairs" if paired else "embeddings", device,
    )

    if paired:
        init_batches = list(_pair_batches_prepared(dictionary, data, _epoch_seed(seed, -2), device, train_config.init_samples))
        batches = _stream(lambda epoch: data.pair_chunks(_epoch_seed(seed, epoch)), train_config.batch_size)
    else:
        dictionary.initialize_from_data(_initial_sample(dictionary, data, train_config.init_samples, seed, device))
        batches = _stream(lambda epoch: data.union_chunks(_epoch_seed(seed, epoch)), train_config.batch_size)

    image_eval, text_eval = data.eval_sets()
    has_eval = image_eval.shape[0] > 0 and text_eval.shape[0] > 0
    optimizer = make_optimizer(dictionary, train_config, device)
    since_fired = torch.zeros(config.d_sae, dtype=torch.long, device=device)
    history: list[dict] = []
    loss_sum, terms_sum, n_logged, samples = 0.0, {}, 0, 0

    dictionary.train()
    for step in progress(range(n_steps), total=n_steps, desc=f"train {config.kind}", unit="step"):
        lr = train_config.learning_rate(step, n_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        output, n_samples = _optimizer_step(
            dictionary, optimizer, next(batches), step, since_fired >= train_config.dead_after_samples, train_config, device
        )
        since_fired += n_samples
        since_fired[output.fired] = 0
        samples += n_samples
        loss_value = float(output.loss.detach())
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"the training loss became {loss_value} at step {step}; lower lr (now {train_config.lr}).")
        loss_sum += loss_value
        for name, value in output.terms.items():
            terms_sum[name] = terms_sum.get(name, 0.0) + value
        n_logged += 1

        last = step == n_steps - 1
        if last or (train_config.log_every and (step + 1) % train_config.log_every == 0):
            if last:
                dictionary.finish_training(
                    _pair_batches_prepared(dictionary, data, _epoch_seed(seed, -3), device) if paired else None
                )
            elif paired:
                dictionary.fit_decoder(init_batches)
            entry = {
                "step": step + 1,
                "samples": samples,
                "lr": lr,
                "loss": loss_sum / n_logged,
                "train": {name: value / n_logged for name, value in terms_sum.items()},
                "dead_in_training": float((since_fired >= train_config.dead_after_samples).double().mean()),
            }
            if has_eval:
                entry.update(evaluate_dictionary(dictionary, image_eval, text_eval, batch_size=train_config.eval_batch_size))
                dictionary.train()
            history.append(entry)
            logger.info("step %d/%d: loss %.5g%s", step + 1, n_steps, entry["loss"],
                        f", held-out fvu {entry['all']['fvu']:.4g}, l0 {entry['all']['l0']:.3g}" if has_eval else "")
            loss_sum, terms_sum, n_logged = 0.0, {}, 0

    dictionary.eval()
    return TrainResult(dictionary, history)
