"""Reconstruction metrics: PSNR and SSIM of videos in [-1, 1], per clip and averaged.

SSIM is the usual 11-tap Gaussian-window SSIM (Wang et al. 2004, K1 = 0.01, K2 = 0.03) per
frame on the data range 2, averaged over frames; PSNR is on the [0, 1] scale. Both are computed
in fp32 even under autocast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange


def _gaussian(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-x.pow(2) / (2 * sigma**2))
    return g / g.sum()  # (size,)


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """SSIM of each video, per frame with a Gaussian window, averaged over frames -> (B,).

    x, y: (B, C, T, H, W) in [-1, 1] (data range 2). Frames smaller than the window use the
    largest odd window that fits.
    """
    b, c = x.shape[:2]
    size = min(window, x.shape[-2], x.shape[-1])
    size -= 1 - size % 2
    g = _gaussian(size, sigma).to(x)
    kernel_h = g.view(1, 1, size, 1).expand(c, 1, size, 1)
    kernel_w = g.view(1, 1, 1, size).expand(c, 1, 1, size)

    def blur(z: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, C, H - size + 1, W - size + 1)
        return F.conv2d(F.conv2d(z, kernel_h, groups=c), kernel_w, groups=c)

    x = rearrange(x.float(), "b c t h w -> (b t) c h w")
    y = rearrange(y.float(), "b c t h w -> (b t) c h w")
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    # fp32 even under autocast: the variances are differences of near-equal blurs, which bf16
    # convolutions round to <= -c2 (SSIM inf, then NaN gradients)
    with torch.autocast(x.device.type, enabled=False):
        mx, my = blur(x), blur(y)
        vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    ssim_map = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    per_frame = ssim_map.mean(dim=(1, 2, 3))  # (B * T,)
    return rearrange(per_frame, "(b t) -> b t", b=b).mean(dim=1)  # (B,)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each video (B, C, T, H, W) in [-1, 1], on the [0, 1] scale -> (B,)."""
    mse = (x.float() - y.float()).pow(2).mean(dim=(1, 2, 3, 4)) / 4  # (B,)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def mean_psnr_ssim(
    videos: Sequence[torch.Tensor], recons: Sequence[torch.Tensor]
) -> tuple[float, float]:
    """Mean (PSNR, SSIM) over clips; NaN when there are none."""
    if not videos:
        return math.nan, math.nan
    p = [psnr(v[None], r[None]).item() for v, r in zip(videos, recons, strict=True)]
    s = [ssim(v[None], r[None]).item() for v, r in zip(videos, recons, strict=True)]
    return sum(p) / len(p), sum(s) / len(s)
