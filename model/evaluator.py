"""The in-domain evaluator: a small video-text contrastive model (CLIP-style) trained by the
pipeline, because no CLIP or I3D weights exist on this machine.

**Video tower, on pixels** (so it scores any generator's output, not only ours): a clip
(3, T, H, W) in [-1, 1] of any length and aspect ratio is resized so its *short side* is
``short_side`` (aspect kept, bilinear with antialiasing; see :func:`fit_short_side`), then a
(2+1)D residual conv net (per block a 3x3 spatial and a ``temporal_kernel`` temporal
convolution, per-frame GroupNorm; a stride-2 stem and a x2 spatial downsample between levels)
gives a feature map that is pooled over space and time into

- its global mean (C),
- the means of a ``grid`` x ``grid`` spatial grid, averaged over time (grid² C): where things are,
- the mean absolute difference of consecutive frames (C): motion energy, 0 for a still.

A linear layer maps that to the ``feature_dim`` pre-projection features
(:meth:`~VideoTextModel.semantic_features`); GELU, the clip's shape (log aspect ratio, still or
video) and a linear projection give the ``embed_dim`` joint embedding. Temporal convolutions pad
by replication, so a still image has the features of a static video of any length (its
embedding also knows it is a still). Every statistic is per frame or per clip (GroupNorm, no
batch norm): a clip's numbers do not depend on what it is batched with.

**FVD features** (:meth:`~VideoTextModel.video_features`, ``fvd_dim`` wide) are the
pre-projection features plus two blocks of *detail statistics* of the first (stem) layer's
responses, per channel: the log mean spatial high-pass energy (sharpness, texture, pixel noise)
and the mean temporal energy (motion, flicker, frame order). Each block is divided by its total
standard deviation over training clips (``feature_scale``, set by
:meth:`~VideoTextModel.fit_feature_scales` after training and saved with the weights), so the
three weigh alike. Why: the contrastive objective only rewards what captions name, so the
learned features become nearly blind to image quality. Measured on the demo corpus's 64
held-out clips (evaluator-xs, 300 steps): the Fréchet distance of the pre-projection features
between the clips and a copy with strong noise (sigma 64/255) or blur (sigma 1/20 of the short
side) was 0.13x and 0.11x the distance between two disjoint halves of the same clips; with the
detail blocks it is 21x and 2.4x (frame shuffling stays below the halves, 0.08x: only 4 of the
64 are videos). ``components/steps/train_evaluator`` reports every layer on every run.

**Text tower**: token states of the frozen text encoder (``model.text``; computed outside this
model and passed in with their mask) -> masked mean -> LayerNorm -> MLP -> ``embed_dim``.
Mean pooling is linear, so (B, 1, E) pre-pooled states with an all-True mask give the same
embedding as the full (B, L, E) states.

**Objective**: the symmetric InfoNCE loss of CLIP over a batch of matching (video, text) pairs,
with a learned temperature (``logit_scale``, clamped to ``max_logit_scale``).

PyTorch only; no file I/O (``Pretrained`` saves and loads).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ModelConfig, Pretrained, SizeRegistry

DETAIL_EPS = 1e-6  # floor of the detail energies before their log
Videos = Tensor | Sequence[Tensor]  # (B, 3, T, H, W), or clips (3, T, H, W) of different sizes


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class VideoTextConfig(ModelConfig):
    """Every hyperparameter of :class:`VideoTextModel`; saved as ``config.json``."""

    in_channels: int = 3
    short_side: int = 48  # working resolution: clips are resized so the short side is this
    widths: tuple[int, ...] = (16, 32, 64, 96)  # channels per level; x2 spatial down between
    blocks_per_level: int = 1
    temporal_kernel: int = 3  # frames seen by each temporal convolution (odd)
    grid: int = 2  # grid x grid spatial cells pooled beside the global mean (0: none)
    feature_dim: int = 128  # the pre-projection video features (FVD)
    embed_dim: int = 64  # the joint video-text embedding
    text_dim: int = 384  # token width of the text encoder (MiniLM: 384)
    text_hidden: int = 256
    init_temperature: float = 0.07  # CLIP's
    max_logit_scale: float = 100.0  # CLIP's clamp of exp(logit_scale)
    # Which frozen text encoder the text tower was trained on (TextConfig.encoder / max_length):
    # the loader builds that one, so text embeddings match the weights.
    text_encoder: str = "minilm"
    text_max_length: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in (
            "in_channels",
            "short_side",
            "blocks_per_level",
            "temporal_kernel",
            "feature_dim",
            "embed_dim",
            "text_dim",
            "text_hidden",
            "text_max_length",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"VideoTextConfig.{name} must be a positive int, got {value!r}")
        if not self.widths or not all(isinstance(w, int) and w >= 1 for w in self.widths):
            raise ValueError(f"VideoTextConfig.widths must be positive ints, got {self.widths!r}")
        if self.temporal_kernel % 2 == 0:
            raise ValueError(
                f"VideoTextConfig.temporal_kernel must be odd, got {self.temporal_kernel}"
            )
        if self.grid < 0:
            raise ValueError(f"VideoTextConfig.grid must be >= 0, got {self.grid}")
        if self.short_side < 2 ** len(self.widths):
            raise ValueError(
                f"VideoTextConfig.short_side={self.short_side} is too small for "
                f"{len(self.widths)} levels (a stride-2 stem and {len(self.widths) - 1} "
                f"downsamples): use at least {2 ** len(self.widths)}"
            )
        if not 0 < self.init_temperature < 1 or self.max_logit_scale <= 1:
            raise ValueError(
                "VideoTextConfig needs 0 < init_temperature < 1 and max_logit_scale > 1, got "
                f"{self.init_temperature}, {self.max_logit_scale}"
            )

    @property
    def fvd_dim(self) -> int:
        """Width of ``video_features``: pre-projection features + 2 x first-layer width."""
        return self.feature_dim + 2 * self.widths[0]

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled trunk statistics: mean, grid cells, motion energy."""
        return self.widths[-1] * (2 + self.grid**2)


# --------------------------------------------------------------------------- geometry


def working_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(h, w) with the short side ``short_side`` and the aspect ratio kept (rounded)."""
    if height <= width:
        return short_side, max(1, round(width * short_side / height))
    return max(1, round(height * short_side / width)), short_side


def fit_short_side(video: Tensor, short_side: int) -> Tensor:
    """Resize (B, C, T, H, W) so the short side is ``short_side``, aspect kept; bilinear with
    antialiasing (an area-like filter when shrinking). A clip already that size is returned as is."""
    b, c, t, h, w = video.shape
    size = working_size(h, w, short_side)
    if size == (h, w):
        return video
    frames = video.transpose(1, 2).reshape(b * t, c, h, w)  # (B*T, C, H, W)
    frames = F.interpolate(
        frames.float(), size=size, mode="bilinear", antialias=True, align_corners=False
    ).to(video.dtype)
    return frames.reshape(b, t, c, *size).transpose(1, 2)  # (B, C, T, h, w)


def _groups(channels: int) -> int:
    """GroupNorm groups: the largest divisor of ``channels`` that is at most 8."""
    return max(g for g in range(1, 9) if channels % g == 0)


# --------------------------------------------------------------------------- video tower


def temporal_window(x: Tensor, frames: int, kernel: int) -> Tensor:
    """(B*T, C, H, W) frames -> (B*T, kernel*C, H, W): each frame with its ``kernel // 2``
    neighbours on each side stacked on channels, the end frames replicated past the ends."""
    if kernel == 1:
        return x
    pad = kernel // 2
    n, c, h, w = x.shape
    clips = x.view(n // frames, frames, c, h, w)  # (B, T, C, H, W)
    padded = torch.cat(
        [
            clips[:, :1].expand(-1, pad, -1, -1, -1),
            clips,
            clips[:, -1:].expand(-1, pad, -1, -1, -1),
        ],
        dim=1,
    )  # (B, T + 2 pad, C, H, W)
    stacked = torch.cat(
        [padded[:, j : j + frames] for j in range(kernel)], dim=2
    )  # (B, T, kC, H, W)
    return stacked.reshape(n, kernel * c, h, w)


class Block(nn.Module):
    """Pre-norm (2+1)D residual block: a 3x3 spatial convolution, then a temporal one (a 1x1
    convolution over each frame stacked with its neighbours: a (k, 1, 1) 3D convolution, run as
    2D ones, which CPUs do several times faster). Frames travel as (B*T, C, H, W)."""

    def __init__(self, channels: int, temporal_kernel: int):
        super().__init__()
        self.kernel = temporal_kernel
        self.norm1 = nn.GroupNorm(_groups(channels), channels)
        self.spatial = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(channels), channels)
        self.temporal = nn.Conv2d(temporal_kernel * channels, channels, 1)

    def forward(self, x: Tensor, frames: int) -> Tensor:
        h = self.spatial(F.silu(self.norm1(x)))  # (B*T, C, H, W)
        h = temporal_window(F.silu(self.norm2(h)), frames, self.kernel)  # (B*T, kC, H, W)
        return x + self.temporal(h)


class VideoTower(nn.Module):
    """Pixels (B, 3, T, H, W) at the working size -> pooled statistics (B, pooled_dim).

    Normalisation is per frame (GroupNorm over channel groups and space), so a clip's features
    depend on nothing else in its batch.
    """

    def __init__(self, config: VideoTextConfig):
        super().__init__()
        widths, self.grid = config.widths, config.grid
        self.stem = nn.Conv2d(config.in_channels, widths[0], 3, stride=2, padding=1)
        self.downs = nn.ModuleList(
            [nn.Identity()]
            + [
                nn.Conv2d(widths[i - 1], widths[i], 3, stride=2, padding=1)
                for i in range(1, len(widths))
            ]
        )
        self.levels = nn.ModuleList(
            nn.ModuleList(Block(w, config.temporal_kernel) for _ in range(config.blocks_per_level))
            for w in widths
        )
        self.norm_out = nn.GroupNorm(_groups(widths[-1]), widths[-1])

    def forward(self, x: Tensor, details: bool = False) -> tuple[Tensor, Tensor | None]:
        """(pooled (B, pooled_dim), detail statistics (B, 2 C0) when ``details`` else None)."""
        b, c, t, height, width = x.shape
        h = self.stem(x.transpose(1, 2).reshape(b * t, c, height, width))  # (B*T, C0, H/2, W/2)
        stats = detail_statistics(h, t) if details else None
        for down, blocks in zip(self.downs, self.levels, strict=True):
            h = down(h)
            for block in blocks:
                h = block(h, t)
        h = F.silu(self.norm_out(h))  # (B*T, C, h, w)
        clips = h.view(b, t, *h.shape[1:])  # (B, T, C, h, w)
        pooled = [clips.mean(dim=(1, 3, 4))]  # (B, C)
        if self.grid:
            cells = F.adaptive_avg_pool2d(h, self.grid).reshape(b, t, -1).mean(1)  # (B, C g²)
            pooled.append(cells)
        pooled.append(_motion(clips))  # (B, C)
        return torch.cat(pooled, dim=1), stats  # (B, pooled_dim)


def _motion(clips: Tensor) -> Tensor:
    """(B, T, C, h, w) -> (B, C) mean |frame t - frame t-1|; zeros for stills."""
    if clips.shape[1] == 1:
        return clips.new_zeros(clips.shape[0], clips.shape[2])
    return (clips[:, 1:] - clips[:, :-1]).abs().mean(dim=(1, 3, 4))


def detail_statistics(stem: Tensor, frames: int) -> Tensor:
    """(B*T, C0, h, w) first-layer responses -> (B, 2 C0): per channel, the log of the mean
    spatial high-pass energy (|response - its 3x3 box mean|: sharpness, texture, pixel noise)
    and the mean temporal energy (|frame t - frame t-1|: motion, flicker; 0 for a still)."""
    n, c, h, w = stem.shape
    high = (stem - F.avg_pool2d(stem, 3, 1, 1, count_include_pad=False)).abs()
    spatial = high.reshape(n // frames, frames, c, h, w).mean(dim=(1, 3, 4))  # (B, C0)
    spatial = spatial.float().clamp(min=DETAIL_EPS).log()
    temporal = _motion(stem.reshape(n // frames, frames, c, h, w)).float()  # (B, C0)
    return torch.cat([spatial, temporal], dim=1)


# --------------------------------------------------------------------------- the model


class VideoTextModel(Pretrained, nn.Module):
    """Video and text towers into one normalised embedding space; see the module docstring.

    ``encode_video`` and ``video_features`` take a (B, 3, T, H, W) tensor or a sequence of
    (3, T, H, W) clips of different sizes (run in groups of one shape).
    """

    config_class = VideoTextConfig

    def __init__(self, config: VideoTextConfig):
        super().__init__()
        self.config = config
        self.video = VideoTower(config)
        self.video_features_proj = nn.Linear(config.pooled_dim, config.feature_dim)
        self.video_head = nn.Linear(config.feature_dim + 2, config.embed_dim)  # + shape
        self.text_norm = nn.LayerNorm(config.text_dim)
        self.text_head = nn.Sequential(
            nn.Linear(config.text_dim, config.text_hidden),
            nn.GELU(),
            nn.Linear(config.text_hidden, config.embed_dim),
        )
        # shape (1,), not (): DeepSpeed broadcasts parameters as byte views, which 0-d ones refuse
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / config.init_temperature)))
        # Divisors of the three blocks of video_features (semantic, spatial detail, temporal
        # detail): each block's total standard deviation over training clips (fit_feature_scales).
        self.register_buffer("feature_scale", torch.ones(3))

    # --------------------------------------------------------------------------- video

    def _groups_of(self, videos: Videos) -> list[tuple[list[int], Tensor]]:
        """(indices, (b, 3, T, h, w) batch at the working size) per distinct working shape:
        clips are resized first, so crops of one aspect ratio batch together."""
        c = self.config.in_channels
        if isinstance(videos, Tensor):
            if videos.ndim != 5 or videos.shape[1] != c:
                raise ValueError(f"videos must be (B, {c}, T, H, W), got {tuple(videos.shape)}")
            return [(list(range(videos.shape[0])), fit_short_side(videos, self.config.short_side))]
        by_shape: dict[tuple[int, ...], list[tuple[int, Tensor]]] = {}
        for i, clip in enumerate(videos):
            if clip.ndim != 4 or clip.shape[0] != c:
                raise ValueError(f"clip {i} must be ({c}, T, H, W), got {tuple(clip.shape)}")
            resized = fit_short_side(clip[None], self.config.short_side)[0]
            by_shape.setdefault(tuple(resized.shape), []).append((i, resized))
        return [
            ([i for i, _ in group], torch.stack([x for _, x in group]))
            for group in by_shape.values()
        ]

    def _video_pass(
        self, videos: Videos, details: bool = False
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """(semantic (B, feature_dim), shape (B, 2), detail (B, 2 C0) or None), input order."""
        n = videos.shape[0] if isinstance(videos, Tensor) else len(videos)
        if not n:
            raise ValueError("no videos given")
        sem: list[Tensor] = [None] * n  # type: ignore[list-item]
        shapes: list[Tensor] = [None] * n  # type: ignore[list-item]
        stats: list[Tensor] = [None] * n  # type: ignore[list-item]
        for idx, batch in self._groups_of(videos):
            pooled, detail = self.video(batch, details)
            f = self.video_features_proj(pooled)  # (b, feature_dim)
            _, _, t, h, w = batch.shape
            shape = f.new_tensor([math.log(w / h), float(t > 1)]).expand(len(idx), 2)
            for j, i in enumerate(idx):
                sem[i], shapes[i] = f[j], shape[j]
                if detail is not None:
                    stats[i] = detail[j]
        return torch.stack(sem), torch.stack(shapes), torch.stack(stats) if details else None

    def semantic_features(self, videos: Videos) -> Tensor:
        """The pre-projection features (B, feature_dim): what the joint embedding is made of."""
        return self._video_pass(videos)[0]

    def raw_video_features(self, videos: Videos) -> Tensor:
        """:meth:`video_features` before the block scales: (B, feature_dim + 2 C0)."""
        sem, _, detail = self._video_pass(videos, details=True)
        return torch.cat([sem.float(), detail], dim=1)

    def video_features(self, videos: Videos) -> Tensor:
        """The FVD's features (B, fvd_dim): the pre-projection features, the spatial and the
        temporal detail statistics of the first layer, each block divided by its scale."""
        raw = self.raw_video_features(videos)
        return raw / self._scale_vector().to(raw.device)

    def _scale_vector(self) -> Tensor:
        c0 = self.config.widths[0]
        sizes = torch.tensor([self.config.feature_dim, c0, c0], device=self.feature_scale.device)
        return torch.repeat_interleave(self.feature_scale.float(), sizes)  # (fvd_dim,)

    @torch.no_grad()
    def fit_feature_scales(self, videos: Sequence[Tensor], batch_size: int = 16) -> list[float]:
        """Set each block's scale to its total standard deviation, sqrt(E|x - E x|²), over
        ``videos`` (training clips): the semantic, spatial-detail and temporal-detail blocks
        then weigh alike in the Fréchet distance whatever their units. A block that does not
        vary (all stills: no temporal detail) keeps scale 1. Returns the scales."""
        if len(videos) < 2:
            raise ValueError("fit_feature_scales needs at least 2 clips")
        raw = torch.cat(
            [
                self.raw_video_features(list(videos[i : i + batch_size]))
                for i in range(0, len(videos), batch_size)
            ]
        ).double()  # (N, fvd_dim)
        c0, scales = self.config.widths[0], []
        bounds = [0, self.config.feature_dim, self.config.feature_dim + c0, raw.shape[1]]
        for lo, hi in zip(bounds, bounds[1:], strict=False):
            block = raw[:, lo:hi]
            std = (block - block.mean(0)).pow(2).sum(1).mean().sqrt().item()
            scales.append(std if math.isfinite(std) and std > 1e-12 else 1.0)
        self.feature_scale.copy_(torch.tensor(scales))
        return scales

    def encode_video(self, videos: Videos) -> Tensor:
        """Videos in [-1, 1] (any length, size, aspect) -> (B, embed_dim), L2-normalised."""
        feats, shape, _ = self._video_pass(videos)
        z = self.video_head(torch.cat([F.gelu(feats), shape.to(feats.dtype)], dim=1))
        return F.normalize(z.float(), dim=-1)

    # --------------------------------------------------------------------------- text

    def encode_text(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """Frozen token states (B, L, text_dim) + mask (B, L) (True = real token) -> (B,
        embed_dim), L2-normalised. A row with no real token embeds its (zero) mean."""
        if tokens.ndim != 3 or tokens.shape[-1] != self.config.text_dim:
            raise ValueError(
                f"tokens must be (B, L, {self.config.text_dim}), got {tuple(tokens.shape)}"
            )
        weights = mask.to(tokens.dtype)[..., None]  # (B, L, 1)
        pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (B, text_dim)
        z = self.text_head(self.text_norm(pooled))  # (B, embed_dim)
        return F.normalize(z.float(), dim=-1)

    # --------------------------------------------------------------------------- objective

    def scale(self) -> Tensor:
        """exp(logit_scale), clamped to ``max_logit_scale`` (CLIP)."""
        return self.logit_scale.clamp(max=math.log(self.config.max_logit_scale)).exp()[0]

    def logits(self, video_emb: Tensor, text_emb: Tensor) -> Tensor:
        """(B, M) scaled cosine similarities of normalised embeddings."""
        return self.scale() * video_emb @ text_emb.T

    def forward(self, videos: Videos, tokens: Tensor, mask: Tensor) -> Tensor:
        """Symmetric InfoNCE over B matching (video, text) pairs -> scalar loss."""
        logits = self.logits(self.encode_video(videos), self.encode_text(tokens, mask))
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# --------------------------------------------------------------------------- registry

EVALUATOR_SIZES: SizeRegistry[VideoTextConfig] = SizeRegistry(
    "evaluator",
    {
        # Test size: milliseconds per clip; for pipeline tests, not for measuring anything.
        "evaluator-tiny": VideoTextConfig(
            short_side=16,
            widths=(8, 16),
            grid=1,
            feature_dim=32,
            embed_dim=16,
            text_hidden=32,
        ),
        # CPU demo size: trains in minutes on the demo corpus.
        "evaluator-xs": VideoTextConfig(),
        "evaluator-s": VideoTextConfig(
            short_side=64,
            widths=(32, 64, 128, 256),
            blocks_per_level=2,
            feature_dim=256,
            embed_dim=128,
            text_hidden=512,
        ),
    },
)


def build_evaluator(name: str, **overrides) -> VideoTextModel:
    """A fresh VideoTextModel of a named size; ``overrides`` replace config fields."""
    return VideoTextModel(EVALUATOR_SIZES.config(name, **overrides))
