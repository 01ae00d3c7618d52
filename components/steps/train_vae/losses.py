"""The VAE's objective: reconstruction losses over each sample's valid region, an optional
TorchScript LPIPS, and the 3D patch discriminator of the adversarial term."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from einops import rearrange
from torch import nn

from evaluation.reconstruction import ssim
from model.vae import CausalVAE

# --------------------------------------------------------------------------- losses


class PatchDiscriminator3D(nn.Module):
    """3D PatchGAN: video (B, 3, T, H, W) -> real/fake logits (B, 1, T, H/8, W/8).

    Strided in space only, so a single frame (an image) is a valid input.
    """

    def __init__(self, in_channels: int = 3, channels: int = 32, levels: int = 3):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv3d(in_channels, channels, (3, 4, 4), stride=(1, 2, 2), padding=1),
            nn.LeakyReLU(0.2),
        ]
        c = channels
        for _ in range(levels - 1):
            layers += [
                nn.Conv3d(c, 2 * c, (3, 4, 4), stride=(1, 2, 2), padding=1),
                nn.GroupNorm(math.gcd(8, 2 * c), 2 * c),
                nn.LeakyReLU(0.2),
            ]
            c *= 2
        layers.append(nn.Conv3d(c, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.net(video)  # (B, 1, T, H / 2^levels, W / 2^levels)


def load_lpips(path: str) -> torch.jit.ScriptModule:
    """A TorchScript perceptual distance ``f(x, y)``: (N, 3, H, W) pairs in [-1, 1] -> distances.

    Export one from the ``lpips`` package with ``torch.jit.trace`` (nothing is downloaded here).
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"train_vae.lpips_weights={path!r} does not exist. Point it at a TorchScript LPIPS "
            "module (torch.jit.trace of lpips.LPIPS(net='vgg') on two (N, 3, H, W) inputs in "
            "[-1, 1]), or set train_vae.lpips_weights='' to train without the LPIPS term"
        )
    module = torch.jit.load(str(file), map_location="cpu").eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def reconstruction_losses(
    x: torch.Tensor, recon: torch.Tensor, valid: torch.Tensor, perceptual: nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """Mean L1, SSIM and (optionally) LPIPS over the valid region of each sample.

    x, recon: (B, C, T, H, W); valid: (B, 3) real (frames, height, width) at the front.
    """
    l1, sim, lp = [], [], []
    for b, (t, h, w) in enumerate(valid.tolist()):
        xb, rb = x[b : b + 1, :, :t, :h, :w], recon[b : b + 1, :, :t, :h, :w]  # (1, C, t, h, w)
        l1.append((xb - rb).abs().mean())
        sim.append(ssim(xb, rb)[0])
        if perceptual is not None:
            flat = "b c t h w -> (b t) c h w"
            lp.append(perceptual(rearrange(xb, flat), rearrange(rb, flat)).mean())
    out = {"l1": torch.stack(l1).mean(), "ssim": torch.stack(sim).mean()}
    if perceptual is not None:
        out["lpips"] = torch.stack(lp).mean()
    return out


@torch.no_grad()
def reconstruct(
    vae: CausalVAE, video: torch.Tensor, chunk_latent_frames: int | None = None
) -> torch.Tensor:
    """Posterior-mode reconstruction of one video (3, T, H, W), any size -> same shape."""
    param = next(vae.parameters())  # a bf16 DeepSpeed engine holds bf16 weights
    posterior, meta = vae.encode_video(
        video[None].to(param.device, param.dtype), chunk_latent_frames=chunk_latent_frames
    )
    recon = vae.decode_video(posterior.mode(), meta, chunk_latent_frames=chunk_latent_frames)
    return recon[0].float().cpu()
