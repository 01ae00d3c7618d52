"""Tiny models from the registries' tiny sizes, a tiny text encoder and test videos, written once.

Every builder is deterministic: the same call gives the same weights.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from model.diffusion import FlowConfig, FlowMatching
from model.dit import DiT, DiTConfig, dit_config
from model.generate import VideoGenerator
from model.vae import VAE_SIZES, CausalVAE, VAEConfig

TEXT_DIM = 16
LATENT_CHANNELS = 4  # vae-tiny's
MAX_PIXELS = 64 * 64  # of tiny_generator
MULTIPLE = 16  # VAE spatial factor 8 x DiT patch 2
# config overrides that sample the tiny models in a second: 2 steps, 64x64, 9 frames at most
GENERATE = (
    "generate.steps=2",
    "generate.max_pixels=4096",
    "generate.max_frames=9",
    "generate.seed=3",
)


def tiny_dit_config(**overrides) -> DiTConfig:
    """``tessera-tiny`` (width 32, depth 2, 2 heads) over vae-tiny latents and TEXT_DIM text."""
    return dit_config(
        "tessera-tiny", **{"in_channels": LATENT_CHANNELS, "text_dim": TEXT_DIM, **overrides}
    )


def scramble(model: nn.Module, seed: int = 0) -> nn.Module:
    """Undo the zero init (weights ~ N(0, 0.2), norm scales ~ N(1, 0.2)) so every path
    contributes to the output: noise, text and guidance all matter. Returns ``model`` in eval."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_scale = "norm" in name and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if is_norm_scale else 0.0))
    return model.eval()


def tiny_dit(seed: int = 0, **overrides) -> DiT:
    """A scrambled ``tessera-tiny`` DiT (see :func:`scramble`), in eval mode."""
    return scramble(DiT(tiny_dit_config(**overrides)), seed)


def tiny_vae_config(**overrides) -> VAEConfig:
    return VAE_SIZES.config("vae-tiny", **overrides)


def tiny_vae(seed: int = 0) -> CausalVAE:
    """vae-tiny at its (seeded) init with non-identity latent statistics, in eval mode."""
    torch.manual_seed(seed)
    vae = CausalVAE(tiny_vae_config())
    vae.set_latent_stats(shift=0.1, scale=1.5)  # non-identity, so normalisation is exercised
    return vae.eval()


class TinyText(nn.Module):
    """Stand-in for ``model.text``: characters -> a fixed random embedding table, same interface."""

    def __init__(self, dim: int = TEXT_DIM, max_length: int = 8):
        super().__init__()
        self.dim, self.max_length = dim, max_length
        self.table = nn.Embedding(128, dim)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            self.table.weight.copy_(torch.randn(128, dim, generator=gen))
        self.calls = 0

    @torch.no_grad()
    def encode(self, texts):
        self.calls += 1
        ids = torch.zeros(len(texts), self.max_length, dtype=torch.long)
        mask = torch.zeros(len(texts), self.max_length, dtype=torch.bool)
        for i, text in enumerate(texts):
            codes = [ord(c) % 127 + 1 for c in text][: self.max_length]
            ids[i, : len(codes)] = torch.tensor(codes, dtype=torch.long)
            mask[i, : len(codes)] = True
        return self.table(ids) * mask[..., None], mask


def tiny_generator(**kwargs) -> VideoGenerator:
    """tiny_vae + tiny_dit + TinyText, at most 17 frames of MAX_PIXELS."""
    return VideoGenerator(
        tiny_vae(),
        tiny_dit(),
        TinyText(),
        FlowMatching(FlowConfig()),
        max_frames=17,
        max_pixels=MAX_PIXELS,
        **kwargs,
    )


def save_tiny_model(root) -> None:
    """A model directory (vae/ + dit/ + flow.json) of the tiny generator's models."""
    from model.generate import FLOW_CONFIG_NAME

    tiny_vae().save_pretrained(root / "vae")
    tiny_dit().save_pretrained(root / "dit")
    FlowConfig().to_json(root / "dit" / FLOW_CONFIG_NAME)


MINILM_DIM = 384  # the bundled text encoder's width (model.text "minilm")


def save_servable_model(root, seed: int = 0) -> None:
    """:func:`save_tiny_model` with a DiT over the real bundled text encoder (MiniLM, 384-dim),
    so a separate process (a scoring server) can load it with no stand-in: vae/ + dit/."""
    from model.generate import FLOW_CONFIG_NAME

    tiny_vae(seed).save_pretrained(root / "vae")
    tiny_dit(seed, text_dim=MINILM_DIM).save_pretrained(root / "dit")
    FlowConfig().to_json(root / "dit" / FLOW_CONFIG_NAME)


# --------------------------------------------------------------------------- videos


def random_video(*shape: int, seed: int = 0) -> torch.Tensor:
    """Uniform noise in [-1, 1] of ``shape``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=generator) * 2 - 1


def gradient_video(frames: int, height: int, width: int, batch: int | None = None) -> torch.Tensor:
    """(3, T, H, W) (or (B, 3, T, H, W)): horizontal and vertical ramps and a moving sine."""
    t = torch.linspace(0, 1, frames)[:, None, None]
    y = torch.linspace(-1, 1, height)[None, :, None]
    x = torch.linspace(-1, 1, width)[None, None, :]
    shape = (frames, height, width)
    video = torch.stack(
        [(0.8 * x).expand(shape), (0.8 * y).expand(shape), 0.6 * torch.sin(3 * x + 2 * y + 4 * t)]
    )  # (3, T, H, W)
    return video if batch is None else video.expand(batch, -1, -1, -1, -1).contiguous()


def wave_video(frames: int, height: int, width: int) -> torch.Tensor:
    """Low-frequency moving waves (1, 3, T, H, W), closer to real footage than white noise."""
    y = torch.linspace(0, 1, height)[:, None]
    x = torch.linspace(0, 1, width)[None, :]
    channels = [
        torch.stack(
            [
                0.5 * torch.sin(2 * math.pi * (1.3 * x + 0.7 * y + 0.1 * t + 0.3 * c))
                + 0.3 * torch.cos(2 * math.pi * (2 * y - 0.5 * x))
                for t in range(frames)
            ]
        )
        for c in range(3)
    ]
    return torch.stack(channels)[None]
