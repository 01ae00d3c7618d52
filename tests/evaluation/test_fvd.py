"""FVD (StyleGAN-V protocol) end to end against cd-fvd with the same random I3D weights, and the
protocol's guards: clip selection, the short-clip error, the small-N warning, comparability."""

from __future__ import annotations

import types
import warnings
from dataclasses import replace
from functools import partial

import numpy as np
import pytest
import torch

from evaluation.frechet import frechet_from_features
from evaluation.fvd import (
    PROTOCOL_N,
    FVDResult,
    I3DExtractor,
    VideoFeatureExtractor,
    VideoMAEExtractor,
    check_comparable,
    compute_fvd,
    file_sha256,
    fvd,
    select_clips,
)
from tests.testing_utils import no_torchvision
from tests.testing_utils.i3d import (
    save_i3d_state_dict,
    save_i3d_torchscript,
    save_tiny_i3d_torchscript,
)

no_torchvision.install()  # cdfvd.fvd imports torchvision at module level

import cdfvd.third_party.VideoMAEv2.utils as cdfvd_videomae_utils  # noqa: E402
from cdfvd.fvd import cdfvd, get_videomae_features  # noqa: E402
from cdfvd.utils.metric_utils import FeatureStats  # noqa: E402


def videos(n: int, brightness: float, seed: int, frames: int = 16, side: int = 32) -> np.ndarray:
    """(n, frames, side, side, 3) uint8: random 4x4 blocks upsampled, scaled, plus noise."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (n, frames, 4, 4, 3)).astype(np.float32) * brightness
    v = blocks.repeat(side // 4, axis=2).repeat(side // 4, axis=3)
    return np.clip(v + rng.normal(0, 20, v.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tiny_i3d(tmp_path_factory):
    return save_tiny_i3d_torchscript(tmp_path_factory.mktemp("tiny") / "i3d_torchscript.pt")


# --------------------------------------------------------------------------- against cd-fvd


@pytest.mark.slow
def test_fvd_matches_cd_fvd_end_to_end(tmp_path):
    """~25 s on one CPU thread (I3D at 224x224 is ~1 s a clip per path, 8 clips each): slow.

    The same network runs both ways: ours is the scripted StyleGAN-V-signature file loaded by
    I3DExtractor.from_file (uint8 into the model, which scales to [-1, 1] and then resizes
    trilinearly inside); cd-fvd resizes the [0, 255] floats bilinearly and then scales
    (preprocess_i3d) and runs the eager module. Scaling commutes with linear interpolation and
    trilinear with T unchanged is bilinear per frame, so the features differ by float32 round-off
    only: measured 3.5e-7 to 4.4e-7 of the largest feature (1 and 2 threads; tolerance 1e-5). The
    distances differ by 4.7e-7 to 5.8e-7 relative (tolerance 1e-5), almost all of it from those
    features: on cd-fvd's own features our symmetric-eigh cross term and cd-fvd's
    scipy.linalg.sqrtm of the product agree to 8e-9 (tolerance 1e-6), although both covariances
    have rank 3 in 400 dimensions. Both divide covariances by N (ddof=0).
    """
    ts = save_i3d_torchscript(tmp_path / "i3d_torchscript.pt", seed=0)
    state = save_i3d_state_dict(tmp_path / "i3d_pretrained_400.pt", seed=0)
    real, fake = videos(4, 1.0, seed=1), videos(4, 0.6, seed=2)

    extractor = I3DExtractor.from_file(ts, num_frames=16, batch_size=4)
    ours_real, ours_fake = extractor.features(list(real)), extractor.features(list(fake))
    ours = fvd(ours_real, ours_fake, extractor=extractor, resamples=20, seed=0)

    peer = cdfvd(
        model="i3d",
        ckpt_path=str(state),
        device="cpu",
        n_real="full",
        n_fake="full",
        compute_feats=True,  # keep the features too, to compare them
    )
    theirs = float(peer.compute_fvd(real, fake))
    peer_real, peer_fake = peer.real_stats.get_all(), peer.fake_stats.get_all()

    assert ours_real.shape == peer_real.shape == (4, 400)
    scale = np.abs(peer_real).max()
    np.testing.assert_allclose(ours_real, peer_real, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(ours_fake, peer_fake, rtol=0, atol=1e-5 * scale)
    assert ours_real.std(axis=0).mean() > 1e-3 * scale  # clips differ: not comparing round-off

    assert theirs > 1.0
    assert ours.value == pytest.approx(theirs, rel=1e-5)
    assert frechet_from_features(peer_real, peer_fake, ddof=0) == pytest.approx(theirs, rel=1e-6)
    assert ours.low <= ours.high
    assert (ours.n_real, ours.n_fake, ours.num_frames, ours.stride, ours.ddof) == (4, 4, 16, 1, 0)
    assert ours.extractor_sha256 == file_sha256(ts) and ours.metric_name == "fvd_i3d"


class _Compose:
    """torchvision.transforms.Compose's whole behaviour (apply each transform in turn): cd-fvd's
    preprocess_videomae only chains its own two transforms with it."""

    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


def test_videomae_features_match_cd_fvd(tmp_path, monkeypatch):
    """A one-block VideoMAE-v2 ViT (cd-fvd's class, patch 14, 16 frames, tubelet 2) exported as
    TorchScript of forward_features; our preprocessing is cd-fvd's ops, so features are equal."""
    from cdfvd.third_party.VideoMAEv2.videomaev2_finetune import VisionTransformer

    monkeypatch.setattr(cdfvd_videomae_utils, "transforms", types.SimpleNamespace(Compose=_Compose))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vit = VisionTransformer(
            img_size=224,
            patch_size=14,
            embed_dim=32,
            depth=1,
            num_heads=2,
            mlp_ratio=2.0,
            qkv_bias=True,
            num_classes=4,
            all_frames=16,
            tubelet_size=2,
            use_mean_pooling=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        ).eval()

    class Features(torch.nn.Module):
        def __init__(self, vit):
            super().__init__()
            self.vit = vit

        def forward(self, x):
            return self.vit.forward_features(x)

    path = tmp_path / "videomae.pt"
    with torch.no_grad(), warnings.catch_warnings():  # its size checks become constants
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(Features(vit), torch.zeros(1, 3, 16, 224, 224), check_trace=False)
    torch.jit.save(traced, str(path))

    clips = np.concatenate([videos(2, 1.0, seed=3, side=40), videos(1, 0.5, seed=4, side=40)])
    theirs = get_videomae_features(FeatureStats(capture_all=True), vit, clips, device="cpu")
    extractor = VideoMAEExtractor.from_file(path, batch_size=2)
    ours = extractor.features(list(clips))
    assert ours.shape == (3, 32) and extractor.name == "videomae"
    np.testing.assert_allclose(ours, theirs.get_all(), rtol=0, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="VideoMAE"):
        VideoMAEExtractor.from_file(tmp_path / "missing.pt")


# --------------------------------------------------------------------------- the protocol's guards


def test_i3d_file_is_loaded_with_its_sha256(tiny_i3d, tmp_path):
    extractor = I3DExtractor.from_file(tiny_i3d, num_frames=16, batch_size=2)
    assert isinstance(extractor, VideoFeatureExtractor)
    assert extractor.sha256 == file_sha256(tiny_i3d) and extractor.name == "i3d"
    feats = extractor.features(list(videos(3, 1.0, seed=5, frames=17)))
    assert feats.shape == (3, 32) and feats.dtype == np.float32
    missing = tmp_path / "nowhere" / "i3d_torchscript.pt"
    with pytest.raises(FileNotFoundError, match="StyleGAN-V") as err:
        I3DExtractor.from_file(missing)
    assert str(missing) in str(err.value)


def test_compute_fvd_is_fvd_of_the_extractor_features(tiny_i3d):
    extractor = I3DExtractor.from_file(tiny_i3d)
    real, fake = list(videos(5, 1.0, seed=10)), list(videos(6, 0.6, seed=11))
    direct = fvd(extractor.features(real), extractor.features(fake), extractor=extractor)
    assert compute_fvd(extractor, real, fake) == direct
    assert direct.value > 0 and direct.low <= direct.high and len(direct.warnings) == 1


def test_clips_start_at_frame_zero_with_a_stride(tiny_i3d):
    long = videos(1, 1.0, seed=6, frames=40)[0]
    assert np.array_equal(select_clips([long], 16, 2)[0], long[0:31:2])
    assert np.array_equal(select_clips([long], 0)[0], long)  # 0 = any length: whole videos
    strided = I3DExtractor.from_file(tiny_i3d, num_frames=16, stride=2)
    consecutive = I3DExtractor.from_file(tiny_i3d, num_frames=16, stride=1)
    np.testing.assert_array_equal(strided.features([long]), consecutive.features([long[::2]]))
    # clips of different sizes are batched apart, in order
    small, large = videos(2, 1.0, seed=7), videos(1, 1.0, seed=8, side=48)
    mixed = consecutive.features([small[0], large[0], small[1]])
    one_by_one = np.concatenate([consecutive.features([v]) for v in (small[0], large[0], small[1])])
    np.testing.assert_allclose(mixed, one_by_one, rtol=1e-5, atol=1e-6)


def test_short_clip_is_an_error_naming_the_clip(tiny_i3d):
    extractor = I3DExtractor.from_file(tiny_i3d, num_frames=16, stride=2)
    clips = [videos(1, 1.0, seed=9, frames=31)[0], videos(1, 1.0, seed=9, frames=30)[0]]
    with pytest.raises(ValueError, match=r"clip 1 has 30 frames.*stride=2.*at least 31"):
        extractor.features(clips)
    with pytest.raises(ValueError, match="uint8"):
        select_clips([clips[0].astype(np.float32)], 16)
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        select_clips([clips[0][..., :1]], 16)


class _Named:
    name, sha256, num_frames, stride = "domain", "abc", 16, 1


def test_small_n_warns_and_metrics_are_named():
    rng = np.random.default_rng(0)
    small = fvd(rng.normal(size=(10, 4)), rng.normal(size=(12, 4)), extractor=_Named, resamples=5)
    assert small.metric_name == "fvd_domain" and len(small.warnings) == 1
    assert "2048" in small.warnings[0] and "n_real=10" in small.warnings[0]
    assert set(small.as_metrics()) == {
        "fvd_domain",
        "fvd_domain_low",
        "fvd_domain_high",
        "fvd_domain_n_real",
        "fvd_domain_n_fake",
    }
    assert small.as_metrics()["fvd_domain_n_fake"] == 12.0
    full = fvd(
        rng.normal(size=(PROTOCOL_N, 4)),
        rng.normal(size=(PROTOCOL_N, 4)),
        extractor=_Named,
        resamples=0,
    )
    assert full.warnings == [] and full.low == full.value == full.high
    assert full.ddof == 0  # StyleGAN-V's divisor


def test_check_comparable_refuses_other_extractors_and_n():
    base = FVDResult(1.0, 0.9, 1.1, 2048, 2048, "i3d", "aa", 16, 1, 0)
    check_comparable(base, replace(base, value=2.0, low=1.5, high=2.5))  # only values differ
    for change, what in [
        ({"extractor": "videomae"}, "extractor"),
        ({"extractor_sha256": "bb"}, "sha256"),
        ({"n_real": 1024}, "n_real"),
        ({"n_fake": 4096}, "n_fake"),
        ({"stride": 2}, "stride"),
        ({"num_frames": 128}, "num_frames"),
    ]:
        with pytest.raises(ValueError, match=what):
            check_comparable(base, replace(base, **change))
    with pytest.raises(ValueError, match="bias depends on N"):
        check_comparable(base, replace(base, n_real=4))
