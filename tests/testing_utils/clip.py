"""Tiny random CLIP models saved the way real ones are, for the real loading paths.

- :func:`save_tiny_hf_clip`: a ``transformers.CLIPModel`` (2 layers, width 32, 32x32 images,
  patch 8) with a byte-level ``CLIPTokenizer`` (every byte is a token, no merges) and a
  ``preprocessor_config.json``, written with ``save_pretrained``: load it with
  ``HFClipScorer.from_dir`` or ``CLIPModel.from_pretrained``.
- :func:`save_tiny_open_clip`: an open_clip model config (registered with
  ``open_clip.add_model_config``) and its random state dict: load it with
  ``OpenClipScorer.from_file`` or ``open_clip.create_model``.

Both are deterministic: the same arguments give the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

IMAGE_SIZE = 32
OPEN_CLIP_MODEL = "tessera-tiny-clip"
# open_clip's own tokenizer (SimpleTokenizer) has 49408 tokens and a context of 77.
OPEN_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {
        "image_size": IMAGE_SIZE,
        "layers": 1,
        "width": 32,
        "head_width": 16,
        "patch_size": 8,
    },
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def byte_level_clip_tokenizer():
    """A ``CLIPTokenizer`` whose vocabulary is the 256 byte-level symbols, each also with the
    end-of-word suffix, then ``<|startoftext|>`` and ``<|endoftext|>`` last (the highest ids,
    as in OpenAI's vocabulary). No merges: every character is a token."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), "<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[])


def save_tiny_hf_clip(
    path: str | Path,
    *,
    seed: int = 0,
    alignment: float = 0.8,
    image_size: int = IMAGE_SIZE,
    max_positions: int = 32,
    image_mean: tuple[float, float, float] | None = None,
    image_std: tuple[float, float, float] | None = None,
    preprocessor_config: bool = True,
) -> Path:
    """Write a tiny random CLIP to ``path`` (created) and return ``path``.

    A random CLIP's cosines straddle 0, where the conventions clamp. Unless ``alignment`` is 0
    the towers share their final LayerNorm bias (``alignment`` times a standard normal vector)
    and projection, so image–text cosines are positive (about 0.6 at the default 0.8) and still
    differ from pair to pair, as a trained CLIP's do; a negative ``alignment`` negates the text
    projection, making every cosine negative. ``max_positions`` is the text context (captions longer are truncated); ``image_mean`` /
    ``image_std`` go into ``preprocessor_config.json`` (OpenAI's constants by default), which
    ``preprocessor_config=False`` leaves out.
    """
    import torch
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = byte_level_clip_tokenizer()
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": max_positions,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": 8,
    }
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    bias = torch.randn(32) * abs(alignment)
    if alignment:
        with torch.no_grad():
            model.vision_model.post_layernorm.bias.copy_(bias)
            model.text_model.final_layer_norm.bias.copy_(bias)
            sign = 1.0 if alignment > 0 else -1.0
            model.text_projection.weight.copy_(sign * model.visual_projection.weight)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if preprocessor_config:
        extra = {k: list(v) for k, v in (("image_mean", image_mean), ("image_std", image_std)) if v}
        CLIPImageProcessorPil(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            **extra,
        ).save_pretrained(path)
    return path


def save_tiny_open_clip(path: str | Path, *, seed: int = 0) -> tuple[Path, str]:
    """Write ``<OPEN_CLIP_MODEL>.json`` (the model config) and ``weights.pt`` (a random state
    dict) to ``path``, register the config with open_clip, and return (weights, model name).

    Installs the test placeholder torchvision first (``no_torchvision``): open_clip imports it.
    """
    import torch

    from tests.testing_utils import no_torchvision

    no_torchvision.install()
    import open_clip

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = path / f"{OPEN_CLIP_MODEL}.json"
    config.write_text(json.dumps(OPEN_CLIP_CONFIG, indent=2))
    open_clip.add_model_config(config)
    torch.manual_seed(seed)
    model = open_clip.create_model(OPEN_CLIP_MODEL).eval()
    weights = path / "weights.pt"
    torch.save(model.state_dict(), weights)
    return weights, OPEN_CLIP_MODEL
