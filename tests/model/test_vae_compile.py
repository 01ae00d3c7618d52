"""torch.compile of the VAE's encoder and decoder: same numbers as eager, chunking still exact."""

from __future__ import annotations

import pytest
import torch

from components.core import compile as compiling
from model.vae import CausalVAE, build_vae


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: dynamo caches graphs per code object, process-wide."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


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


def test_encoder_and_decoder_are_the_regions_and_off_stays_eager():
    assert not compiling.compile_regions(_tiny_vae(), "off", "cpu")["regions"]
    info = compiling.compile_regions(_tiny_vae(), "on", "cpu")  # wraps; compiles on first call
    assert [r.name for r in info["regions"]] == ["encoder.whole_clip", "decoder.whole_clip"]


@pytest.mark.slow
def test_compiled_vae_matches_eager_forward_backward_and_chunking():
    eager, compiled = _tiny_vae(), _tiny_vae()
    info = compiling.compile_regions(compiled, "on", "cpu")
    assert info["compiled"], info["reason"]
    loss_e, grads_e = _loss_and_grads(eager)
    loss_c, grads_c = _loss_and_grads(compiled)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-6)
    for ge, gc in zip(grads_e, grads_c, strict=True):
        torch.testing.assert_close(gc, ge, rtol=1e-3, atol=1e-5)
    report = compiling.region_report(info)
    assert report["fallbacks"] == {} and report["regions"] == 2
    assert report["graphs"] >= 1 and report["first_call_s"] > 0

    # chunked (causal cache) and no-grad encodes take the eager path: exact, no recompiles
    with torch.no_grad():
        full = compiled.encode(_video()).mode()
        chunked = compiled.encode(_video(), chunk_latent_frames=1).mode()
        reference = eager.encode(_video()).mode()
    torch.testing.assert_close(chunked, full, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(full, reference, rtol=1e-4, atol=1e-5)
    assert compiling.region_report(info)["fallbacks"] == {}


@pytest.mark.slow
def test_compiled_vae_matches_eager_under_bf16_autocast():
    """The CPU demo's training precision: the compiled L1 within 1e-3 of eager's.

    A fresh dynamo (the fixture): a region switched from fp32 to autocast recompiles, and that
    recompile hits an inductor lowering error (ValueRangeError); training never switches.
    """
    eager, compiled = _tiny_vae(), _tiny_vae()
    info = compiling.compile_regions(compiled, "on", "cpu")
    video = _video()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recon_e, _ = eager(video, sample=False)
        recon_c, _ = compiled(video, sample=False)
    l1_e = (recon_e.float() - video).abs().mean()
    l1_c = (recon_c.float() - video).abs().mean()
    l1_c.backward()
    torch.testing.assert_close(l1_c, l1_e, rtol=1e-3, atol=0.0)
    assert compiling.region_report(info)["fallbacks"] == {}
