import json
import math

import pytest
import torch
from torch import nn

from model.diffusion import FlowConfig, FlowMatching
from model.dit import DiT, DiTConfig
from model.generate import (
    ASPECTS,
    FLOW_CONFIG_NAME,
    VideoGenerator,
    load_flow_config,
    load_video,
    pooled_noise,
    save_flow_config,
    save_video,
    video_size,
)
from model.vae import CausalVAE, VAEConfig

torch.set_num_threads(1)

TEXT_DIM = 16
MAX_PIXELS = 64 * 64
MULTIPLE = 16  # VAE spatial factor 8 x DiT patch 2
STEPS = 3


class TinyText(nn.Module):
    """Stand-in for model.text: characters -> a random embedding table, same interface."""

    def __init__(self, dim: int = TEXT_DIM, max_length: int = 8):
        super().__init__()
        self.dim, self.max_length = dim, max_length
        self.table = nn.Embedding(128, dim)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            self.table.weight.copy_(torch.randn(128, dim, generator=gen))
        self.calls = 0

    @torch.no_grad()
    def encode(self, texts):
        self.calls += 1
        ids = torch.zeros(len(texts), self.max_length, dtype=torch.long)
        mask = torch.zeros(len(texts), self.max_length, dtype=torch.bool)
        for i, text in enumerate(texts):
            codes = [ord(c) % 127 + 1 for c in text][: self.max_length]
            ids[i, : len(codes)] = torch.tensor(codes, dtype=torch.long)
            mask[i, : len(codes)] = True
        return self.table(ids) * mask[..., None], mask


def tiny_vae() -> CausalVAE:
    torch.manual_seed(0)
    vae = CausalVAE(
        VAEConfig(
            base_channels=8, channel_multipliers=(1, 1, 2, 2), num_res_blocks=1, latent_channels=4
        )
    )
    vae.set_latent_stats(shift=0.1, scale=1.5)  # non-identity, so normalisation is exercised
    return vae.eval()


def tiny_dit() -> DiT:
    dit = DiT(DiTConfig(hidden_size=32, depth=2, num_heads=2, in_channels=4, text_dim=TEXT_DIM))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # undo the zero init so noise, text and guidance all matter
        for name, p in dit.named_parameters():
            is_norm_scale = "norm" in name and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if is_norm_scale else 0.0))
    return dit.eval()


def make_generator(**kwargs) -> VideoGenerator:
    return VideoGenerator(
        tiny_vae(),
        tiny_dit(),
        TinyText(),
        FlowMatching(FlowConfig()),
        max_frames=17,
        max_pixels=MAX_PIXELS,
        **kwargs,
    )


@pytest.fixture(scope="module")
def generator() -> VideoGenerator:
    return make_generator()


def size_of(aspect: str, frames: int = 5) -> tuple[int, int, int]:
    return video_size(aspect, frames, MAX_PIXELS, MULTIPLE)


def smooth_video(frames: int, height: int, width: int, batch: int | None = None) -> torch.Tensor:
    t = torch.linspace(0, 1, frames)[:, None, None]
    y = torch.linspace(-1, 1, height)[None, :, None]
    x = torch.linspace(-1, 1, width)[None, None, :]
    shape = (frames, height, width)
    video = torch.stack(
        [(0.8 * x).expand(shape), (0.8 * y).expand(shape), 0.6 * torch.sin(3 * x + 2 * y + 4 * t)]
    )  # (3, T, H, W)
    return video if batch is None else video.expand(batch, -1, -1, -1, -1).contiguous()


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
            DiT(DiTConfig(hidden_size=32, depth=1, num_heads=2, in_channels=8, text_dim=TEXT_DIM)),
            TinyText(),
            FlowMatching(),
        )
    with pytest.raises(ValueError, match="text_dim=16"):
        VideoGenerator(tiny_vae(), tiny_dit(), TinyText(dim=8), FlowMatching())


# --------------------------------------------------------------------------- edit


def test_edit_strength_zero_is_the_vae_reconstruction(generator):
    video = smooth_video(5, 48, 80)
    edited = generator.edit(video, "a green ball", strength=0.0)
    expected, _ = generator.vae(video[None], sample=False)
    torch.testing.assert_close(edited, expected[0].clamp(-1, 1), atol=1e-5, rtol=0)
    odd = smooth_video(6, 20, 28)  # any size: padded, then cropped back
    edited = generator.edit(odd, "a green ball", strength=0.0)
    assert edited.shape == odd.shape
    torch.testing.assert_close(edited, generator.reconstruct(odd))


def test_edit_strength_one_equals_generate_with_the_same_noise(generator):
    video = smooth_video(5, 48, 80)
    edited = generator.edit(video, "a green ball", strength=1.0, steps=STEPS, seed=5)
    generated = generator.generate(["a green ball"], 5, 48, 80, steps=STEPS, seed=5)[0]
    assert torch.equal(edited, generated)


def test_edit_partial_strength_and_batches(generator):
    videos = smooth_video(5, 36, 44, batch=2)
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


# --------------------------------------------------------------------------- files


def test_save_load_mp4_round_trip(tmp_path):
    video = smooth_video(5, 48, 80)
    path = save_video(video, tmp_path / "clip.mp4", fps=8)
    assert path == tmp_path / "clip.mp4" and path.stat().st_size > 0
    loaded = load_video(path)
    assert loaded.shape == video.shape
    assert (loaded - video).abs().mean() < 0.03
    assert load_video(path, max_frames=2).shape == (3, 2, 48, 80)


def test_save_load_png_and_odd_sizes(tmp_path):
    image = smooth_video(1, 21, 30)
    path = save_video(image, tmp_path / "still.mp4")
    assert path.suffix == ".png"  # one frame is written as a lossless PNG
    loaded = load_video(path)
    assert loaded.shape == image.shape
    assert (loaded - image).abs().max() <= 1 / 127.5 + 1e-6  # uint8 quantisation only
    odd = save_video(smooth_video(3, 21, 31), tmp_path / "odd")
    assert load_video(odd).shape == (3, 3, 22, 32)  # yuv420p: padded to even sides


def test_load_video_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_video(tmp_path / "nope.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    with pytest.raises(ValueError, match="not a readable video"):
        load_video(bad)
    with pytest.raises(ValueError, match=r"\(3, T, H, W\)"):
        save_video(torch.zeros(1, 3, 1, 8, 8), tmp_path / "x.png")


# --------------------------------------------------------------------------- from_pretrained


def save_models(generator: VideoGenerator, root):
    generator.vae.save_pretrained(root / "vae")
    generator.dit.save_pretrained(root / "dit")
    save_flow_config(generator.flow.config, root / "dit")
    return root / "vae", root / "dit"


def test_from_pretrained_round_trip(generator, tmp_path):
    vae_dir, dit_dir = save_models(generator, tmp_path)
    assert load_flow_config(dit_dir / FLOW_CONFIG_NAME) == generator.flow.config
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
    with pytest.raises(ValueError, match="unknown FlowConfig keys \\['bogus'\\]"):
        VideoGenerator.from_pretrained(vae_dir, dit_dir, generator.text_encoder)
