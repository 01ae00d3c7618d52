"""torch.compile of the DiT's regions: same numbers as eager, a logged fallback, the switch."""

from __future__ import annotations

import logging

import pytest
import torch

from components.core import compile as compiling
from model.dit import DiT, DiTConfig
from model.patches import pack_patches


def _tiny_dit() -> DiT:
    torch.manual_seed(0)
    model = DiT(DiTConfig(hidden_size=32, depth=2, num_heads=2, in_channels=4, text_dim=16))
    for p in model.parameters():  # adaLN-Zero starts at exactly zero: give every path a signal
        torch.nn.init.normal_(p, std=0.05)
    return model


def _batch() -> tuple:
    gen = torch.Generator().manual_seed(1)
    latents = [
        torch.randn(4, t, h, w, generator=gen) for t, h, w in ((1, 4, 4), (2, 4, 6), (1, 4, 4))
    ]
    (batch,) = pack_patches(latents, 64, (1, 2, 2))
    text = torch.randn(3, 5, 16, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    return batch, torch.rand(3, generator=gen), text, mask


def _loss_and_grads(model: DiT) -> tuple[torch.Tensor, list[torch.Tensor]]:
    batch, t, text, mask = _batch()
    out = model(batch.tokens, batch.coords, batch.cu_seqlens, t, text, mask)
    loss = out.square().mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_off_and_missing_toolchain_run_eagerly(monkeypatch):
    assert compiling.should_compile("off", "cpu") == (False, "train.compile=off")
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setattr(compiling.shutil, "which", lambda name: None)
    enabled, why = compiling.should_compile("auto", "cpu")
    assert not enabled and "C++ compiler" in why
    info = compiling.compile_regions(_tiny_dit(), "on", "cpu")
    assert info["regions"] == [] and not info["compiled"]
    with pytest.raises(ValueError, match="train.compile"):
        compiling.should_compile("yes", "cpu")


def test_a_failing_compile_falls_back_with_a_logged_reason(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise torch._dynamo.exc.BackendCompilerFailed(
            lambda *a: None, RuntimeError("no kernel"), None
        )

    model = _tiny_dit()
    expected, _ = _loss_and_grads(_tiny_dit())
    info = compiling.compile_regions(model, "on", "cpu")
    for region in info["regions"]:
        monkeypatch.setattr(region, "compiled", broken)
    with caplog.at_level(logging.WARNING, logger="components.core.compile"):
        loss, _ = _loss_and_grads(model)
    torch.testing.assert_close(loss, expected)
    report = compiling.region_report(info)
    assert len(report["fallbacks"]) == len(info["regions"]) == 6  # 3 regions x 2 blocks
    assert "running it eagerly" in caplog.text and "BackendCompilerFailed" in caplog.text


@pytest.mark.slow
def test_compiled_regions_match_eager_forward_and_backward():
    eager, compiled = _tiny_dit(), _tiny_dit()
    info = compiling.compile_regions(compiled, "auto", "cpu")
    assert info["compiled"], info["reason"]
    loss_e, grads_e = _loss_and_grads(eager)
    loss_c, grads_c = _loss_and_grads(compiled)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-6)
    for ge, gc in zip(grads_e, grads_c, strict=True):
        torch.testing.assert_close(gc, ge, rtol=1e-3, atol=1e-5)
    report = compiling.region_report(info)
    assert report["fallbacks"] == {} and report["regions"] == 6
    assert report["graphs"] >= 3
