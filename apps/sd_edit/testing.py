"""Tiny Stable Diffusion pipelines for tests and offline demos, built from configs.

The text encoder of the tiny pipeline is not random. Its weights are converted from the
text tower of an open_clip model (by default the project's ``mmono-tiny``). The
consistency check of :mod:`apps.sd_edit.consistency` therefore passes for real, as it does
for SD 1.x and OpenAI's ViT-L-14. The tokenizer is written from open_clip's own BPE merges
file, so both sides turn a prompt into the same token ids.

Nothing here downloads anything; every part is built from a config with seeded random
weights, saved with ``save_pretrained`` and meant to be loaded back through
:func:`apps.sd_edit.pipeline.load_pipeline`.
"""

from __future__ import annotations

import gzip
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# open_clip's BPE file contains a header line, then merges. CLIP keeps the first
# 49152 - 256 - 2 of them so that bytes (256), byte+"</w>" (256), merges and the two
# special tokens make a vocabulary of 49408.
_N_MERGES = 49152 - 256 - 2
_START = "<|startoftext|>"
_END = "<|endoftext|>"


def _byte_alphabet() -> dict[int, str]:
    """Map every byte to a printable unicode character, as CLIP's byte-level BPE expects.

    Bytes that are already printable, non-space Latin-1 characters map to themselves. The
    remaining ones (controls, space, a few others) map, in byte order, to the code points
    from 256 upwards. The order of the returned dict is the order of the first 256
    vocabulary entries.
    """
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    mapping = {b: chr(b) for b in printable}
    spare = 256
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(spare)
            spare += 1
    ordered = {b: mapping[b] for b in printable}
    ordered.update({b: mapping[b] for b in range(256) if b not in ordered})
    return ordered


def _open_clip_bpe_file() -> Path:
    import open_clip.tokenizer as open_clip_tokenizer

    path = Path(open_clip_tokenizer.default_bpe())
    if not path.is_file():
        raise FileNotFoundError(f"open_clip's BPE merges file was not found at {path}; reinstall open_clip_torch.")
    return path


def write_clip_tokenizer(directory: str | Path, model_max_length: int = 77) -> Path:
    """Write a Hugging Face ``CLIPTokenizer`` whose ids equal open_clip's SimpleTokenizer's.

    The vocabulary is built from open_clip's BPE merges file in CLIP's order: the 256
    byte symbols, the same with the end-of-word suffix ``</w>``, one entry per merge, then
    the start and end tokens (ids 49406 and 49407).

    Parameters
    ----------
    directory : path
        Folder to write into (created); it receives ``vocab.json``, ``merges.txt`` and the
        tokenizer's own config files.
    model_max_length : int
        Context length of the tokenizer (77 for CLIP).

    Returns
    -------
    Path
        ``directory``.
    """
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(_open_clip_bpe_file()).read().decode("utf-8").split("\n")
    merges = lines[1 : _N_MERGES + 1]

    symbols = list(_byte_alphabet().values())
    tokens = symbols + [symbol + "</w>" for symbol in symbols]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += [_START, _END]
    vocab = {token: index for index, token in enumerate(tokens)}

    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(
        vocab=str(directory / "vocab.json"),
        merges=str(directory / "merges.txt"),
        model_max_length=model_max_length,
    )
    tokenizer.save_pretrained(directory)
    return directory


def text_tower_to_transformers(model: torch.nn.Module):
    """Convert an open_clip CLIP model's text tower into a ``transformers.CLIPTextModel``.

    The converted model's ``last_hidden_state`` equals open_clip's text tower output after
    ``ln_final`` and before ``text_projection``, token by token.

    Parameters
    ----------
    model : open_clip.CLIP
        A model with the standard text tower (``token_embedding``, ``positional_embedding``,
        ``transformer.resblocks``, ``ln_final``), pre-norm residual blocks without layer
        scale.

    Returns
    -------
    transformers.CLIPTextModel
        In eval mode, float32.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    blocks = model.transformer.resblocks
    width = int(model.token_embedding.weight.shape[1])
    first = blocks[0]
    activation = first.mlp.gelu
    # open_clip's QuickGELU is a class of its own; every other tower uses exact GELU.
    hidden_act = "quick_gelu" if type(activation).__name__ == "QuickGELU" else "gelu"
    if hidden_act == "gelu" and not isinstance(activation, torch.nn.GELU):
        raise ValueError(f"cannot convert a text tower with activation {type(activation).__name__}; only GELU and QuickGELU are supported.")
    config = CLIPTextConfig(
        vocab_size=int(model.token_embedding.weight.shape[0]),
        hidden_size=width,
        intermediate_size=int(first.mlp.c_fc.weight.shape[0]),
        num_hidden_layers=len(blocks),
        num_attention_heads=int(first.attn.num_heads),
        max_position_embeddings=int(model.positional_embedding.shape[0]),
        hidden_act=hidden_act,
        layer_norm_eps=float(model.ln_final.eps),
        projection_dim=int(model.text_projection.shape[1]),
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    state = {
        "embeddings.token_embedding.weight": model.token_embedding.weight,
        "embeddings.position_embedding.weight": model.positional_embedding,
        "final_layer_norm.weight": model.ln_final.weight,
        "final_layer_norm.bias": model.ln_final.bias,
    }
    for index, block in enumerate(blocks):
        prefix = f"encoder.layers.{index}."
        q_weight, k_weight, v_weight = block.attn.in_proj_weight.chunk(3, dim=0)
        q_bias, k_bias, v_bias = block.attn.in_proj_bias.chunk(3, dim=0)
        state.update(
            {
                prefix + "self_attn.q_proj.weight": q_weight,
                prefix + "self_attn.q_proj.bias": q_bias,
                prefix + "self_attn.k_proj.weight": k_weight,
                prefix + "self_attn.k_proj.bias": k_bias,
                prefix + "self_attn.v_proj.weight": v_weight,
                prefix + "self_attn.v_proj.bias": v_bias,
                prefix + "self_attn.out_proj.weight": block.attn.out_proj.weight,
                prefix + "self_attn.out_proj.bias": block.attn.out_proj.bias,
                prefix + "layer_norm1.weight": block.ln_1.weight,
                prefix + "layer_norm1.bias": block.ln_1.bias,
                prefix + "layer_norm2.weight": block.ln_2.weight,
                prefix + "layer_norm2.bias": block.ln_2.bias,
                prefix + "mlp.fc1.weight": block.mlp.c_fc.weight,
                prefix + "mlp.fc1.bias": block.mlp.c_fc.bias,
                prefix + "mlp.fc2.weight": block.mlp.c_proj.weight,
                prefix + "mlp.fc2.bias": block.mlp.c_proj.bias,
            }
        )
    text_encoder = CLIPTextModel(config)
    # Older transformers releases nest the text tower under ``text_model.``.
    prefix = "text_model." if any(key.startswith("text_model.") for key in text_encoder.state_dict()) else ""
    state = {prefix + name: tensor.detach().float().cpu().clone() for name, tensor in state.items()}
    missing, unexpected = text_encoder.load_state_dict(state, strict=False)
    # position_ids is a non-persistent buffer, so nothing may be missing.
    if missing or unexpected:
        raise RuntimeError(f"text tower conversion left missing keys {missing} and unexpected keys {unexpected}.")
    return text_encoder.eval()


def random_text_encoder(like, seed: int = 1):
    """Return a ``CLIPTextModel`` with the same config as ``like`` and other random weights."""
    from transformers import CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        other = CLIPTextModel(like.config)
    return other.eval()


def build_tiny_pipeline(
    directory: str | Path,
    backbone=None,
    sample_size: int = 8,
    seed: int = 0,
    text_encoder=None,
) -> Path:
    """Build and save a tiny ``StableDiffusionPipeline`` whose text encoder is ``backbone``'s.

    Parameters
    ----------
    directory : path
        Folder that receives the pipeline (``save_pretrained`` layout).
    backbone : mmono_features.backbone.Backbone, optional
        Source of the text encoder; ``load_backbone("mmono-tiny", device="cpu")`` by default.
    sample_size : int
        Latent side of the UNet; images are ``2 * sample_size`` pixels square (the tiny VAE
        downsamples once).
    seed : int
        Seed of the UNet's and the VAE's random weights.
    text_encoder : transformers.CLIPTextModel, optional
        Use this text encoder instead of the conversion of ``backbone`` (for mismatch
        tests).

    Returns
    -------
    Path
        ``directory``.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    if backbone is None:
        from mmono_features.backbone import load_backbone

        backbone = load_backbone("mmono-tiny", pretrained=None, device="cpu")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if text_encoder is None:
        text_encoder = text_tower_to_transformers(backbone.model)
    width = int(text_encoder.config.hidden_size)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=width,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=32,
            sample_size=2 * sample_size,
        )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    tokenizer_dir = write_clip_tokenizer(directory / "_tokenizer_build", model_max_length=int(text_encoder.config.max_position_embeddings))
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(directory, safe_serialization=True)
    for leftover in (tokenizer_dir).iterdir():
        leftover.unlink()
    tokenizer_dir.rmdir()
    logger.info("wrote a tiny Stable Diffusion pipeline (text width %d) to %s", width, directory)
    return directory


_COLOURS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple")
_THINGS = ("cat", "dog", "car", "house", "tree", "bird", "boat", "flower", "chair", "cup")
_PLACES = ("on a beach", "in a forest", "in the city", "on a table", "in the snow", "at night")


def tiny_captions(n: int, seed: int = 0) -> list[str]:
    """Return ``n`` short captions drawn (seeded) from a small grammar of colours, things and places."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.stack(
        [torch.randint(len(options), (n,), generator=generator) for options in (_COLOURS, _THINGS, _PLACES)], dim=1
    ).tolist()
    return [f"a {_COLOURS[c]} {_THINGS[t]} {_PLACES[p]}" for c, t, p in picks]


def tiny_embeddings(backbone, n_pairs: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Embed seeded noise images and :func:`tiny_captions` with ``backbone``.

    Returns
    -------
    image_z, text_z : Tensor, shape (n_pairs, embed_dim), raw float32
    captions : list of str
    """
    captions = tiny_captions(n_pairs, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    size = backbone.image_size
    pixels = torch.rand(n_pairs, 3, size, size, generator=generator)
    mean = torch.tensor(backbone.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.image_std).view(1, 3, 1, 1)
    image_z = backbone.encode_images((pixels - mean) / std).cpu()
    text_z = backbone.encode_texts(captions).cpu()
    return image_z, text_z, captions


def build_tiny_dictionary(
    directory: str | Path,
    backbone,
    image_z: torch.Tensor,
    text_z: torch.Tensor,
    d_sae: int = 64,
    k: int = 8,
    steps: int = 40,
    seed: int = 0,
):
    """Train a TopK dictionary on raw paired embeddings of ``backbone`` and save it.

    The dictionary records ``backbone.identity()``; it is saved into ``directory`` with
    ``save_pretrained`` and returned in eval mode on the CPU.
    """
    from mmono_features.dictionary import TrainConfig, make_config, train_dictionary

    config = make_config("topk", d_in=backbone.embed_dim, d_sae=d_sae, k=k, backbone=backbone.identity(), seed=seed)
    train_config = TrainConfig(n_steps=steps, batch_size=64, seed=seed, device="cpu")
    dictionary = train_dictionary((image_z, text_z), config, train_config).dictionary
    dictionary = dictionary.cpu().eval()
    dictionary.save_pretrained(directory)
    return dictionary


def build_tiny_scores(path: str | Path, dictionary, backbone, image_z: torch.Tensor, text_z: torch.Tensor):
    """Score the dictionary's MDS on the pairs and name each latent after its nearest word.

    The name of latent j is the colour or thing word whose normalised text embedding has
    the largest cosine with j's decoder direction (a tiny version of feature naming).

    Returns
    -------
    mmono_features.modality.Scores
        Also saved to ``path`` (CSV).
    """
    from mmono_features.modality import score_dictionary

    scores = score_dictionary(dictionary, image_z, text_z, min_active=5, n_boot=50)
    words = list(_COLOURS) + list(_THINGS)
    word_z = torch.nn.functional.normalize(backbone.encode_texts(words).cpu(), dim=-1)
    with torch.no_grad():
        similarity = dictionary.decoder_directions().detach().float().cpu() @ word_z.T
    scores.table["name"] = [words[i] for i in similarity.argmax(dim=1).tolist()]
    scores.save(path)
    return scores


@dataclass
class TinyEditSetup:
    """Paths and objects of a tiny, consistent pipeline + backbone + dictionary + scores."""

    root: Path
    pipeline_dir: Path
    dictionary_dir: Path
    scores_path: Path
    backbone: object
    dictionary: object
    scores: object


_SETUPS: dict[str, TinyEditSetup] = {}


def tiny_edit_setup(root: str | Path) -> TinyEditSetup:
    """Build (once per process and root) the tiny pipeline, dictionary and scores under ``root``.

    The backbone is ``mmono-tiny`` (seed 0) on the CPU; the pipeline's text encoder is its
    converted text tower.
    """
    from mmono_features.backbone import load_backbone

    root = Path(root)
    key = str(root.resolve())
    if key in _SETUPS:
        return _SETUPS[key]
    backbone = load_backbone("mmono-tiny", pretrained=None, device="cpu", seed=0)
    pipeline_dir = build_tiny_pipeline(root / "pipeline", backbone)
    image_z, text_z, _ = tiny_embeddings(backbone)
    dictionary = build_tiny_dictionary(root / "dictionary", backbone, image_z, text_z)
    scores = build_tiny_scores(root / "scores.csv", dictionary, backbone, image_z, text_z)
    setup = TinyEditSetup(root, pipeline_dir, root / "dictionary", root / "scores.csv", backbone, dictionary, scores)
    _SETUPS[key] = setup
    return setup
