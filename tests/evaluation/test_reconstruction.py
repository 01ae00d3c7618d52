"""Reconstruction metrics: SSIM and PSNR of videos, also under bf16 autocast."""

import math

import pytest
import torch

from evaluation.reconstruction import mean_psnr_ssim, psnr, ssim


def test_ssim_and_psnr():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 3, 24, 20, generator=gen) * 2 - 1
    assert ssim(x, x) == pytest.approx(torch.ones(2), abs=1e-5)
    noisy = (x + 0.2 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
    assert (ssim(x, noisy) < 0.9).all()
    assert (ssim(x, noisy) > ssim(x, -x)).all()
    assert ssim(x[..., :5, :7], noisy[..., :5, :7]).shape == (2,)  # window shrinks
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as in bf16 training: still fp32 inside
        close = ssim(x, x + 0.01 * torch.randn(x.shape, generator=gen))
    assert close.dtype == torch.float32 and (close > 0.99).all() and (close <= 1).all()
    # PSNR on the [0, 1] scale: an error of 0.1 there (0.2 in [-1, 1]) is 20 dB.
    assert psnr(x, x + 0.2) == pytest.approx(torch.full((2,), 20.0), abs=1e-3)


def test_mean_over_clips_of_any_size():
    a, b = torch.zeros(3, 5, 8, 8), torch.full((3, 1, 12, 6), 0.2)
    mean_psnr, mean_ssim = mean_psnr_ssim([a, b], [a + 0.2, b])
    assert mean_psnr == pytest.approx((20.0 + 100.0) / 2, abs=1e-3)  # identical: the 1e-10 floor
    assert 0 < mean_ssim <= 1
    assert all(math.isnan(v) for v in mean_psnr_ssim([], []))  # NaN when there are no clips
