"""Fréchet Video Distance, the StyleGAN-V protocol (Skorokhodov et al. 2022), and the extractors.

FVD is the Fréchet distance (:mod:`evaluation.frechet`) between Gaussians fitted to video features
of real and generated clips. Numbers are only comparable when everything below matches, so
:class:`FVDResult` records all of it and :func:`check_comparable` refuses the rest:

- **Extractor** (its name and the sha256 of its weights file). ``fvd_i3d`` uses the I3D
  TorchScript ``i3d_torchscript.pt`` that StyleGAN-V and DIGAN distribute (a conversion of the
  tf.hub Kinetics-400 I3D used by the original FVD); ``fvd_videomae`` uses VideoMAE-v2 features,
  the content-debiased FVD of Ge et al. 2024 (cd-fvd); ``fvd_domain`` an in-domain extractor
  written against :class:`VideoFeatureExtractor`.
- **Clips**: ``num_frames`` frames (16 in StyleGAN-V's ``fvd2048_16f``) taken ``stride`` frames
  apart (StyleGAN-V's ``subsample_factor``; 1 = consecutive), **starting at frame 0** of every
  video, real and generated alike (StyleGAN-V takes generated clips from t = 0 and real clips at a
  random offset; a fixed start makes the real statistics reproducible and cacheable). A video
  shorter than ``1 + (num_frames - 1) * stride`` frames is an error, never padded or looped.
- **N**, the number of clips on each side: 2,048 in the protocol. The Fréchet distance of
  finite samples is biased upward, more so at small N, so values at other N are neither
  comparable to papers nor to each other; results at N < 2048 carry a warning and comparisons at
  unequal N are refused.
- **Covariance divisor**: StyleGAN-V and cd-fvd divide by N (``FeatureStats.get_mean_cov``:
  ``E[xxᵀ] − μμᵀ``), so :func:`fvd` defaults to ``ddof=0``; the Fréchet core's own default is
  ``ddof=1`` (pytorch-fid, torch-fidelity).

The cross term is computed in the symmetric form of :mod:`evaluation.frechet`, not with
``scipy.linalg.sqrtm`` of the product as StyleGAN-V and cd-fvd do: the same quantity, but real and
stable where N < feature dimension (see ``tests/evaluation/test_fvd.py`` for the measured
difference). Every value carries a percentile bootstrap interval.

Weights are loaded from local files only (``components/`` fetches them from S3); torch is
imported when an extractor is built, so the distance itself stays NumPy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from evaluation.frechet import bootstrap

PROTOCOL_N = 2048  # clips per side in StyleGAN-V's fvd2048_16f (and cd-fvd's FVD_SAMPLE_SIZE)
I3D_SOURCE = (
    "i3d_torchscript.pt is the TorchScript I3D (Kinetics-400) that StyleGAN-V and DIGAN "
    "distribute (StyleGAN-V's src/metrics/frechet_video_distance.py downloads it from "
    "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt); put a copy at this path or "
    "point evaluate.i3d at it (a path or s3:// URI)"
)


@runtime_checkable
class VideoFeatureExtractor(Protocol):
    """What every FVD feature extractor provides.

    Attributes:
        name: the metric suffix (``fvd_<name>``): "i3d", "videomae", "domain".
        sha256: of the weights file, recorded with every result.
        num_frames: frames per clip the extractor needs (0 = any length).
    """

    name: str
    sha256: str
    num_frames: int

    def features(self, videos: Sequence[np.ndarray]) -> np.ndarray:
        """(N, D) float features of N uint8 videos, each (T, H, W, 3)."""
        ...


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def frames_needed(num_frames: int, stride: int) -> int:
    """Frames a video needs for one clip of ``num_frames`` frames ``stride`` apart."""
    return 1 + (num_frames - 1) * stride


def select_clips(
    videos: Sequence[np.ndarray], num_frames: int, stride: int = 1
) -> list[np.ndarray]:
    """The protocol's clip of every video: frames ``0, stride, ..., (num_frames - 1) * stride``.

    Each video must be uint8 (T, H, W, 3); ``num_frames=0`` keeps whole videos.
    """
    if num_frames < 0 or stride < 1:
        raise ValueError(f"need num_frames >= 0 and stride >= 1, got {num_frames}, {stride}")
    need = frames_needed(num_frames, stride) if num_frames else 1
    clips = []
    for i, video in enumerate(videos):
        video = np.asarray(video)
        if video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"clip {i}: videos must be (T, H, W, 3), got shape {video.shape}")
        if video.dtype != np.uint8:
            raise ValueError(f"clip {i}: videos must be uint8 in [0, 255], got {video.dtype}")
        if video.shape[0] < need:
            raise ValueError(
                f"clip {i} has {video.shape[0]} frames, but FVD with num_frames={num_frames} and "
                f"stride={stride} needs at least {need} (frames 0, {stride}, ..., {need - 1}): "
                f"sample or cut clips of >= {need} frames (values at another num_frames or "
                "stride are a different metric)"
            )
        clips.append(video[:need:stride] if num_frames else video)
    return clips


def _batches(clips: list[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Stacks of up to ``batch_size`` consecutive clips of one shape, in order."""
    start = 0
    while start < len(clips):
        end = start + 1
        while (
            end < len(clips) and end - start < batch_size and clips[end].shape == clips[start].shape
        ):
            end += 1
        yield np.stack(clips[start:end])
        start = end


def _as_features(out: Any, batch: int, what: str) -> np.ndarray:
    if isinstance(out, (tuple, list)):
        out = out[0]
    feats = out.detach().float().cpu().numpy()
    if feats.ndim != 2 or feats.shape[0] != batch:
        raise ValueError(f"{what} returned shape {tuple(feats.shape)}, expected ({batch}, D)")
    return feats


def _load_torchscript(path: str | Path, device: str, missing: str) -> tuple[Any, str, Path]:
    """(module in eval mode, sha256 of the file, path); FileNotFoundError with ``missing``."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(missing)
    model = torch.jit.load(str(path), map_location=device).eval()
    return model, file_sha256(path), path


@dataclass
class I3DExtractor:
    """I3D features as StyleGAN-V computes them: its TorchScript called on uint8 clips with
    ``rescale=True, resize=True, return_features=True`` (the model maps [0, 255] to [-1, 1],
    resizes to 224x224 and returns the 400 pre-softmax logits).

    Clips: ``num_frames`` frames ``stride`` apart from frame 0 (see the module docstring).
    """

    model: Any  # a torch.jit.ScriptModule (or anything with the same call signature)
    sha256: str
    num_frames: int = 16
    stride: int = 1
    batch_size: int = 8
    device: str = "cpu"
    path: Path | None = None
    name: str = "i3d"

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        device: str = "cpu",
        num_frames: int = 16,
        stride: int = 1,
        batch_size: int = 8,
    ) -> I3DExtractor:
        if num_frames < 1 or stride < 1:
            raise ValueError(
                f"I3D needs num_frames >= 1 and stride >= 1, got {num_frames}, {stride}"
            )
        missing = f"I3D TorchScript not found at {path}: {I3D_SOURCE}"
        model, sha, path = _load_torchscript(path, device, missing)
        return cls(model, sha, num_frames, stride, batch_size, device, path)

    def features(self, videos: Sequence[np.ndarray]) -> np.ndarray:
        import torch

        clips = select_clips(videos, self.num_frames, self.stride)
        out = []
        with torch.inference_mode():
            for batch in _batches(clips, self.batch_size):
                # (B, T, H, W, 3) -> (B, 3, T, H, W), still uint8: the model rescales itself
                x = torch.from_numpy(batch).permute(0, 4, 1, 2, 3).contiguous().to(self.device)
                y = self.model(x, rescale=True, resize=True, return_features=True)
                out.append(_as_features(y, len(batch), "the I3D TorchScript"))
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@dataclass
class VideoMAEExtractor:
    """VideoMAE-v2 features for content-debiased FVD (Ge et al. 2024), preprocessed as cd-fvd's
    ``preprocess_videomae`` does: uint8 -> float in [0, 1], each frame resized bilinearly
    (``align_corners=False``, no antialiasing) to 224x224, then (B, 3, T, 224, 224) float32 into
    the TorchScript, which returns (B, D) features (cd-fvd: ``model.forward_features``, 1408-d for
    ViT-g).

    cd-fvd applies **no** ImageNet mean/std normalisation although VideoMAE-v2 was fine-tuned with
    it; published cd-FVD numbers come from that code, so this extractor does the same. A TorchScript
    that wants the normalisation must contain it (its sha256 then identifies that variant).
    """

    model: Any
    sha256: str
    num_frames: int = 16
    stride: int = 1
    batch_size: int = 4
    device: str = "cpu"
    path: Path | None = None
    name: str = "videomae"
    size: tuple[int, int] = (224, 224)

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        device: str = "cpu",
        num_frames: int = 16,
        stride: int = 1,
        batch_size: int = 4,
    ) -> VideoMAEExtractor:
        if num_frames < 1 or stride < 1:
            raise ValueError(
                f"VideoMAE needs num_frames >= 1 and stride >= 1, got {num_frames}, {stride}"
            )
        missing = (
            f"VideoMAE-v2 TorchScript not found at {path}: content-debiased FVD needs a "
            "TorchScript export of VideoMAE-v2's forward_features (cd-fvd uses ViT-g, "
            "vit_g_hybrid_pt_1200e_ssv2_ft.pth) taking float (B, 3, 16, 224, 224) in [0, 1]"
        )
        model, sha, path = _load_torchscript(path, device, missing)
        return cls(model, sha, num_frames, stride, batch_size, device, path)

    def preprocess(self, batch: np.ndarray) -> Any:
        """(B, T, H, W, 3) uint8 -> (B, 3, T, 224, 224) float32 in [0, 1] (cd-fvd's ops)."""
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(batch).permute(0, 4, 1, 2, 3).to(torch.float32) / 255
        b, c, t, h, w = x.shape
        # cd-fvd interpolates each (C, T, H, W) video as a 4-D batch: bilinear over (H, W) only
        x = F.interpolate(
            x.reshape(b * c, t, h, w), size=self.size, mode="bilinear", align_corners=False
        )
        return x.reshape(b, c, t, *self.size)

    def features(self, videos: Sequence[np.ndarray]) -> np.ndarray:
        import torch

        clips = select_clips(videos, self.num_frames, self.stride)
        out = []
        with torch.inference_mode():
            for batch in _batches(clips, self.batch_size):
                y = self.model(self.preprocess(batch).to(self.device))
                out.append(_as_features(y, len(batch), "the VideoMAE-v2 TorchScript"))
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@dataclass(frozen=True)
class FVDResult:
    """One FVD value, its bootstrap interval and everything that makes it comparable."""

    value: float
    low: float
    high: float
    n_real: int
    n_fake: int
    extractor: str  # the extractor's name: the metric is fvd_<extractor>
    extractor_sha256: str
    num_frames: int
    stride: int
    ddof: int
    confidence: float = 0.95
    resamples: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def metric_name(self) -> str:
        return f"fvd_{self.extractor}"

    def as_metrics(self) -> dict[str, float]:
        name = self.metric_name
        return {
            name: self.value,
            f"{name}_low": self.low,
            f"{name}_high": self.high,
            f"{name}_n_real": float(self.n_real),
            f"{name}_n_fake": float(self.n_fake),
        }


def fvd(
    real_features: np.ndarray,
    fake_features: np.ndarray,
    *,
    extractor: VideoFeatureExtractor,
    resamples: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
    ddof: int = 0,
) -> FVDResult:
    """FVD of (N, D) real and (M, D) fake features that ``extractor`` computed, with a percentile
    bootstrap interval (``resamples`` draws, fixed ``seed``). ``ddof=0`` divides covariances by
    N as StyleGAN-V and cd-fvd do."""
    r = bootstrap(
        real_features,
        fake_features,
        resamples=resamples,
        confidence=confidence,
        seed=seed,
        ddof=ddof,
    )
    notes = []
    if min(r.n_a, r.n_b) < PROTOCOL_N:
        notes.append(
            f"FVD on n_real={r.n_a}, n_fake={r.n_b} clips, fewer than the protocol's "
            f"{PROTOCOL_N} per side: the value is biased upward (more so at smaller N) and not "
            f"comparable to published FVD or to values at another N"
        )
    return FVDResult(
        value=r.value,
        low=r.low,
        high=r.high,
        n_real=r.n_a,
        n_fake=r.n_b,
        extractor=extractor.name,
        extractor_sha256=extractor.sha256,
        num_frames=extractor.num_frames,
        stride=int(getattr(extractor, "stride", 1)),
        ddof=ddof,
        confidence=confidence,
        resamples=resamples,
        warnings=notes,
    )


def compute_fvd(
    extractor: VideoFeatureExtractor,
    real_videos: Sequence[np.ndarray],
    fake_videos: Sequence[np.ndarray],
    *,
    resamples: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
    ddof: int = 0,
) -> FVDResult:
    """:func:`fvd` of ``extractor``'s features of uint8 (T, H, W, 3) real and fake videos."""
    return fvd(
        extractor.features(real_videos),
        extractor.features(fake_videos),
        extractor=extractor,
        resamples=resamples,
        confidence=confidence,
        seed=seed,
        ddof=ddof,
    )


_COMPARED = (
    ("extractor", "extractor"),
    ("extractor_sha256", "extractor weights (sha256)"),
    ("n_real", "n_real (FVD's bias depends on N: compute both at the same N)"),
    ("n_fake", "n_fake (FVD's bias depends on N: compute both at the same N)"),
    ("num_frames", "num_frames"),
    ("stride", "stride"),
    ("ddof", "covariance divisor (ddof)"),
)


def check_comparable(a: FVDResult, b: FVDResult) -> None:
    """Raise ValueError unless ``a`` and ``b`` can be compared: the same extractor and weights,
    the same n_real and n_fake, and the same clips (num_frames, stride) and divisor."""
    differ = [
        f"{label}: {getattr(a, key)!r} vs {getattr(b, key)!r}"
        for key, label in _COMPARED
        if getattr(a, key) != getattr(b, key)
    ]
    if differ:
        raise ValueError(
            f"{a.metric_name} and {b.metric_name} are not comparable; they differ in "
            + "; ".join(differ)
        )


__all__ = [
    "PROTOCOL_N",
    "FVDResult",
    "I3DExtractor",
    "VideoFeatureExtractor",
    "VideoMAEExtractor",
    "check_comparable",
    "compute_fvd",
    "file_sha256",
    "frames_needed",
    "fvd",
    "select_clips",
]
