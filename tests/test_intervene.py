"""Known-answer tests for latent edits and interventions on a hand-built linear dictionary."""

import pandas as pd
import pytest
import torch
from torch import nn

from mmono_features.dictionary import Dictionary, DictionaryConfig, register_dictionary
from mmono_features.intervene import LatentEdit, edit_latents, intervene, intervene_raw, latent_delta
from mmono_features.modality import assign_groups


@register_dictionary("test-linear-relu-intervene")
class _LinearReLU(Dictionary):
    """a = ReLU(z W_enc^T + b_enc), z_hat = a W_dec + b_dec, with weights set by hand."""

    def __init__(self, config):
        super().__init__(config)
        self.W_enc = nn.Parameter(torch.zeros(config.d_sae, config.d_in))
        self.b_enc = nn.Parameter(torch.zeros(config.d_sae))
        self.W_dec = nn.Parameter(torch.zeros(config.d_sae, config.d_in))
        self.b_dec = nn.Parameter(torch.zeros(config.d_in))

    def encode(self, z):
        return torch.relu(z @ self.W_enc.T + self.b_enc)

    def decode(self, latents):
        return latents @ self.W_dec + self.b_dec

    def decoder_directions(self):
        return self.W_dec / self.W_dec.norm(dim=1, keepdim=True)


def _dictionary(seed=0):
    """d_in 4, d_sae 6, small-integer weights so that every product and sum is exact in float32."""
    dictionary = _LinearReLU(DictionaryConfig(kind="test-linear-relu-intervene", d_in=4, d_sae=6))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        dictionary.W_enc.copy_(torch.randint(-2, 3, (6, 4), generator=generator).float())
        dictionary.b_enc.copy_(torch.randint(-1, 2, (6,), generator=generator).float())
        dictionary.W_dec.copy_(torch.randint(-3, 4, (6, 4), generator=generator).float() / 4)
        dictionary.b_dec.copy_(torch.tensor([0.5, -0.25, 0.0, 1.0]))
    return dictionary


def _inputs(seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 4, (5, 4), generator=generator).float()


def test_empty_edit_is_an_exact_identity():
    dictionary = _dictionary()
    z = torch.randn(5, 4, generator=torch.Generator().manual_seed(2)) * 1.7  # arbitrary floats
    assert intervene(dictionary, z, LatentEdit()) is z
    assert intervene(dictionary, z, LatentEdit.suppress([0, 2], strength=0.0)) is z
    # Zeroing a latent that is silent on every row leaves a' == a, so the output is
    # computed but still equals z bit for bit.
    with torch.no_grad():
        dictionary.b_enc[5] = -1000.0
    out = intervene(dictionary, z, LatentEdit(zero=(5,)))
    assert out is not z
    assert torch.equal(out, z)


def test_zeroing_a_latent_subtracts_its_decoder_row():
    dictionary, z = _dictionary(), _inputs()
    latents = dictionary.encode(z).detach()
    j = int(latents.sum(dim=0).argmax())  # a latent that fires
    assert latents[:, j].abs().sum() > 0
    out = intervene(dictionary, z, LatentEdit(zero=(j,)))
    expected = z - latents[:, j : j + 1] * dictionary.W_dec[j].detach()
    assert torch.equal(out.detach(), expected)


def test_scale_add_and_keep_error_false():
    dictionary, z = _dictionary(), _inputs()
    latents = dictionary.encode(z).detach()
    W = dictionary.W_dec.detach()
    out = intervene(dictionary, z, LatentEdit(scale={1: 0.5}, add={2: 2.0}))
    expected = z + (-0.5 * latents[:, 1:2]) * W[1] + 2.0 * W[2]
    torch.testing.assert_close(out.detach(), expected, rtol=0, atol=1e-6)
    reconstruction = intervene(dictionary, z, LatentEdit(), keep_error=False)
    torch.testing.assert_close(reconstruction.detach(), latents @ W + dictionary.b_dec.detach())


def test_strength_zero_and_suppress():
    dictionary, z = _dictionary(), _inputs()
    assert LatentEdit.suppress([0, 3], strength=0.0).is_empty
    assert intervene(dictionary, z, LatentEdit.suppress([0, 3], strength=0.0)) is z
    assert LatentEdit.suppress([3, 0, 3], strength=1.0) == LatentEdit(zero=(0, 3))
    assert LatentEdit.suppress(torch.tensor([2]), strength=0.25).scale == {2: 0.75}
    assert LatentEdit.amplify([1], 1.0).is_empty
    assert LatentEdit.amplify([1], 2.5).scale == {1: 2.5}
    for bad in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="strength"):
            LatentEdit.suppress([0], strength=bad)
    with pytest.raises(ValueError, match="factor"):
        LatentEdit.amplify([0], -1.0)


def test_edit_latents_known_answer():
    latents = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 0.0, 2.0]])
    edit = LatentEdit(zero=(0,), scale={1: 3.0, 0: 5.0}, add={3: -1.0})
    out = edit_latents(latents, edit)
    assert out.tolist() == [[0.0, 6.0, 3.0, 3.0], [0.0, 3.0, 0.0, 1.0]]
    assert latents.tolist() == [[1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 0.0, 2.0]]  # input untouched
    assert edit_latents(latents, LatentEdit()) is latents


def test_composition():
    first = LatentEdit(scale={0: 2.0, 1: 0.5}, add={2: 1.0})
    second = LatentEdit(zero=(1,), scale={2: 3.0}, add={0: 1.0})
    combined = first.then(second)
    latents = torch.rand(3, 4)
    torch.testing.assert_close(edit_latents(latents, combined), edit_latents(edit_latents(latents, first), second))
    assert combined == (first | second)
    assert combined.zero == (1,)
    assert combined.scale == {0: 2.0, 2: 3.0}
    assert combined.add == {0: 1.0, 2: 3.0}
    # Suppressing twice at strength 0.5 leaves a quarter.
    assert LatentEdit.suppress([4], 0.5).then(LatentEdit.suppress([4], 0.5)).scale == {4: 0.25}
    # Amplify then zero is a zero.
    assert LatentEdit.amplify([4], 3.0).then(LatentEdit(zero=(4,))) == LatentEdit(zero=(4,))


def test_edits_are_frozen_and_hashable():
    edit = LatentEdit(zero=[2, 1, 2], scale={0: 0.5})
    assert edit.zero == (1, 2)
    with pytest.raises(AttributeError):
        edit.zero = ()
    with pytest.raises(TypeError):
        edit.scale[0] = 2.0
    assert hash(edit) == hash(LatentEdit(zero=(1, 2), scale={0: 0.5}))


@pytest.mark.parametrize(
    "kwargs",
    [{"zero": (-1,)}, {"zero": (1.5,)}, {"zero": ("3",)}, {"scale": {-2: 1.0}}, {"add": {1: float("inf")}}, {"scale": [1, 2]}],
)
def test_invalid_edits_are_rejected(kwargs):
    with pytest.raises(ValueError):
        LatentEdit(**kwargs)


def test_ids_beyond_d_sae_are_rejected():
    dictionary, z = _dictionary(), _inputs()
    with pytest.raises(ValueError, match=r"latent id 6.*d_sae=6"):
        intervene(dictionary, z, LatentEdit(zero=(6,)))
    with pytest.raises(ValueError, match=r"latent id 9.*d_sae=4"):
        edit_latents(torch.zeros(2, 4), LatentEdit(add={9: 1.0}))
    with pytest.raises(ValueError, match=r"shape \(batch, 4\)"):
        intervene(dictionary, torch.zeros(2, 3), LatentEdit(zero=(0,)))


def test_gradients_flow_through_intervene():
    dictionary = _dictionary()
    z = (torch.randn(8, 4) * 2).requires_grad_(True)
    out = intervene(dictionary, z, LatentEdit.suppress([0, 1, 2], strength=0.5))
    out.pow(2).sum().backward()
    assert z.grad is not None
    assert torch.isfinite(z.grad).all()
    assert z.grad.abs().sum() > 0
    # With keep_error=False the gradient goes only through the encoder.
    z.grad = None
    intervene(dictionary, z, LatentEdit(zero=(0,)), keep_error=False).sum().backward()
    assert z.grad is not None


def test_intervene_raw_prepares_first():
    dictionary = _dictionary()
    raw = torch.randn(3, 4) * 10
    edit = LatentEdit(zero=(1,))
    torch.testing.assert_close(intervene_raw(dictionary, raw, "text", edit), intervene(dictionary, dictionary.prepare(raw, "text"), edit))
    with pytest.raises(ValueError, match="modality"):
        intervene_raw(dictionary, raw, "audio", edit)


def test_latent_delta_is_a_decoder_row():
    dictionary = _dictionary()
    W = dictionary.W_dec.detach()
    delta = latent_delta(dictionary, LatentEdit(add={3: 2.0}), torch.zeros(6))
    assert delta.shape == (4,)
    torch.testing.assert_close(delta.detach(), 2.0 * W[3])
    latents = torch.rand(2, 6)
    delta = latent_delta(dictionary, LatentEdit(zero=(5,)), latents)
    torch.testing.assert_close(delta.detach(), -latents[:, 5:6] * W[5])
    assert torch.equal(latent_delta(dictionary, LatentEdit(), latents), torch.zeros(2, 4))


def test_from_group():
    table = pd.DataFrame(
        {
            "latent": [0, 1, 2, 3],
            "mds": [0.9, -0.9, 0.0, 0.1],
            "ci_low": [0.8, -1.0, -0.1, 0.0],
            "ci_high": [1.0, -0.8, 0.1, 0.2],
            "n_active": [50, 50, 50, 2],
            "frequency": [0.1] * 4,
        }
    )
    scores = assign_groups(table, rule="fixed", thresholds=(-0.5, 0.5), min_active=20)
    assert LatentEdit.from_group(scores, "ImgD") == LatentEdit(zero=(0,))
    assert LatentEdit.from_group(scores, "TextD", strength=0.5) == LatentEdit(scale={1: 0.5})
    assert LatentEdit.from_group(scores, "rare").zero == (3,)
    with pytest.raises(ValueError, match="group"):
        LatentEdit.from_group(scores, "image")


def test_real_topk_dictionary_round_trip():
    dictionary_api = pytest.importorskip("mmono_features.dictionary")
    if "topk" not in dictionary_api.list_kinds():
        pytest.skip("the topk dictionary kind is not registered")
    config = dictionary_api.TopKConfig(kind="topk", d_in=8, d_sae=16, k=3, seed=0)
    dictionary = dictionary_api.TopKSAE(config)
    z = dictionary.prepare(torch.randn(4, 8, generator=torch.Generator().manual_seed(3)), "image")
    assert intervene(dictionary, z, LatentEdit()) is z

    z = z.clone().requires_grad_(True)
    latents = dictionary.encode(z).detach()
    j = int(latents.sum(dim=0).argmax())
    out = intervene(dictionary, z, LatentEdit(zero=(j,)))
    expected = z.detach() - latents[:, j : j + 1] * dictionary.W_dec[j].detach()
    torch.testing.assert_close(out.detach(), expected, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert z.grad is not None
    assert torch.isfinite(z.grad).all()
