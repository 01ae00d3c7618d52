"""The in-domain evaluator's model: any size and length in, normalised embeddings out, a
contrastive loss that trains, stills = static videos, batching that changes nothing."""

from __future__ import annotations

import math

import pytest
import torch

from model.config import UnknownSizeError
from model.evaluator import (
    EVALUATOR_SIZES,
    VideoTextConfig,
    VideoTextModel,
    build_evaluator,
    fit_short_side,
    working_size,
)
from tests.testing_utils.model_tester import ModelTesterMixin
from tests.testing_utils.models import random_video

torch.set_num_threads(1)

TINY = EVALUATOR_SIZES.config("evaluator-tiny", text_dim=12)


def _text(batch: int, length: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, length, TINY.text_dim, generator=gen)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for i in range(batch):
        mask[i, : 2 + i % (length - 1)] = True
    return tokens * mask[..., None], mask


class TestVideoTextModel(ModelTesterMixin):
    model_class = VideoTextModel

    def init_config(self):
        return TINY

    def inputs(self, seed: int = 0):
        tokens, mask = _text(3, seed=seed)
        return {"videos": random_video(3, 3, 5, 24, 40, seed=seed), "tokens": tokens, "mask": mask}

    def output(self, model, inputs):  # both embeddings, so every check sees both towers
        return torch.cat(
            [
                model.encode_video(inputs["videos"]),
                model.encode_text(inputs["tokens"], inputs["mask"]),
            ]
        )

    def training_loss(self, model, inputs):
        return model(**inputs)


def test_sizes_and_config_errors():
    assert {"evaluator-tiny", "evaluator-xs", "evaluator-s"} <= set(EVALUATOR_SIZES)
    with pytest.raises(UnknownSizeError, match="unknown evaluator size 'evaluator-huge'"):
        build_evaluator("evaluator-huge")
    with pytest.raises(ValueError, match="temporal_kernel must be odd"):
        VideoTextConfig(temporal_kernel=2)
    with pytest.raises(ValueError, match="short_side=8 is too small for 4 levels"):
        VideoTextConfig(short_side=8)
    with pytest.raises(ValueError, match="unknown VideoTextConfig key"):
        VideoTextConfig.from_dict({"widthz": [8]})


def test_working_size_keeps_the_aspect_ratio():
    assert working_size(54, 96, 48) == (48, 85)
    assert working_size(96, 54, 48) == (85, 48)
    assert working_size(48, 48, 48) == (48, 48)
    x = random_video(2, 3, 4, 30, 70)
    assert fit_short_side(x, 16).shape == (2, 3, 4, 16, 37)
    same = random_video(1, 3, 2, 16, 20)
    assert fit_short_side(same, 16) is same  # already the working size: untouched


def test_any_length_and_aspect_gives_normalised_embeddings():
    model = VideoTextModel(TINY).eval()
    clips = [
        random_video(3, 1, 36, 64, seed=1),  # 16:9 still
        random_video(3, 9, 64, 36, seed=2),  # 9:16 video
        random_video(3, 17, 21, 90, seed=3),  # 30:7, long
        random_video(3, 1, 36, 64, seed=4),  # same shape as the first: batched with it
    ]
    with torch.no_grad():
        emb = model.encode_video(clips)
        feats = model.video_features(clips)
        semantic = model.semantic_features(clips)
        text = model.encode_text(*_text(4))
    assert emb.shape == (4, TINY.embed_dim) and semantic.shape == (4, TINY.feature_dim)
    assert feats.shape == (4, TINY.fvd_dim) == (4, TINY.feature_dim + 2 * TINY.widths[0])
    assert torch.equal(feats[:, : TINY.feature_dim], semantic)  # scales are 1 until fitted
    assert torch.allclose(emb.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(text.norm(dim=-1), torch.ones(4), atol=1e-5)
    with torch.no_grad():  # batching by shape changes nothing: per-clip statistics only
        alone = torch.cat([model.encode_video([c]) for c in clips])
    assert torch.allclose(alone, emb, atol=1e-5)


def test_a_still_has_the_features_of_a_static_video():
    model = VideoTextModel(TINY).eval()
    still = random_video(1, 3, 1, 20, 30, seed=5)
    with torch.no_grad():
        one = model.video_features(still)
        static = model.video_features(still.expand(-1, -1, 7, -1, -1))
        moving = model.video_features(random_video(1, 3, 7, 20, 30, seed=6))
    assert torch.allclose(one, static, atol=1e-5)
    assert not torch.allclose(one, moving, atol=1e-2)


def test_text_tower_mean_pools_so_pooled_states_are_equivalent():
    model = VideoTextModel(TINY).eval()
    tokens, mask = _text(4, length=6)
    w = mask.float()[..., None]
    pooled = (tokens * w).sum(1, keepdim=True) / w.sum(1, keepdim=True)  # (B, 1, E)
    with torch.no_grad():
        full = model.encode_text(tokens, mask)
        short = model.encode_text(pooled, torch.ones(4, 1, dtype=torch.bool))
    assert torch.allclose(full, short, atol=1e-5)


def test_temperature_is_learned_and_clamped():
    model = VideoTextModel(TINY)
    assert model.scale().item() == pytest.approx(1 / TINY.init_temperature, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.scale().item() == pytest.approx(TINY.max_logit_scale)


def test_contrastive_training_pulls_pairs_together():
    torch.manual_seed(0)
    model = VideoTextModel(TINY)
    videos = [random_video(3, 1 + 4 * (i % 2), 16, 24, seed=i) for i in range(6)]
    tokens, mask = _text(6, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model(videos, tokens, mask).item()
    assert first > 0.5 * math.log(6)  # no better than chance at init
    for _ in range(60):
        loss = model(videos, tokens, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first
    with torch.no_grad():
        sims = model.encode_text(tokens, mask) @ model.encode_video(videos).T
    assert (sims.argmax(1) == torch.arange(6)).all()  # every text retrieves its own video


def test_detail_statistics_see_noise_blur_and_frame_order():
    model = VideoTextModel(TINY).eval()
    t = torch.linspace(0, 1, 9)[:, None, None]
    x = torch.linspace(-1, 1, 32)[None, None, :]
    wave = 0.5 * torch.sin(6 * x - 4 * t).expand(9, 24, 32)  # a moving wave, unsaturated
    clip = wave[None].expand(3, -1, -1, -1)
    noisy = clip + 0.4 * random_video(*clip.shape, seed=1)
    smooth = torch.nn.functional.avg_pool3d(
        clip[None], (1, 5, 5), 1, (0, 2, 2), count_include_pad=False
    )[0]
    shuffled = clip[:, torch.randperm(9, generator=torch.Generator().manual_seed(0))]
    c0 = TINY.widths[0]
    with torch.no_grad():
        raw = model.raw_video_features([clip, noisy, smooth, shuffled])
    spatial, temporal = raw[:, TINY.feature_dim : TINY.feature_dim + c0], raw[:, -c0:]
    energy = spatial.exp().sum(1)  # summed over the (random, at init) first-layer channels
    assert energy[1] > energy[0] > energy[2]
    assert temporal[3].sum() > temporal[0].sum() > 0
    with torch.no_grad():
        still = model.raw_video_features(clip[:, :1][None])
    assert (still[0, -c0:] == 0).all()  # a still has no temporal detail


def test_feature_scales_weigh_the_blocks_alike_and_are_saved(tmp_path):
    model = VideoTextModel(TINY).eval()
    clips = [random_video(3, 1 + 4 * (i % 2), 20, 28, seed=i) * (0.3 + 0.1 * i) for i in range(8)]
    scales = model.fit_feature_scales(clips, batch_size=3)
    assert len(scales) == 3 and all(s > 0 for s in scales) and scales != [1.0, 1.0, 1.0]
    with torch.no_grad():
        feats = model.video_features(clips).double()
    c0, d = TINY.widths[0], TINY.feature_dim
    for lo, hi in ((0, d), (d, d + c0), (d + c0, d + 2 * c0)):
        block = feats[:, lo:hi]
        assert (block - block.mean(0)).pow(2).sum(1).mean().sqrt().item() == pytest.approx(1.0)
    model.save_pretrained(tmp_path / "m")
    loaded = VideoTextModel.from_pretrained(tmp_path / "m")
    assert torch.equal(loaded.feature_scale, model.feature_scale)  # in the weights: in the sha256
    stills = [random_video(3, 1, 20, 28, seed=i) for i in range(3)]
    assert model.fit_feature_scales(stills)[2] == 1.0  # no temporal detail: left at 1
