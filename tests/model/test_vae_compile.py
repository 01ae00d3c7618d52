"""torch.compile of the VAE's ResBlocks: same numbers as eager, chunked encode still exact."""

from __future__ import annotations

import pytest
import torch

from components.core import compile as compiling
from model.vae import CausalVAE, ResBlock, build_vae


def _tiny_vae() -> CausalVAE:
    torch.manual_seed(0)
    return build_vae("vae-tiny").train()


def _video() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 5, 16, 16, generator=gen) * 2 - 1  # (B, C, T, H, W) in [-1, 1]


def _loss_and_grads(vae: CausalVAE) -> tuple[torch.Tensor, list[torch.Tensor]]:
    video = _video()
    recon, posterior = vae(video, sample=False)
    loss = (recon - video).abs().mean() + 1e-3 * posterior.kl().mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in vae.parameters()]


def test_resblocks_are_the_regions_and_off_stays_eager():
    vae = _tiny_vae()
    info = compiling.compile_regions(vae, "off", "cpu")
    assert not info["compiled"] and info["regions"] == []
    blocks = [m for m in vae.modules() if isinstance(m, ResBlock)]
    assert blocks and all(m.compile_regions == ("whole_clip",) for m in blocks)


@pytest.mark.slow
def test_compiled_resblocks_match_eager_forward_backward_and_chunking():
    eager, compiled = _tiny_vae(), _tiny_vae()
    info = compiling.compile_regions(compiled, "on", "cpu")
    assert info["compiled"], info["reason"]
    loss_e, grads_e = _loss_and_grads(eager)
    loss_c, grads_c = _loss_and_grads(compiled)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-6)
    for ge, gc in zip(grads_e, grads_c, strict=True):
        torch.testing.assert_close(gc, ge, rtol=1e-3, atol=1e-5)
    report = compiling.region_report(info)
    blocks = sum(isinstance(m, ResBlock) for m in compiled.modules())
    assert report["fallbacks"] == {} and report["regions"] == blocks
    assert report["graphs"] >= 1 and report["first_call_s"] > 0

    # bf16 autocast (the CPU demo's training precision): compiled within 1e-3 of eager
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recon_e, _ = eager(_video(), sample=False)
        recon_c, _ = compiled(_video(), sample=False)
    l1_e, l1_c = (
        (recon_e.float() - _video()).abs().mean(),
        (recon_c.float() - _video()).abs().mean(),
    )
    torch.testing.assert_close(l1_c, l1_e, rtol=1e-3, atol=0.0)

    # chunked (causal cache) and no-grad encodes take the eager path: exact, no recompiles
    with torch.no_grad():
        full = compiled.encode(_video()).mode()
        chunked = compiled.encode(_video(), chunk_latent_frames=1).mode()
        reference = eager.encode(_video()).mode()
    torch.testing.assert_close(chunked, full, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(full, reference, rtol=1e-4, atol=1e-5)
    assert compiling.region_report(info)["fallbacks"] == {}
