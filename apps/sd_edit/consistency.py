"""Checks that a pipeline, an open_clip model and a dictionary belong together.

Steering moves the pipeline's text hidden states along directions learned in an open_clip
model's joint space. That only means something when

1. the pipeline's text encoder *is* the open_clip model's text tower: its
   ``last_hidden_state`` (after the final layer norm) at the end-of-text token equals the
   open_clip tower's output before ``text_projection`` (true for SD 1.x, whose
   ``CLIPTextModel`` contains OpenAI ViT-L-14's text weights), and
2. the dictionary was trained on embeddings of that open_clip model (its
   ``config.backbone`` identity matches and ``d_in`` equals ``embed_dim``).

Both checks raise :class:`ConsistencyError` naming the two models when they disagree.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

PROBE_PROMPT = "a photo of a dog sitting on a red sofa"
MIN_COSINE = 0.99
IDENTITY_KEYS = ("name", "pretrained", "checkpoint_sha256")


class ConsistencyError(ValueError):
    """Raised when a pipeline, an open_clip model and a dictionary do not belong together (the edit is rejected)."""


@dataclass(frozen=True)
class TextTowerCheck:
    """Result of :func:`check_text_tower`.

    Attributes
    ----------
    cosine : float
        Cosine similarity of the two end-of-text hidden states.
    max_abs_diff : float
        Largest absolute difference between them.
    eot_position : int
        Position of the end-of-text token of the probe prompt.
    probe : str
        The probe prompt.
    """

    cosine: float
    max_abs_diff: float
    eot_position: int
    probe: str

    def to_dict(self) -> dict[str, Any]:
        return {"cosine": self.cosine, "max_abs_diff": self.max_abs_diff, "eot_position": self.eot_position, "probe": self.probe}


def _text_tower(model: torch.nn.Module) -> torch.nn.Module:
    for name in ("token_embedding", "positional_embedding", "transformer", "ln_final"):
        if not hasattr(model, name):
            raise ConsistencyError(
                f"open_clip model {type(model).__name__} has no attribute {name!r}: only the standard CLIP text tower "
                "(token embedding, transformer, ln_final, text_projection) can drive a Stable Diffusion text encoder."
            )
    pool = getattr(model, "text_pool_type", "argmax")
    if pool not in ("argmax", "eos"):
        raise ConsistencyError(
            f"open_clip model pools its text tower with {pool!r}; SD 1.x text conditioning matches only "
            "end-of-text pooling ('argmax' or 'eos')."
        )
    return model


def text_projection(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return the text projection of an open_clip model as ``(P, bias)``.

    The joint text embedding of a pooled hidden state ``h`` of shape (width,) is
    ``h @ P + bias``.

    Returns
    -------
    P : Tensor, shape (width, embed_dim), float32
    bias : Tensor of shape (embed_dim,) or None
    """
    projection = getattr(model, "text_projection", None)
    if isinstance(projection, torch.nn.Linear):
        bias = None if projection.bias is None else projection.bias.detach().float()
        return projection.weight.detach().float().T, bias
    if isinstance(projection, torch.Tensor) and projection.ndim == 2:
        return projection.detach().float(), None
    raise ConsistencyError(
        f"open_clip model {type(model).__name__} has no 2-D text_projection (got {type(projection).__name__}); "
        "steering needs the projection from the text hidden width to the joint space."
    )


@torch.no_grad()
def open_clip_text_hidden(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Run an open_clip text tower up to ``ln_final``, before pooling and projection.

    Parameters
    ----------
    model : open_clip.CLIP
    tokens : LongTensor, shape (batch, context_length)

    Returns
    -------
    Tensor, shape (batch, context_length, width), float32
    """
    tower = _text_tower(model)
    device = tower.token_embedding.weight.device
    cast_dtype = tower.transformer.get_cast_dtype() if hasattr(tower.transformer, "get_cast_dtype") else tower.token_embedding.weight.dtype
    tokens = tokens.to(device)
    x = tower.token_embedding(tokens).to(cast_dtype) + tower.positional_embedding.to(cast_dtype)
    x = tower.transformer(x, attn_mask=tower.attn_mask)
    return tower.ln_final(x).float()


def open_clip_eot_positions(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Return the pooled (end-of-text) position of each row of ``tokens``, shape (batch,)."""
    if getattr(model, "text_pool_type", "argmax") == "eos":
        return (tokens == model.text_eos_id).int().argmax(dim=-1)
    # The end-of-text id is the largest id of CLIP's vocabulary; argmax returns its first occurrence.
    return tokens.argmax(dim=-1)


def eot_positions(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Return the first position of ``eos_token_id`` in each row of ``input_ids``, shape (batch,).

    A row without it (a truncated prompt whose end token was cut) gets its last position.
    """
    hits = input_ids == eos_token_id
    first = hits.int().argmax(dim=-1)
    return torch.where(hits.any(dim=-1), first, torch.full_like(first, input_ids.shape[-1] - 1))


def tokenize_for_pipeline(pipeline: Any, prompts: list[str]) -> torch.Tensor:
    """Tokenize ``prompts`` as ``StableDiffusionPipeline.encode_prompt`` does, (batch, model_max_length)."""
    tokenizer = pipeline.tokenizer
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


@torch.no_grad()
def pipeline_text_hidden(pipeline: Any, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the pipeline text encoder's ``last_hidden_state`` and its token ids.

    Returns
    -------
    hidden : Tensor, shape (batch, model_max_length, hidden_size), float32 on the CPU
    input_ids : LongTensor, shape (batch, model_max_length)
    """
    input_ids = tokenize_for_pipeline(pipeline, prompts)
    encoder = pipeline.text_encoder
    hidden = encoder(input_ids.to(encoder.device)).last_hidden_state
    return hidden.float().cpu(), input_ids


def describe_pipeline(pipeline: Any) -> str:
    """One-line identity of a pipeline's text encoder for error messages."""
    config = pipeline.text_encoder.config
    source = getattr(config, "_name_or_path", "") or getattr(pipeline, "name_or_path", "") or "?"
    return f"pipeline text encoder {source!r} (CLIPTextModel, width {config.hidden_size}, {config.num_hidden_layers} layers)"


def describe_backbone(backbone: Any) -> str:
    """One-line identity of an mmono backbone for error messages."""
    identity = backbone.identity()
    return f"open_clip {identity.get('name')!r} / {identity.get('pretrained')!r} (checkpoint {identity.get('checkpoint_sha256')})"


def check_text_tower(
    pipeline: Any, backbone: Any, probe: str = PROBE_PROMPT, min_cosine: float = MIN_COSINE, max_abs_diff: float = 1e-3
) -> TextTowerCheck:
    """Check that the pipeline's text encoder is ``backbone``'s text tower.

    Both models embed ``probe``. Their end-of-text hidden states (after the final layer
    norm, before the text projection) must agree: cosine above ``min_cosine`` or largest
    absolute difference below ``max_abs_diff``. The token ids up to the end-of-text token must match
    too (two tokenizers that disagree mean two different models).

    Parameters
    ----------
    pipeline : diffusers.StableDiffusionPipeline
    backbone : mmono_features.backbone.Backbone
    probe : str
        Prompt embedded by both.

    Returns
    -------
    TextTowerCheck

    Raises
    ------
    ConsistencyError
        Different widths, token ids or hidden states; the message names both models.
    """
    model = backbone.model
    _text_tower(model)
    names = f"{describe_pipeline(pipeline)} vs {describe_backbone(backbone)}"
    projection, _ = text_projection(model)
    width = int(pipeline.text_encoder.config.hidden_size)
    if projection.shape[0] != width:
        raise ConsistencyError(
            f"text widths differ: {names}: the pipeline's hidden size is {width}, the open_clip text tower's is "
            f"{projection.shape[0]}. Use the open_clip model whose text tower the pipeline uses "
            "(ViT-L-14 / openai for SD 1.x)."
        )

    hidden, input_ids = pipeline_text_hidden(pipeline, [probe])
    pipeline_eot = int(eot_positions(input_ids, _eos_id(pipeline))[0])
    open_clip_tokens = backbone.tokenize([probe]).cpu()
    open_clip_eot = int(open_clip_eot_positions(model, open_clip_tokens)[0])
    if pipeline_eot != open_clip_eot or not torch.equal(
        input_ids[0, : pipeline_eot + 1], open_clip_tokens[0, : open_clip_eot + 1].to(input_ids.dtype)
    ):
        raise ConsistencyError(
            f"the tokenizers disagree on the probe prompt {probe!r}: {names}: pipeline ids "
            f"{input_ids[0, : pipeline_eot + 1].tolist()} vs open_clip ids {open_clip_tokens[0, : open_clip_eot + 1].tolist()}. "
            "The dictionary must come from the CLIP model whose text tower the pipeline uses."
        )

    reference = open_clip_text_hidden(model, open_clip_tokens).cpu()[0, open_clip_eot]
    candidate = hidden[0, pipeline_eot]
    cosine = float(torch.nn.functional.cosine_similarity(candidate, reference, dim=0))
    difference = float((candidate - reference).abs().max())
    result = TextTowerCheck(cosine=cosine, max_abs_diff=difference, eot_position=pipeline_eot, probe=probe)
    if not (cosine > min_cosine or difference < max_abs_diff):
        raise ConsistencyError(
            f"the pipeline's text encoder is not the open_clip model's text tower: {names}: end-of-text hidden "
            f"states on {probe!r} have cosine {cosine:.4f} (need > {min_cosine}) and max abs diff {difference:.4g}. "
            "Pass the open_clip model the pipeline was built on (--model ViT-L-14 --pretrained openai for SD 1.x) "
            "and a dictionary trained on its embeddings."
        )

    # The hidden state computed here, projected, must be what open_clip calls the text
    # embedding; otherwise the pseudo-inverse mapping would target the wrong space.
    _check_against_encode_text(model, open_clip_tokens, reference, names)
    logger.info("text tower check passed: cosine %.6f, max abs diff %.3g (%s)", cosine, difference, names)
    return result


def _check_against_encode_text(model: torch.nn.Module, tokens: torch.Tensor, pooled: torch.Tensor, names: str) -> None:
    projection, bias = text_projection(model)
    projected = pooled @ projection.cpu() + (0 if bias is None else bias.cpu())
    with torch.no_grad():
        expected = model.encode_text(tokens.to(projection.device)).float().cpu()[0]
    cosine = float(torch.nn.functional.cosine_similarity(projected, expected, dim=0))
    if cosine < 0.999:
        raise ConsistencyError(
            f"the open_clip text tower of {names} does not end in ln_final + text_projection at the end-of-text "
            f"token (cosine {cosine:.4f} with encode_text); this text tower layout is not supported for steering."
        )


def _eos_id(pipeline: Any) -> int:
    tokenizer = pipeline.tokenizer
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ConsistencyError("the pipeline's tokenizer has no eos_token_id; cannot find the end-of-text token.")
    return int(eos)


def check_dictionary_backbone(dictionary: Any, backbone: Any) -> None:
    """Check that ``dictionary`` was trained on embeddings of ``backbone``.

    The fields ``name``, ``pretrained`` and ``checkpoint_sha256`` of the dictionary's
    ``config.backbone`` must equal those of ``backbone.identity()``, and ``d_in`` must be
    ``backbone.embed_dim``.

    Raises
    ------
    ConsistencyError
        A missing or different identity, or a different width; the message shows both.
    """
    recorded = dict(getattr(dictionary.config, "backbone", {}) or {})
    current = backbone.identity()
    if not recorded:
        raise ConsistencyError(
            f"the dictionary records no backbone identity, so it cannot be matched to {describe_backbone(backbone)}. "
            "Train it with `mmono train` on a store extracted from that model (the identity is recorded then)."
        )
    different = {key: (recorded.get(key), current.get(key)) for key in IDENTITY_KEYS if recorded.get(key) != current.get(key)}
    if different:
        detail = ", ".join(f"{key}: dictionary {a!r} vs model {b!r}" for key, (a, b) in different.items())
        raise ConsistencyError(
            f"the dictionary was trained on another backbone ({detail}). Pass the open_clip model it was trained on "
            "(--model/--pretrained/--checkpoint), and one whose text tower the pipeline uses."
        )
    if int(dictionary.config.d_in) != int(backbone.embed_dim):
        raise ConsistencyError(
            f"the dictionary's d_in is {dictionary.config.d_in} but {describe_backbone(backbone)} has embed_dim "
            f"{backbone.embed_dim}; it was trained on another model's embeddings."
        )
