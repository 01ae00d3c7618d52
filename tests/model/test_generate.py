import json
import math

import pytest
import torch

from model.diffusion import FlowConfig, FlowMatching
from model.dit import DiT
from model.generate import ASPECTS, FLOW_CONFIG_NAME, VideoGenerator, pooled_noise, video_size
from tests.testing_utils.models import (
    MAX_PIXELS,
    MULTIPLE,
    TinyText,
    gradient_video,
    tiny_dit,
    tiny_dit_config,
    tiny_generator,
    tiny_vae,
)

torch.set_num_threads(1)

STEPS = 3


@pytest.fixture(scope="module")
def generator() -> VideoGenerator:
    return tiny_generator()


def size_of(aspect: str, frames: int = 5) -> tuple[int, int, int]:
    return video_size(aspect, frames, MAX_PIXELS, MULTIPLE)


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("aspect", sorted(ASPECTS))
def test_video_size_every_aspect(aspect):
    frames, height, width = video_size(aspect, 6, 256 * 256, 16)
    assert frames == (1 if aspect == "image" else 9)  # 6 rounds up to 1 + 4k
    assert height % 16 == 0 and width % 16 == 0 and height * width <= 256 * 256
    w_ratio, h_ratio = ASPECTS[aspect]
    assert abs(math.log(width / height) - math.log(w_ratio / h_ratio)) < 0.1
    assert height * width > 0.8 * 256 * 256  # the budget is mostly used


def test_video_size_values_and_errors():
    assert video_size("16:9", 5, 256 * 256, 16) == (5, 192, 336)
    assert video_size("9:16", 1, 256 * 256, 16) == (1, 336, 192)
    assert video_size("1:1", 2, 4096, 16) == (5, 64, 64)
    assert video_size("3:2", 9, 4096, 16)[0] == 9  # any W:H
    with pytest.raises(ValueError, match="unknown aspect"):
        video_size("square", 5, 4096, 16)
    with pytest.raises(ValueError, match="too small"):
        video_size("21:9", 5, 300, 16)
    with pytest.raises(ValueError, match="frames must be >= 1"):
        video_size("1:1", 0, 4096, 16)


# --------------------------------------------------------------------------- generate


@pytest.mark.parametrize("aspect", ["16:9", "9:16", "1:1", "image"])
def test_generate_shapes(generator, aspect):
    frames, height, width = size_of(aspect)
    video = generator.generate(["a red ball", "a blue cube"], frames, height, width, steps=STEPS)
    assert video.shape == (2, 3, frames, height, width)
    assert video.min() >= -1 and video.max() <= 1 and torch.isfinite(video).all()
    assert not torch.allclose(video[0], video[1])  # other prompt, other seed


def test_generate_is_deterministic_by_seed(generator):
    size = size_of("16:9")
    a = generator.generate(["a red ball"], *size, steps=STEPS, seed=3)
    b = generator.generate(["a red ball"], *size, steps=STEPS, seed=3)
    c = generator.generate(["a red ball"], *size, steps=STEPS, seed=4)
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 1e-3
    # prompt i uses seed + i: the second prompt of a batch is a lone call with seed + 1
    pair = generator.generate(["x", "a red ball"], *size, steps=STEPS, seed=2)
    torch.testing.assert_close(pair[1], a[0], atol=1e-4, rtol=0)


def test_text_keys_values_computed_once_per_sample(generator, monkeypatch):
    calls = []
    original = generator.dit.encode_text
    monkeypatch.setattr(
        generator.dit, "encode_text", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    before = generator.text_encoder.calls
    generator.generate(["a red ball"], 1, 64, 64, steps=5)
    assert len(calls) == 1  # cond + null rows in one cache, reused over 5 steps
    assert generator.text_encoder.calls - before == 1


def test_guidance_and_negative_prompts_change_the_result(generator):
    size = (1, 64, 64)
    base = generator.generate(["a red ball"], *size, steps=STEPS)
    no_cfg = generator.generate(["a red ball"], *size, steps=STEPS, guidance=1.0)
    negative = generator.generate(["a red ball"], *size, steps=STEPS, negative=["blurry"])
    assert (base - no_cfg).abs().mean() > 1e-3
    assert (base - negative).abs().mean() > 1e-3
    with pytest.raises(ValueError, match="one for all or one per prompt"):
        generator.generate(["a", "b", "c"], *size, steps=1, negative=["x", "y"])


def test_generate_many_packs_sizes_and_matches_single_requests(generator, monkeypatch):
    requests = [
        {"prompt": "a red ball", "frames": 5, "height": 48, "width": 80, "seed": 1},
        {"prompt": "a tall tree", "frames": 5, "height": 80, "width": 48, "seed": 2},
        {"prompt": "a blue cube", "frames": 5, "height": 64, "width": 64, "seed": 3},
        {"prompt": "a still", "frames": 1, "height": 64, "width": 64, "seed": 4},
    ]
    segments = []
    original = generator.flow.sample
    monkeypatch.setattr(
        generator.flow,
        "sample",
        lambda m, c, cu, *a, **k: segments.append(len(cu) - 1) or original(m, c, cu, *a, **k),
    )
    videos = generator.generate_many(requests, steps=STEPS)
    assert segments == [4]  # one packed sampling batch of four clips
    for req, video in zip(requests, videos, strict=True):
        assert video.shape == (3, req["frames"], req["height"], req["width"])
        alone = generator.generate(
            [req["prompt"]],
            req["frames"],
            req["height"],
            req["width"],
            steps=STEPS,
            seed=req["seed"],
        )[0]
        torch.testing.assert_close(video, alone, atol=1e-4, rtol=0)
    segments.clear()
    small = generator.generate_many(requests, steps=STEPS, token_budget=40)
    assert sum(segments) == 4 and len(segments) > 1  # split into several packs
    for a, b in zip(small, videos, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match=r"missing keys \['width'\]"):
        generator.generate_many([{"prompt": "x", "frames": 1, "height": 64}])


def test_bad_sizes_and_settings_raise_clear_errors(generator):
    with pytest.raises(ValueError, match=r"frames=6 is not 1 \+ 4k \(try 9\)"):
        generator.generate(["x"], 6, 64, 64, steps=1)
    with pytest.raises(ValueError, match="height=50 is not a positive multiple of 16"):
        generator.generate(["x"], 5, 50, 64, steps=1)
    with pytest.raises(ValueError, match="exceeds max_frames=17"):
        generator.generate(["x"], 21, 64, 64, steps=1)
    with pytest.raises(ValueError, match="exceeds max_pixels=4096"):
        generator.generate(["x"], 1, 64, 80, steps=1)
    with pytest.raises(ValueError, match="sampler 'ddim'"):
        generator.generate(["x"], 1, 64, 64, steps=1, sampler="ddim")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        generator.generate(["x"], 1, 64, 64, steps=0)
    with pytest.raises(TypeError, match="list of strings"):
        generator.generate("x", 1, 64, 64, steps=1)


def test_mismatched_models_are_rejected():
    with pytest.raises(ValueError, match="latent channels"):
        VideoGenerator(
            tiny_vae(),
            DiT(tiny_dit_config(depth=1, in_channels=8)),
            TinyText(),
            FlowMatching(),
        )
    with pytest.raises(ValueError, match="text_dim=16"):
        VideoGenerator(tiny_vae(), tiny_dit(), TinyText(dim=8), FlowMatching())


# --------------------------------------------------------------------------- edit


def test_edit_strength_zero_is_the_vae_reconstruction(generator):
    video = gradient_video(5, 48, 80)
    edited = generator.edit(video, "a green ball", strength=0.0)
    expected, _ = generator.vae(video[None], sample=False)
    torch.testing.assert_close(edited, expected[0].clamp(-1, 1), atol=1e-5, rtol=0)
    odd = gradient_video(6, 20, 28)  # any size: padded, then cropped back
    edited = generator.edit(odd, "a green ball", strength=0.0)
    assert edited.shape == odd.shape
    torch.testing.assert_close(edited, generator.reconstruct(odd))


def test_edit_strength_one_equals_generate_with_the_same_noise(generator):
    video = gradient_video(5, 48, 80)
    edited = generator.edit(video, "a green ball", strength=1.0, steps=STEPS, seed=5)
    generated = generator.generate(["a green ball"], 5, 48, 80, steps=STEPS, seed=5)[0]
    assert torch.equal(edited, generated)


def test_edit_partial_strength_and_batches(generator):
    videos = gradient_video(5, 36, 44, batch=2)
    forwards = []
    hook = generator.dit.register_forward_hook(lambda *_: forwards.append(1))
    try:
        edited = generator.edit(videos, "a green ball", strength=0.5, steps=4, seed=1)
    finally:
        hook.remove()
    assert len(forwards) == 2  # round(0.5 * 4) steps, cond + null rows in one forward each
    assert edited.shape == videos.shape
    recon = generator.reconstruct(videos)
    full = generator.edit(videos, "a green ball", strength=1.0, steps=4, seed=1)
    assert (edited - recon).abs().mean() > 1e-3 and (edited - full).abs().mean() > 1e-3
    single = generator.edit(videos[1], "a green ball", strength=0.5, steps=4, seed=2)
    torch.testing.assert_close(single, edited[1], atol=1e-4, rtol=0)  # clip i uses seed + i
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        generator.edit(videos * 100, "x", strength=0.5)
    with pytest.raises(ValueError, match="strength must be in"):
        generator.edit(videos, "x", strength=1.5)


# --------------------------------------------------------------------------- prototype


def test_prototype_then_full_shares_the_seed(generator):
    proto, full = generator.prototype_then_full(
        "a red ball", 5, 48, 80, scale=0.5, steps=STEPS, seed=7
    )
    assert proto.shape == (3, 5, 32, 48) and full.shape == (3, 5, 48, 80)
    expected = generator.generate(["a red ball"], 5, 48, 80, steps=STEPS, seed=7)[0]
    assert torch.equal(full, expected)
    again, _ = generator.prototype_then_full("a red ball", 5, 48, 80, steps=STEPS, seed=7)
    assert torch.equal(proto, again)


def test_pooled_noise_keeps_unit_variance():
    noise = torch.randn(4, 3, 60, 90, generator=torch.Generator().manual_seed(0))
    for size in ((3, 30, 45), (3, 17, 23)):
        pooled = pooled_noise(noise, size)
        assert pooled.shape == (4, *size)
        assert abs(pooled.std().item() - 1.0) < 0.1 and abs(pooled.mean().item()) < 0.1


# --------------------------------------------------------------------------- from_pretrained


def save_models(generator: VideoGenerator, root):
    generator.vae.save_pretrained(root / "vae")
    generator.dit.save_pretrained(root / "dit")
    generator.flow.config.to_json(root / "dit" / FLOW_CONFIG_NAME)
    return root / "vae", root / "dit"


def test_from_pretrained_round_trip(generator, tmp_path):
    vae_dir, dit_dir = save_models(generator, tmp_path)
    assert FlowConfig.from_json(dit_dir / FLOW_CONFIG_NAME) == generator.flow.config
    loaded = VideoGenerator.from_pretrained(
        vae_dir, dit_dir, generator.text_encoder, max_pixels=MAX_PIXELS
    )
    assert loaded.vae.config == generator.vae.config and loaded.max_pixels == MAX_PIXELS
    a = loaded.generate(["a red ball"], 1, 64, 64, steps=STEPS)
    b = generator.generate(["a red ball"], 1, 64, 64, steps=STEPS)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("missing", "producer"),
    [
        ("vae/model.safetensors", "train_vae"),
        ("vae/config.json", "train_vae"),
        ("dit/model.safetensors", "train_dit"),
        ("dit/flow.json", "train_dit"),
    ],
)
def test_from_pretrained_names_missing_files(generator, tmp_path, missing, producer):
    vae_dir, dit_dir = save_models(generator, tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{missing.split('/')[1]} is missing.*{producer}"):
        VideoGenerator.from_pretrained(vae_dir, dit_dir, generator.text_encoder)


def test_from_pretrained_missing_dir_and_bad_flow_json(generator, tmp_path):
    vae_dir, dit_dir = save_models(generator, tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist.*train_vae"):
        VideoGenerator.from_pretrained(tmp_path / "nowhere", dit_dir, generator.text_encoder)
    (dit_dir / FLOW_CONFIG_NAME).write_text(json.dumps({"prediction": "x0", "bogus": 1}))
    with pytest.raises(ValueError, match="unknown FlowConfig key\\(s\\) \\['bogus'\\]"):
        VideoGenerator.from_pretrained(vae_dir, dit_dir, generator.text_encoder)
