"""Causal 3D VAE: shapes for any size, causality, chunked == full, tiled ~ full, io, training."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from model.config import UnknownSizeError
from model.vae import (
    VAE_SIZES,
    CausalVAE,
    DiagonalGaussian,
    VAEConfig,
    VideoMeta,
    build_vae,
    compute_latent_stats,
    count_parameters,
)
from tests.testing_utils.model_tester import ModelTesterMixin
from tests.testing_utils.models import random_video, tiny_vae_config, wave_video

torch.set_num_threads(1)

TINY = tiny_vae_config()


@pytest.fixture(scope="module")
def vae() -> CausalVAE:
    torch.manual_seed(0)
    return CausalVAE(TINY).eval()


class TestCausalVAE(ModelTesterMixin):
    model_class = CausalVAE

    def init_config(self):
        return TINY

    def inputs(self, seed: int = 0) -> dict:
        return {"video": random_video(1, 3, 9, 16, 16, seed=seed)}

    def output(self, model, inputs):  # a posterior sample, seeded
        return model(inputs["video"], generator=torch.Generator().manual_seed(7))[0]

    def training_loss(self, model, inputs):
        video = inputs["video"]
        recon, posterior = model(video, generator=torch.Generator().manual_seed(0))
        return F.mse_loss(recon, video) + 1e-6 * posterior.kl().mean()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max |a-b| / max |b|, mean |a-b| / mean |b|)."""
    diff = (a - b).abs()
    return (diff.max() / b.abs().max()).item(), (diff.mean() / b.abs().mean()).item()


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"spatial_downsample": 6}, "power of two"),
        ({"temporal_downsample": 3}, "power of two"),
        ({"channel_multipliers": (1, 2, 4)}, "needs log2"),
        ({"temporal_downsample": 16}, "level transitions"),
        ({"latent_channels": 0}, "positive int"),
        ({"scaling_factor": 0.0}, "scaling_factor"),
    ],
)
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY, **overrides)


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown VAEConfig key\(s\) \['latent_dim'\]"):
        VAEConfig.from_dict({**TINY.to_dict(), "latent_dim": 4})
    assert VAEConfig.from_dict(json.loads(json.dumps(TINY.to_dict()))) == TINY


def test_registry_configs_build():
    assert set(VAE_SIZES) == {"vae-tiny", "vae-xs", "vae-s", "vae-m"}
    xs = build_vae("vae-xs", latent_channels=8)
    assert xs.config.latent_channels == 8 and count_parameters(xs) == xs.num_parameters() > 0
    with pytest.raises(UnknownSizeError, match="choose one of"):
        build_vae("vae-xxl")


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(("frames", "latent_frames"), [(1, 1), (5, 2), (9, 3)])
def test_valid_sizes_round_trip_shapes(vae, frames, latent_frames):
    video = random_video(2, 3, frames, 32, 48)
    with torch.no_grad():
        posterior = vae.encode(video)
        recon = vae.decode(posterior.mode())
    assert posterior.mean.shape == (2, 4, latent_frames, 4, 6)
    assert recon.shape == video.shape


def test_encode_rejects_invalid_sizes(vae):
    with pytest.raises(ValueError, match="encode_video"):
        vae.encode(random_video(1, 3, 6, 32, 32))
    with pytest.raises(ValueError, match="encode_video"):
        vae.encode(random_video(1, 3, 5, 20, 32))


def test_other_frame_counts_pad_last_frame_and_crop_back(vae):
    video = random_video(1, 3, 6, 16, 16)
    with torch.no_grad():
        posterior, meta = vae.encode_video(video)
        padded = torch.cat([video, video[:, :, -1:].expand(-1, -1, 3, -1, -1)], dim=2)  # T 6 -> 9
        assert torch.allclose(posterior.mean, vae.encode(padded).mean, atol=1e-6)
        recon = vae.decode_video(posterior.mode(), meta)
    assert meta == VideoMeta(num_frames=6, height=16, width=16)
    assert posterior.mean.shape[2] == 3 and recon.shape == video.shape
    with pytest.raises(ValueError, match="does not match"):
        vae.decode_video(posterior.mode()[:, :, :2], meta)


@pytest.mark.parametrize("size", [(20, 36), (72, 40), (40, 72), (9, 13)])
def test_any_spatial_size_decodes_back_to_input_size(vae, size):
    video = random_video(1, 3, 5, *size)
    with torch.no_grad():
        recon, posterior = vae(video)
    assert recon.shape == video.shape
    assert posterior.mean.shape[2:] == vae.latent_size(5, *size)


# --------------------------------------------------------------------------- causality


def latent_frame_of(frame: int, temporal_factor: int = 4) -> int:
    return 0 if frame == 0 else (frame - 1) // temporal_factor + 1


@pytest.mark.parametrize("frame", [1, 4, 5, 8, 12])
def test_encoder_is_causal(vae, frame):
    video = random_video(1, 3, 13, 16, 16)
    perturbed = video.clone()
    perturbed[:, :, frame] += 0.5
    with torch.no_grad():
        before, after = vae.encode(video).mean, vae.encode(perturbed).mean
    first_changed = latent_frame_of(frame)
    assert torch.allclose(before[:, :, :first_changed], after[:, :, :first_changed], atol=1e-6)
    assert not torch.allclose(before[:, :, first_changed], after[:, :, first_changed], atol=1e-4)


@pytest.mark.parametrize("latent_frame", [1, 2])
def test_decoder_is_causal(vae, latent_frame):
    z = random_video(1, 4, 4, 2, 2)
    perturbed = z.clone()
    perturbed[:, :, latent_frame] += 1.0
    with torch.no_grad():
        before, after = vae.decode(z), vae.decode(perturbed)
    first_affected = 1 + 4 * (latent_frame - 1)
    assert torch.allclose(before[:, :, :first_affected], after[:, :, :first_affected], atol=1e-6)


# --------------------------------------------------------------------------- chunks and tiles


@pytest.mark.parametrize("chunk", [1, 2])
def test_chunked_encode_decode_equal_full_pass(vae, chunk):
    video = random_video(1, 3, 13, 16, 24)
    with torch.no_grad():
        full = vae.encode(video)
        chunked = vae.encode(video, chunk_latent_frames=chunk)
        z = full.mode()
        decoded_full, decoded_chunked = vae.decode(z), vae.decode(z, chunk_latent_frames=chunk)
    torch.testing.assert_close(chunked.mean, full.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked.logvar, full.logvar, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decoded_chunked, decoded_full, atol=1e-5, rtol=1e-5)


def test_tiled_pass_is_close_to_full_pass(vae):
    # Error relative to the full pass, (max |diff| / max |full|, mean |diff| / mean |full|),
    # measured on TINY at init (seed 0; random filters see tile borders the farthest, trained
    # ones are more local), 256x256 smooth frame, 128 px tiles:
    #   overlap 64: encode 0.244 / 0.086, decode 0.703 / 0.147
    #   overlap 32: encode 0.495 / 0.226, decode 1.004 / 0.315
    # Bounds leave ~15% headroom; the error must also shrink as the overlap grows.
    video = wave_video(1, 256, 256)
    with torch.no_grad():
        latent = vae.encode(video).mean
        decoded = vae.decode(latent)
        errors = {}
        for overlap in (32, 64):
            tiled_latent = vae.encode(video, tile_size=128, tile_overlap=overlap).mean
            tiled_decoded = vae.decode(latent, tile_size=128, tile_overlap=overlap)
            errors[overlap] = rel_err(tiled_latent, latent), rel_err(tiled_decoded, decoded)
    (enc_max, enc_mean), (dec_max, dec_mean) = errors[64]
    assert enc_max < 0.3 and enc_mean < 0.1, errors
    assert dec_max < 0.8 and dec_mean < 0.17, errors
    assert enc_mean < errors[32][0][1] and dec_mean < errors[32][1][1], errors


def test_tiles_covering_the_frame_equal_full_pass_and_combine_with_chunks(vae):
    video = random_video(1, 3, 9, 32, 48)
    with torch.no_grad():
        full = vae.encode(video).mean
        one_tile = vae.encode(video, tile_size=48, tile_overlap=16).mean
        tiled = vae.encode(video, tile_size=32, tile_overlap=16).mean
        tiled_chunked = vae.encode(video, tile_size=32, tile_overlap=16, chunk_latent_frames=1).mean
    torch.testing.assert_close(one_tile, full, atol=1e-6, rtol=0)
    torch.testing.assert_close(tiled_chunked, tiled, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="multiples of the spatial factor"):
        vae.encode(video, tile_size=30, tile_overlap=8)


# --------------------------------------------------------------------------- posterior and latents


def test_kl_is_nonnegative_and_zero_at_prior(vae):
    with torch.no_grad():
        _, posterior = vae(random_video(2, 3, 5, 16, 16))
    assert posterior.kl().shape == (2,) and (posterior.kl() >= 0).all()
    prior = DiagonalGaussian(torch.zeros(1, 8, 2, 3, 3))
    assert torch.equal(prior.kl(), torch.zeros(1))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, posterior = vae(random_video(2, 3, 5, 16, 16))
    assert posterior.mean.dtype == torch.bfloat16 and posterior.kl().dtype == torch.float32


def test_latent_stats_normalize_latents(vae):
    batches = [random_video(2, 3, 5, 16, 16, seed=s) for s in range(3)]
    shift, scale = compute_latent_stats(vae, batches)
    model = CausalVAE(dataclasses.replace(TINY, shift_factor=shift, scaling_factor=scale))
    model.load_state_dict(vae.state_dict())
    with torch.no_grad():
        z = torch.cat([model.encode(b).mode() for b in batches])
    normalized = model.normalize_latent(z)
    assert abs(normalized.mean().item()) < 1e-4 and abs(normalized.std().item() - 1) < 1e-2
    torch.testing.assert_close(model.denormalize_latent(normalized), z)


# --------------------------------------------------------------------------- io and training


def test_save_load_round_trip(vae, tmp_path):
    vae_with_stats = CausalVAE(TINY)
    vae_with_stats.load_state_dict(vae.state_dict())
    vae_with_stats.set_latent_stats(shift=0.1, scale=2.0)
    vae_with_stats.save_pretrained(tmp_path / "vae")
    loaded = CausalVAE.from_pretrained(tmp_path / "vae").eval()
    video = random_video(1, 3, 5, 16, 16)
    with torch.no_grad():
        expected, _ = vae_with_stats.eval()(video, sample=False)
        actual, _ = loaded(video, sample=False)
    assert loaded.config == vae_with_stats.config and loaded.config.scaling_factor == 2.0
    assert torch.equal(actual, expected)

    config_path = tmp_path / "vae" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "attention": True}))
    with pytest.raises(ValueError, match="unknown VAEConfig key"):
        CausalVAE.from_pretrained(tmp_path / "vae")


def test_tiny_overfit_reduces_reconstruction_loss():
    # Two 5x16x16 clips, 100 Adam steps: measured 0.189 -> 0.018 (10.7x); ~5 s on one thread.
    torch.manual_seed(0)
    model = CausalVAE(TINY)
    clips = torch.cat([wave_video(5, 16, 16), random_video(1, 3, 5, 16, 16).mul(0.3)])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        recon, _ = model(clips, sample=False)
        loss = F.mse_loss(recon, clips)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] * 3 < losses[0], losses[::10]
