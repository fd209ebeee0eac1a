"""train_dictionary: options, schedule, determinism, history, and training from a FeatureStore."""

from __future__ import annotations

import pytest
import torch

from mmono_features.dictionary import TrainConfig, TrainResult, make_config, train_dictionary
from mmono_features.dictionary.train import _row_keys, _StoreData

METRIC_KEYS = {"mse", "fvu", "cosine", "l0", "dead_fraction"}


def _train(source, kind="topk", steps=12, seed=0, **options):
    config = make_config(kind, 32, 48, seed=seed, **({"k": 3} if kind in ("topk", "batchtopk", "matryoshka") else {}))
    train_config = TrainConfig(n_steps=steps, batch_size=64, lr=1e-2, warmup_steps=3, device="cpu", seed=seed, **options)
    return train_dictionary(source, config, train_config)


@pytest.fixture(scope="module")
def pairs(planted_maker):
    planted = planted_maker(n=400, noise=0.05)
    return planted.image, planted.text


def test_learning_rate_schedule_known_answer():
    config = TrainConfig(lr=1.0, warmup_steps=4, lr_decay_fraction=0.2, n_steps=20)
    rates = [config.learning_rate(step, 20) for step in range(20)]
    assert rates[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]
    # The last 4 steps fall linearly to 1/4 of the peak at the last step.
    assert rates[15] == 1.0
    assert rates[16:] == [1.0, 0.75, 0.5, 0.25]
    assert TrainConfig(lr=2.0, warmup_steps=0, lr_decay_fraction=0.0).learning_rate(0, 5) == 2.0


def test_steps_from_epochs():
    assert TrainConfig(epochs=2.0, batch_size=100).total_steps(250) == 5
    assert TrainConfig(n_steps=7).total_steps(10_000) == 7
    assert TrainConfig().total_steps(10) == 1000


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lr": 0.0}, "lr"),
        ({"batch_size": 0}, "batch_size"),
        ({"n_steps": 5, "epochs": 1.0}, "not both"),
        ({"n_steps": 0}, "n_steps"),
        ({"eval_fraction": 0.9}, "0.9"),
        ({"lr_decay_fraction": 1.0}, "lr_decay_fraction"),
        ({"warmup_steps": -1}, "warmup_steps"),
    ],
)
def test_invalid_train_config_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**options)


@pytest.mark.parametrize("kind", ["topk", "batchtopk", "matryoshka", "relu", "ncl"])
def test_same_seed_gives_identical_weights(pairs, kind):
    first = _train(pairs, kind, steps=6, log_every=0).dictionary.state_dict()
    second = _train(pairs, kind, steps=6, log_every=0).dictionary.state_dict()
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    other = _train(pairs, kind, steps=6, seed=1, log_every=0).dictionary.state_dict()
    assert not all(torch.equal(first[name], other[name]) for name in first)


def test_history_has_metrics_per_log_step(pairs):
    result = _train(pairs, steps=12, log_every=5)
    assert isinstance(result, TrainResult)
    assert [entry["step"] for entry in result.history] == [5, 10, 12]
    for entry in result.history:
        assert {"step", "samples", "lr", "loss", "train", "image", "text", "all"} <= set(entry)
        for modality in ("image", "text", "all"):
            assert set(entry[modality]) == METRIC_KEYS
    assert result.history[-1]["samples"] == 12 * 64
    assert not result.dictionary.training


def test_dimension_mismatch_and_bad_sources(pairs):
    image, text = pairs
    with pytest.raises(ValueError, match="d_in=16"):
        train_dictionary((image, text), make_config("topk", 16, 32, k=2), TrainConfig(n_steps=1, device="cpu"))
    with pytest.raises(ValueError, match="same width"):
        train_dictionary((image, text[:, :16]), make_config("topk", 32, 32, k=2), TrainConfig(n_steps=1, device="cpu"))
    with pytest.raises(ValueError, match="FeatureStore"):
        train_dictionary(object(), make_config("topk", 32, 32, k=2), TrainConfig(n_steps=1, device="cpu"))
    with pytest.raises(ValueError, match="TrainConfig"):
        train_dictionary((image, text), make_config("topk", 32, 32, k=2), {"n_steps": 1})


def test_sae_kinds_accept_unpaired_tensors(pairs):
    image, text = pairs
    result = _train((image, text[:150]), steps=4, log_every=0)
    assert result.history[-1]["all"]["l0"] <= 3


# -- training from a feature store -------------------------------------------


@pytest.fixture()
def store(tmp_path, pairs):
    from mmono_features.store import FeatureStore, StoreWriter

    image, text = pairs
    n = image.shape[0]
    writer = StoreWriter(
        tmp_path / "store", identity={"name": "planted", "pretrained": None, "checkpoint_sha256": None},
        preprocessing={"image_size": 32}, d=32, shard_size=100, source={"n_rows": n},
    )
    for index in range(4):
        rows = torch.arange(index * 100, (index + 1) * 100)
        writer.write_shard(index, image[rows], text[rows], rows)
    writer.finalize()
    return FeatureStore.open(tmp_path / "store")


@pytest.mark.parametrize("kind", ["topk", "ncl"])
def test_trains_from_a_store_without_loading_it_whole(store, monkeypatch, kind):
    def reject_full_read(*args, **kwargs):
        raise AssertionError("training must stream the store, not load a whole modality")

    monkeypatch.setattr(type(store), "embeddings", reject_full_read)
    result = _train(store, kind, steps=10, log_every=5, eval_fraction=0.1)
    assert result.dictionary.config.backbone["name"] == "planted"
    entry = result.history[-1]
    assert set(entry["all"]) == METRIC_KEYS
    if kind == "ncl":
        assert entry["retrieval"]["image_to_text"] > 1 / 40


def test_store_held_out_pairs_never_reach_training(store, pairs):
    data = _StoreData(store, TrainConfig(batch_size=64, eval_fraction=0.1, seed=3))
    image_eval, text_eval = data.eval_sets()
    assert image_eval.shape == text_eval.shape == (40, 32)
    image, text = pairs
    # The held-out sets are whole pairs of the store.
    matches = (image_eval[:, None, :] == image[None, :, :]).all(dim=2).nonzero()[:, 1]
    assert torch.equal(text[matches], text_eval)
    held_out_keys = _row_keys(torch.cat([image_eval, text_eval]), data._multipliers)
    seen = 0
    for z, _ in data.union_chunks(seed=5):
        assert not bool(torch.isin(_row_keys(z, data._multipliers), held_out_keys).any())
        seen += z.shape[0]
    assert seen == 2 * (400 - 40)
    seen_pairs = sum(image_z.shape[0] for image_z, _ in data.pair_chunks(seed=5))
    assert seen_pairs == 400 - 40
