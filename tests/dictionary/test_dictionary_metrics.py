"""evaluate_dictionary on a hand-built dictionary, against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from mmono_features.dictionary import NCLHead, TopKSAE, evaluate_dictionary, make_config


def _identity_topk() -> TopKSAE:
    # d_in = d_sae = 2, k = 1, W_enc = W_dec = I, biases 0: each embedding keeps its
    # largest coordinate.
    dictionary = TopKSAE(make_config("topk", 2, 2, k=1))
    with torch.no_grad():
        dictionary.W_enc.copy_(torch.eye(2))
        dictionary.W_dec.copy_(torch.eye(2))
        dictionary.b_enc.zero_()
        dictionary.b_dec.zero_()
    return dictionary


def test_known_answers():
    dictionary = _identity_topk()
    # After normalisation to norm sqrt(2), images (sqrt2, 0) and (0, sqrt2) are
    # reconstructed exactly. Texts (2, 1) and (-1, 2) become sqrt(2/5) * (2, 1) and
    # sqrt(2/5) * (-1, 2), and their reconstructions drop the smaller coordinate
    # (squared error 2/5 each).
    image = torch.tensor([[5.0, 0.0], [0.0, 0.3]])
    text = torch.tensor([[2.0, 1.0], [-1.0, 2.0]])
    metrics = evaluate_dictionary(dictionary, image, text, batch_size=1)

    assert metrics["image"] == pytest.approx({"mse": 0.0, "fvu": 0.0, "cosine": 1.0, "l0": 1.0, "dead_fraction": 0.0})

    text_metrics = metrics["text"]
    assert text_metrics["mse"] == pytest.approx(0.8 / 4)  # 2 samples x 2 coordinates
    # Text mean sqrt(2/5) * (0.5, 1.5); deviations sqrt(2/5) * (+-1.5, -+0.5), each of
    # squared norm 2/5 * 2.5 = 1: total variance 2.
    assert text_metrics["fvu"] == pytest.approx(0.8 / 2.0)
    assert text_metrics["cosine"] == pytest.approx(2 / math.sqrt(5))
    assert text_metrics["l0"] == 1.0
    assert text_metrics["dead_fraction"] == 0.0

    # All four: sum ||z||^2 = 8; mean = (sqrt2 + sqrt(2/5) * (2 - 1), sqrt2 + sqrt(2/5) * (1 + 2)) / 4.
    s = math.sqrt(2 / 5)
    mean = ((math.sqrt(2) + s) / 4, (math.sqrt(2) + 3 * s) / 4)
    variance = 8 - 4 * (mean[0] ** 2 + mean[1] ** 2)
    assert metrics["all"]["fvu"] == pytest.approx(0.8 / variance)
    assert metrics["all"]["mse"] == pytest.approx(0.8 / 8)
    assert metrics["all"]["cosine"] == pytest.approx((2 + 2 * 2 / math.sqrt(5)) / 4)


def test_dead_fraction_counts_silent_latents():
    dictionary = _identity_topk()
    # Only latent 0 ever wins the top-1: half of the latents are dead.
    image = torch.tensor([[3.0, 1.0], [2.0, -1.0]])
    metrics = evaluate_dictionary(dictionary, image, image.clone())
    assert metrics["image"]["dead_fraction"] == 0.5
    assert metrics["all"]["dead_fraction"] == 0.5


def test_ncl_retrieval_known_answer():
    head = NCLHead(make_config("ncl", 3, 3))
    with torch.no_grad():
        head.W_enc.copy_(torch.eye(3))
        head.b_enc.zero_()
    # Codes are ReLU(z), compared by cosine. Image 0 is nearer text 2 (cos 0.9988) than
    # text 0 (0.9950); image 1 finds text 1; image 2 = (0, 0.2, 1) is nearer text 1
    # (0.196) than text 2 (0.049). Texts 0 and 1 find their images; text 2 finds image 0.
    image = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.2, 1.0]])
    text = torch.tensor([[1.0, 0.1, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.05]])
    metrics = evaluate_dictionary(head, image, text, batch_size=2)
    assert metrics["retrieval"]["image_to_text"] == pytest.approx(1 / 3)
    assert metrics["retrieval"]["text_to_image"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("bad", [torch.zeros(0, 2), torch.zeros(3, 5), torch.zeros(2)])
def test_bad_inputs_rejected(bad):
    with pytest.raises(ValueError, match="image_z"):
        evaluate_dictionary(_identity_topk(), bad, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_dictionary(_identity_topk(), torch.ones(2, 2), torch.ones(2, 2), batch_size=0)
