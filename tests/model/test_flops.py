"""Parameter and FLOP counts from the config alone, against the model they describe."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from model.diffusion import FlowConfig, FlowMatching
from model.dit import DIT_SIZES, DiT, dit_config
from model.flops import count_params, flops_per_token, forward_flops, run_text_keys, train_flops
from model.patches import pack_patches, pad_text
from tests.testing_utils.models import tiny_dit_config as tiny_config


@pytest.mark.parametrize(("qk_norm", "pooled_text"), [(True, True), (False, False)])
def test_count_params_matches_model(qk_norm, pooled_text):
    cfg = tiny_config(qk_norm=qk_norm, out_channels=8, mlp_ratio=3.0, pooled_text=pooled_text)
    assert count_params(cfg) == sum(p.numel() for p in DiT(cfg).parameters())


def test_size_registry_and_flops():
    sizes = [count_params(dit_config(name)) for name in DIT_SIZES]
    assert list(DIT_SIZES) == [
        "tessera-tiny",
        "tessera-xxs",
        "tessera-xs",
        "tessera-s",
        "tessera-m",
        "tessera-l",
        "tessera-xl",
    ]
    assert (
        sizes == sorted(sizes) and sizes[0] < 1e5 < sizes[1] < 5e6 < sizes[2] and sizes[-1] < 1.5e9
    )
    cfg = dit_config("tessera-s", in_channels=8, patch_size=(1, 2, 2))
    assert cfg.in_dim == 32 and cfg.rope_dims == (24, 20, 20)
    assert forward_flops(cfg, [256, 256], 20) == 2 * forward_flops(cfg, [256], 20)
    assert forward_flops(cfg, [512], 20) > 2 * forward_flops(
        cfg, [256], 20
    )  # attention is quadratic
    assert flops_per_token(cfg, 1024) > flops_per_token(cfg, 256)
    # dense matmuls dominate short clips: 6 FLOPs per trained token per per-token weight
    # (qkv 3D², proj D², cross q + out 2D², MLP 8D² = 14D² per block)
    ratio = train_flops(cfg, [64]) / (6 * 64 * cfg.depth * 14 * cfg.hidden_size**2)
    assert 1.0 < ratio < 1.1


# --------------------------------------------------------------------------- against FlopCounterMode

# FlopCounterMode has no formula for the CPU flash-attention kernels SDPA runs on CPU (with or
# without a mask), so it would count attention as zero; give them the SDPA formulas it uses for
# the CUDA kernels (the backward recomputes the scores: 5 matmuls to the forward's 2).
_CPU_SDPA = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: (
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)
    ),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: (
        lambda grad, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(
            grad, q, k, v
        )
    ),
}

# three real sizes: the unit-test width, the CPU demo size, and DiT-S width at depth 2 without
# the pooled path (and a 3x MLP) so every branch of the count is exercised
FLOP_SIZES = {
    "tiny": dict(name="tessera-tiny"),
    "xs": dict(name="tessera-xs"),
    "s-depth2": dict(name="tessera-s", depth=2, pooled_text=False, mlp_ratio=3.0),
}
# latents (c, t, h, w) at patch (1, 2, 2): many small images of a few dozen tokens each (a
# packed image batch, several equal-size runs), and a few videos of several hundred tokens
FLOP_MIXES = {
    "images": [(1, 12, 12)] * 5 + [(1, 10, 14)] * 3 + [(1, 8, 16)] * 4 + [(1, 8, 8)] * 2,
    "videos": [(5, 16, 16), (5, 16, 16), (3, 16, 24)],
}


def _training_step(cfg, latent_shapes, seed: int = 0):
    """One real training forward + backward (FlowMatching.training_loss with text dropout) under
    FlopCounterMode -> (counted FLOPs, batch seqlens, text_lens as train_step passes them)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DiT(cfg).train()
    latents = [torch.randn(cfg.in_channels, *shape, generator=gen) for shape in latent_shapes]
    (batch,) = pack_patches(latents, 10_000, cfg.patch_size)
    # real text lengths vary per clip; pad_text pads the rows to the longest
    lens = torch.randint(3, 25, (len(latent_shapes),), generator=gen).tolist()
    rows = [torch.randn(lens[i], cfg.text_dim, generator=gen) for i in batch.indices]
    text, mask = pad_text(rows, [torch.ones(r.shape[0], dtype=torch.bool) for r in rows])
    flow = FlowMatching(FlowConfig(text_dropout=0.3))
    with FlopCounterMode(display=False, custom_mapping=_CPU_SDPA) as counter:
        out = flow.training_loss(model, batch, text, mask, generator=gen)
        out.loss.backward()
    counts = counter.get_flop_counts()["Global"]
    assert counts.get(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)
    text_lens = (mask.sum(1) * ~out.dropped_text).tolist()  # as train_step counts them
    return counter.get_total_flops(), batch.seqlens, text_lens


@pytest.mark.parametrize("mix", list(FLOP_MIXES))
@pytest.mark.parametrize("size", list(FLOP_SIZES))
def test_train_flops_match_flop_counter(size, mix):
    overrides = dict(FLOP_SIZES[size])
    cfg = dit_config(overrides.pop("name"), **overrides)
    measured, seqlens, text_lens = _training_step(cfg, FLOP_MIXES[mix])
    analytic = train_flops(cfg, seqlens, text_lens)
    print(
        f"{size} {mix}: {count_params(cfg):,} params, analytic / measured = {analytic / measured:.4f}"
    )
    assert analytic == pytest.approx(measured, rel=0.05)


def test_train_flops_checkpointing_and_text_keys():
    cfg = dit_config("tessera-tiny", gradient_checkpointing=True)
    measured, seqlens, text_lens = _training_step(cfg, FLOP_MIXES["videos"])
    # recomputing the blocks in backward is left out by default, added on request
    assert train_flops(cfg, seqlens, text_lens, checkpointing=True) == pytest.approx(
        measured, rel=0.05
    )
    assert train_flops(cfg, seqlens, text_lens) < 0.9 * measured
    # sdpa_segments reads text keys up to the longest caption of each run of equal-length clips
    # (pack_patches puts them next to each other, so the order given does not matter)
    assert run_text_keys([36, 36, 35, 16, 16], [3, 9, 0, 5, 0]) == [9, 9, 0, 5, 5]
    assert run_text_keys([16, 36, 35, 36, 16], [5, 3, 0, 9, 0]) == [5, 9, 0, 9, 5]
    assert (
        forward_flops(cfg, [36, 36], [3, 9])
        == forward_flops(cfg, [36, 36], [3, 9], text_keys=9)
        > forward_flops(cfg, [36, 36], [3, 9], text_keys=[3, 9])
    )
