import dataclasses
from types import SimpleNamespace

import pytest
import torch

from model.diffusion import (
    FlowConfig,
    FlowMatching,
    concat_text,
    drop_text,
    interpolate,
    loss_by_timestep_bucket,
    null_condition,
    time_shift,
)
from model.patches import pack_grids, pack_patches
from tests.testing_utils.models import TEXT_DIM, tiny_dit

torch.set_num_threads(1)

GRIDS = [(1, 4, 4), (2, 3, 5)]


def prompts(batch: int = len(GRIDS), length: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, TEXT_DIM, generator=gen), torch.ones(
        batch, length, dtype=torch.bool
    )


class ConstantX0:
    """Predicts the same clean tokens whatever the input: the exact denoiser of a one-point dataset."""

    def __init__(self, target: torch.Tensor):
        self.target = target
        self.config = SimpleNamespace(in_dim=target.shape[1])

    def encode_text(self, text, mask):
        return mask

    def __call__(self, x, coords, cu_seqlens, t, text=None, text_mask=None, *, text_cache=None):
        return self.target.repeat(x.shape[0] // self.target.shape[0], 1)


# --------------------------------------------------------------------------- conventions and schedule


def test_interpolation_convention_and_conversions():
    x0, noise = torch.randn(6, 8), torch.randn(6, 8)
    assert torch.equal(interpolate(x0, noise, torch.zeros(6, 1)), x0)  # t = 0 is data
    assert torch.equal(interpolate(x0, noise, torch.ones(6, 1)), noise)  # t = 1 is noise
    t = torch.rand(6, 1) * 0.9 + 0.05
    x_t = interpolate(x0, noise, t)
    for prediction, pred in (("x0", x0), ("velocity", noise - x0)):
        fm = FlowMatching(FlowConfig(prediction=prediction))
        torch.testing.assert_close(fm.to_velocity(pred, x_t, t), noise - x0)
        torch.testing.assert_close(fm.to_x0(pred, x_t, t), x0)


def test_time_shift_and_resolution_aware_shift():
    t = torch.linspace(0, 1, 11)
    assert time_shift(t, 3.0)[0] == 0 and time_shift(t, 3.0)[-1] == 1
    assert (time_shift(t[1:-1], 3.0) > t[1:-1]).all() and torch.equal(time_shift(t, 1.0), t)
    fm = FlowMatching(
        FlowConfig(
            shift_mode="resolution", shift=1.0, shift_base_tokens=256, shift_min=0.5, shift_max=3.0
        )
    )
    shifts = fm.shift_for(torch.tensor([256, 1024, 64, 100_000]))
    torch.testing.assert_close(shifts, torch.tensor([1.0, 2.0, 0.5, 3.0]))  # sqrt(L / 256), clamped
    assert torch.equal(
        FlowMatching(FlowConfig(shift_mode="none")).shift_for(torch.tensor([9999])), torch.ones(1)
    )
    grid = fm.timestep_grid(4, torch.tensor([256, 1024]))
    assert grid.shape == (5, 2) and (grid[0] == 1).all() and (grid[-1] == 0).all()
    assert (grid[1:-1, 1] > grid[1:-1, 0]).all()  # more tokens, noisier schedule


def test_logit_normal_timesteps_are_seeded():
    fm = FlowMatching(FlowConfig(shift_mode="none"))
    tokens = torch.full((4000,), 256)
    t = fm.sample_timesteps(tokens, torch.Generator().manual_seed(0))
    assert ((t > 0) & (t < 1)).all() and abs(t.median().item() - 0.5) < 0.03
    assert torch.equal(t, fm.sample_timesteps(tokens, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="prediction='eps'"):
        FlowConfig(prediction="eps")


# --------------------------------------------------------------------------- loss


def test_loss_is_mean_per_clip_then_over_clips():
    items = [torch.randn(4, 1, 2, 2), torch.randn(4, 1, 6, 6)]  # 1 token and 9 tokens
    batch = pack_patches(items, 100)[0]
    zero = ConstantX0(torch.zeros(1, 16))
    fm = FlowMatching(FlowConfig(prediction="x0", text_dropout=0.0))
    out = fm.training_loss(zero, batch, *prompts(2), generator=torch.Generator().manual_seed(0))
    per_token = batch.tokens.pow(2).mean(-1)
    expected = torch.stack([per_token[batch.seg_ids == b].mean() for b in range(2)])
    torch.testing.assert_close(out.per_clip, expected)
    torch.testing.assert_close(
        out.loss, expected.mean()
    )  # each clip weighs the same, whatever its size
    assert sum(1 for k in out.buckets if k.startswith("loss_t")) >= 1
    loss_mask = torch.ones(batch.num_tokens, dtype=torch.bool)
    loss_mask[batch.seg_ids == 1] = False
    masked = fm.training_loss(
        zero, batch, *prompts(2), generator=torch.Generator().manual_seed(0), loss_mask=loss_mask
    )
    torch.testing.assert_close(masked.loss, expected[0])


def test_loss_by_timestep_bucket():
    buckets = loss_by_timestep_bucket(
        torch.tensor([1.0, 3.0, 10.0]), torch.tensor([0.1, 0.2, 0.9]), 4
    )
    assert buckets == {"loss_t0.00-0.25": 2.0, "loss_t0.75-1.00": 10.0}


def test_text_dropout_replaces_with_null():
    text, mask = prompts(6)
    same = drop_text(text, mask, 0.0)
    assert torch.equal(same[0], text) and not same[2].any()
    dropped_text, dropped_mask, dropped = drop_text(
        text, mask, 0.9999, torch.Generator().manual_seed(0)
    )
    assert dropped.all() and not dropped_mask.any() and dropped_text.abs().sum() == 0
    null = torch.randn(3, TEXT_DIM)
    t2, m2, d2 = drop_text(text, mask, 0.5, torch.Generator().manual_seed(0), null_text=null)
    assert d2.any() and not d2.all()
    assert (
        torch.equal(t2[d2][:, :3], null.expand(int(d2.sum()), -1, -1))
        and (m2[d2].sum(-1) == 3).all()
    )
    assert torch.equal(t2[~d2], text[~d2])
    both, both_mask = concat_text(text, mask, *null_condition(text, null))
    assert both.shape == (12, 5, TEXT_DIM) and both_mask[6:].sum(-1).tolist() == [3] * 6


# --------------------------------------------------------------------------- sampling


def test_cfg_with_guidance_one_equals_conditional():
    model = tiny_dit()
    fm = FlowMatching()
    coords, cu = pack_grids(GRIDS)
    text, mask = prompts()
    x = torch.randn(coords.shape[0], model.config.in_dim)
    t = torch.tensor([0.8, 0.4])
    null, nmask = null_condition(text)
    with torch.no_grad():
        cond = fm.guided_velocity(model, x, coords, cu, t, model.encode_text(text, mask), None)
        both = model.encode_text(*concat_text(text, mask, null, nmask))
        guided_one = fm.guided_velocity(
            model, x, coords, cu, t, both, 1.0
        )  # cond + null in one forward
        guided_three = fm.guided_velocity(model, x, coords, cu, t, both, 3.0)
    torch.testing.assert_close(guided_one, cond, atol=1e-5, rtol=1e-5)
    assert (guided_three - cond).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_samplers_are_deterministic_by_seed(method):
    model = tiny_dit()
    fm = FlowMatching()
    coords, cu = pack_grids(GRIDS)
    text, mask = prompts()

    def run(seed):
        return fm.sample(
            model, coords, cu, text, mask, steps=3, guidance=4.0, method=method, seed=seed
        )

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (coords.shape[0], model.config.in_dim) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


class ConstantVelocity(ConstantX0):
    """The exact velocity (x_t - x0) / t of the same one-point dataset."""

    def __call__(self, x, coords, cu_seqlens, t, text=None, text_mask=None, *, text_cache=None):
        seg_ids = torch.repeat_interleave(torch.arange(t.shape[0]), torch.diff(cu_seqlens))
        return (x - super().__call__(x, coords, cu_seqlens, t)) / t[seg_ids][:, None]


@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("prediction", ["x0", "velocity"])
def test_samplers_reach_the_data_point_of_an_exact_denoiser(method, prediction):
    target = torch.randn(1, 12)
    coords, cu = pack_grids([(1, 2, 3)])
    model = ConstantX0(target) if prediction == "x0" else ConstantVelocity(target)
    fm = FlowMatching(FlowConfig(prediction=prediction))
    out = fm.sample(model, coords, cu, *prompts(1), steps=5, method=method, guidance=2.0, seed=0)
    torch.testing.assert_close(out, target.expand(6, -1), atol=1e-5, rtol=1e-5)


def test_sdedit_strength_zero_returns_input_and_one_ignores_it():
    model = tiny_dit()
    fm = FlowMatching()
    coords, cu = pack_grids(GRIDS)
    text, mask = prompts()
    x0 = torch.randn(coords.shape[0], model.config.in_dim)
    assert torch.equal(
        fm.sdedit(model, x0, coords, cu, text, mask, strength=0.0, steps=4, seed=0), x0
    )
    full = fm.sdedit(model, x0, coords, cu, text, mask, strength=1.0, steps=4, seed=5)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(full, fm.sample(model, coords, cu, text, mask, steps=4, noise=noise))
    torch.testing.assert_close(
        fm.sdedit(model, x0, coords, cu, text, mask, strength=1.0, steps=4, noise=noise), full
    )  # a given noise tensor is the seed's draw
    half = fm.sdedit(model, x0, coords, cu, text, mask, strength=0.5, steps=4, seed=5)
    assert torch.isfinite(half).all() and not torch.allclose(half, x0)
    with pytest.raises(ValueError, match="strength"):
        fm.sdedit(model, x0, coords, cu, text, mask, strength=1.5)


def test_tiny_overfit_loss_drops():
    torch.manual_seed(0)
    model = tiny_dit(seed=1)
    model.initialize_weights()
    model.train()
    items = [torch.randn(4, 1, 4, 4), torch.randn(4, 2, 2, 4)]
    batch = pack_patches(items, 64)[0]
    text, mask = prompts(2)
    fm = FlowMatching(dataclasses.replace(FlowConfig(), text_dropout=0.0, shift_mode="none"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        out = fm.training_loss(model, batch, text, mask, generator=gen)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)
