import dataclasses

import pytest
import torch

from model.attention import matmul_attention
from model.config import UnknownSizeError
from model.dit import DiT, DiTConfig, apply_rope, dit_config, rope_angles
from model.patches import pack_grids, pack_patches, patch_coords
from tests.testing_utils.model_tester import ModelTesterMixin
from tests.testing_utils.models import TEXT_DIM, scramble
from tests.testing_utils.models import tiny_dit_config as tiny_config

torch.set_num_threads(1)

# image, 16:9, 9:16 and a short video, as patch grids
GRIDS = [(1, 4, 4), (1, 3, 5), (1, 5, 3), (3, 2, 3)]


def make_inputs(cfg: DiTConfig, grids=GRIDS, text_len: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    coords, cu = pack_grids(grids)
    x = torch.randn(coords.shape[0], cfg.in_dim, generator=gen)
    t = torch.rand(len(grids), generator=gen)
    text = torch.randn(len(grids), text_len, TEXT_DIM, generator=gen)
    mask = torch.ones(len(grids), text_len, dtype=torch.bool)
    for b in range(len(grids)):
        mask[b, text_len - b :] = False  # different real text lengths per clip
    return x, coords, cu, t, text, mask


def one_clip(model: DiT, inputs: tuple, b: int) -> torch.Tensor:
    """The model's output for clip ``b`` of packed ``inputs`` (x, coords, cu, t, text, mask), alone."""
    x, coords, cu, t, text, mask = inputs
    s, e = cu[b].item(), cu[b + 1].item()
    return model(
        x[s:e],
        coords[s:e],
        torch.tensor([0, e - s]),
        t[b : b + 1],
        text[b : b + 1],
        mask[b : b + 1],
    )


class TestDiT(ModelTesterMixin):
    model_class = DiT
    zero_init_output = True  # adaLN-Zero and a zero final layer
    scramble_weights = True

    def init_config(self) -> DiTConfig:
        return tiny_config(patch_size=(1, 2, 2), rope_axes_dim=(4, 6, 6))

    def inputs(self, seed: int = 0) -> dict:
        x, coords, cu, t, text, mask = make_inputs(self.init_config(), seed=seed)
        return {"x": x, "coords": coords, "cu_seqlens": cu, "t": t, "text": text, "text_mask": mask}


def with_backend(model: DiT, backend: str) -> DiT:
    model.config = dataclasses.replace(model.config, attention_backend=backend)
    return model


# --------------------------------------------------------------------------- config, registry, counts


def test_config_validation_errors():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        tiny_config(num_heads=5)
    with pytest.raises(ValueError, match="attention_backend='nope'"):
        tiny_config(attention_backend="nope")
    with pytest.raises(ValueError, match="rope_axes_dim"):
        tiny_config(rope_axes_dim=(4, 4, 4))
    with pytest.raises(ValueError, match=r"unknown DiTConfig key\(s\) \['hiden_size'\]"):
        DiTConfig.from_dict({"hiden_size": 32})
    with pytest.raises(ValueError, match="depth must be a positive int"):
        tiny_config(depth=0)
    with pytest.raises(UnknownSizeError, match="tessera-xs"):
        dit_config("tessera-xxl")


# --------------------------------------------------------------------------- forward


def test_output_is_zero_at_init_and_shapes():
    cfg = tiny_config(out_channels=6)
    model = DiT(cfg).eval()
    x, coords, cu, t, text, mask = make_inputs(cfg)
    out = model(x, coords, cu, t, text, mask)
    assert out.shape == (x.shape[0], 6 * 4)
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize(
    "grid", [(1, 4, 4), (1, 3, 5), (1, 5, 3), (2, 3, 3)], ids=["image", "16:9", "9:16", "video"]
)
def test_single_clip_shapes(grid):
    cfg = tiny_config()
    model = scramble(DiT(cfg))
    x, coords, cu, t, text, mask = make_inputs(cfg, [grid])
    out = model(x, coords, cu, t, text, mask)
    assert out.shape == (grid[0] * grid[1] * grid[2], cfg.out_dim) and torch.isfinite(out).all()


def test_packed_forward_equals_per_clip_forward():
    cfg = tiny_config()
    model = scramble(DiT(cfg))
    x, coords, cu, t, text, mask = make_inputs(cfg)
    with torch.no_grad():
        packed = model(x, coords, cu, t, text, mask)
        for b in range(len(GRIDS)):
            s, e = cu[b].item(), cu[b + 1].item()
            alone = one_clip(model, (x, coords, cu, t, text, mask), b)
            torch.testing.assert_close(packed[s:e], alone, atol=1e-5, rtol=1e-5)


def test_no_attention_leak_across_clips():
    cfg = tiny_config()
    model = scramble(DiT(cfg))
    x, coords, cu, t, text, mask = make_inputs(cfg)
    s, e = cu[1].item(), cu[2].item()
    x2, t2, text2 = x.clone(), t.clone(), text.clone()
    x2[s:e] += torch.randn_like(x2[s:e])
    t2[1] = 0.9
    text2[1] += 1.0
    with torch.no_grad():
        a, b = model(x, coords, cu, t, text, mask), model(x2, coords, cu, t2, text2, mask)
    others = torch.ones(x.shape[0], dtype=torch.bool)
    others[s:e] = False
    torch.testing.assert_close(a[others], b[others], atol=1e-6, rtol=0)
    assert (a[s:e] - b[s:e]).abs().max() > 1e-3


def test_masked_text_tokens_are_ignored():
    cfg = tiny_config()
    model = scramble(DiT(cfg))
    x, coords, cu, t, text, mask = make_inputs(cfg)
    text2 = torch.where(mask[..., None], text, torch.randn_like(text) * 100)
    with torch.no_grad():
        torch.testing.assert_close(
            model(x, coords, cu, t, text, mask), model(x, coords, cu, t, text2, mask)
        )
    no_text = torch.zeros_like(mask)  # the CFG null condition: finite, and differs from conditional
    with torch.no_grad():
        cond, uncond = model(x, coords, cu, t, text, mask), model(x, coords, cu, t, text, no_text)
    assert torch.isfinite(uncond).all() and (cond - uncond).abs().max() > 1e-3


@pytest.mark.parametrize("pooled_text", [True, False])
def test_pooled_text_conditions_through_adaln(pooled_text):
    """With cross-attention silenced, the text still steers the output through the pooled
    adaLN path, and only when the model has it; the null prompt's pooled vector is zero."""
    cfg = tiny_config(pooled_text=pooled_text)
    model = scramble(DiT(cfg))
    with torch.no_grad():
        for block in model.blocks:
            block.cross_attn.proj.weight.zero_()
            block.cross_attn.proj.bias.zero_()
    x, coords, cu, t, text, mask = make_inputs(cfg)
    other = torch.randn_like(text)
    with torch.no_grad():
        a, b = model(x, coords, cu, t, text, mask), model(x, coords, cu, t, other, mask)
        null = model.encode_text(text, torch.zeros_like(mask))
    assert ((a - b).abs().max() > 1e-3) == pooled_text
    assert torch.equal(null.pooled, torch.zeros_like(null.pooled))


def test_sdpa_segments_equals_dense_mask():
    cfg = tiny_config()
    model = scramble(DiT(cfg))
    x, coords, cu, t, text, mask = make_inputs(cfg)
    mask[2] = False  # one clip without text
    mask[1, 0] = False  # not a prefix: a run reads keys up to its last real token
    with torch.no_grad():
        seg = with_backend(model, "sdpa_segments")(x, coords, cu, t, text, mask)
        dense = with_backend(model, "dense_mask")(x, coords, cu, t, text, mask)
    torch.testing.assert_close(seg, dense, atol=1e-5, rtol=1e-5)


def test_matmul_attention_matches_sdpa_with_mask_and_gradients():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, 8, generator=gen) for n in (5, 7, 7))
    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    mask[1, ..., 4:] = False
    for m in (None, mask):
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)
        out = matmul_attention(q, k, v, m)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    leaf = q.clone().requires_grad_()
    matmul_attention(leaf, k, v, mask).float().sum().backward()
    assert torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0


def test_cpu_bf16_autocast_packed_equals_per_clip_and_fp32():
    """Under CPU bf16 autocast the segment backend switches to matmul attention; packing still
    never mixes clips, and the result stays within bf16 error of fp32."""
    cfg = tiny_config()
    model = scramble(DiT(cfg))
    x, coords, cu, t, text, mask = make_inputs(cfg)
    mask[2] = False  # one clip without text
    with torch.no_grad():
        full = model(x, coords, cu, t, text, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            packed = model(x, coords, cu, t, text, mask).float()
            for b in range(len(GRIDS)):
                s, e = cu[b].item(), cu[b + 1].item()
                alone = one_clip(model, (x, coords, cu, t, text, mask), b).float()
                torch.testing.assert_close(packed[s:e], alone, atol=1e-2, rtol=1e-2)
    scale = full.abs().max()
    assert (packed - full).abs().max() < 0.05 * scale


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention backend needs CUDA")
def test_flex_equals_sdpa_segments_on_cuda():
    cfg = tiny_config()
    model = scramble(DiT(cfg)).cuda()
    inputs = [v.cuda() for v in make_inputs(cfg)]
    with torch.no_grad():
        seg = with_backend(model, "sdpa_segments")(*inputs)
        flex = with_backend(model, "flex")(*inputs)
    torch.testing.assert_close(seg, flex, atol=1e-4, rtol=1e-4)


def test_flex_backend_refuses_cpu():
    cfg = tiny_config(attention_backend="flex")
    with pytest.raises(RuntimeError, match="needs CUDA"):
        DiT(cfg)(*make_inputs(cfg))


def test_rope_scores_depend_only_on_relative_position():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 12, 2, 16, generator=gen)
    coords = patch_coords((2, 2, 3))
    axes = (8, 4, 4)

    def scores(c):
        cos, sin = rope_angles(c, axes, 10000.0)
        return torch.einsum("nhd,mhd->hnm", apply_rope(q, cos, sin), apply_rope(k, cos, sin))

    shifted = coords + torch.tensor([7, 40, 3])
    torch.testing.assert_close(scores(coords), scores(shifted), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(scores(coords), scores(coords * 2), atol=1e-3)


def test_unseen_grid_and_coordinate_shift_invariance():
    cfg = tiny_config()
    model = scramble(DiT(cfg))
    grid = (3, 13, 27)  # a grid no test trains on, odd sizes
    x, coords, cu, t, text, mask = make_inputs(cfg, [grid])
    with torch.no_grad():
        out = model(x, coords, cu, t, text, mask)
        moved = model(x, coords + torch.tensor([5, 100, 31]), cu, t, text, mask)
    assert out.shape == (x.shape[0], cfg.out_dim) and torch.isfinite(out).all()
    torch.testing.assert_close(out, moved, atol=1e-4, rtol=1e-4)  # RoPE is the only position signal


def test_text_cache_equals_text():
    cfg = tiny_config()
    model = scramble(DiT(cfg))
    x, coords, cu, t, text, mask = make_inputs(cfg)
    with torch.no_grad():
        cache = model.encode_text(text, mask)
        torch.testing.assert_close(
            model(x, coords, cu, t, text_cache=cache), model(x, coords, cu, t, text, mask)
        )


def test_wrong_segment_count_is_a_clear_error():
    cfg = tiny_config()
    model = DiT(cfg)
    x, coords, cu, t, text, mask = make_inputs(cfg)
    with pytest.raises(ValueError, match="one timestep and one text row per clip"):
        model(x, coords, cu, t[:-1], text, mask)


def test_gradient_checkpointing_matches_and_grads_reach_every_parameter():
    cfg = tiny_config()
    batch = pack_patches([torch.randn(4, 1, 4, 6), torch.randn(4, 2, 4, 4)], 100)[0]
    t, text = torch.tensor([0.3, 0.7]), torch.randn(2, 5, TEXT_DIM)
    grads = []
    for ckpt in (False, True):
        model = scramble(DiT(dataclasses.replace(cfg, gradient_checkpointing=ckpt))).train()
        model(batch.tokens, batch.coords, batch.cu_seqlens, t, text).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert all(g.abs().sum() > 0 for g in grads[0].values()), [
        n for n, g in grads[0].items() if g.abs().sum() == 0
    ]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4)
