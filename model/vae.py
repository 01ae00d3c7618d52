"""Causal 3D video VAE: videos (B, C, T, H, W) in [-1, 1] <-> KL-regularised latents.

Time is causal everywhere: every temporal convolution pads on the left only, with copies of the
first frame, and the temporal downsampling lets frame 0 through on its own. So a clip of
``1 + tf * k`` frames maps to ``1 + k`` latent frames (``tf`` = ``temporal_downsample``, 4 by
default), an image is a one-frame video encoded with the same weights, and latent frame ``j``
never sees pixel frames after ``tf * j``.

Memory stays bounded on long or large clips two ways, combinable:
- temporal chunks: the clip is run chunk by chunk (frame 0 alone, then ``tf * c`` frames), each
  causal convolution carrying its last input frames in a :data:`CausalCache` (WAN's ``feat_cache``).
  No layer mixes statistics over time (norms are RMS over channels), so this equals the full pass
  up to float rounding.
- spatial tiles with overlap, linearly blended (the outer quarter of each overlap, which saw zero
  padding instead of the neighbour, is dropped). Approximate: the receptive field is wider than
  the overlap; ``tests/model/test_vae.py`` states the measured error.

Every resolution change has a parameter-free shortcut beside its learned path, as in DC-AE and
Wan2.2's VAE: downsampling adds the 2x2 (and frame-pair) average of its input, upsampling adds
the nearest-neighbour copy, the encoder's latent mean adds channel-group averages of its last
features and the decoder's first layer adds copies of the latent channels. Measured on the demo
corpus (vae-xs, 8 channels, batch 4, lr 3e-4): mean training L1 over steps 300-400 fell from
0.278 without them to 0.172 with them (0.153 by step 600).

``encode`` / ``decode`` take valid sizes (``1 + tf * k`` frames, sides divisible by the spatial
factor); ``encode_video`` / ``decode_video`` take any size, pad by replication and crop back.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from model.config import ModelConfig, Pretrained, SizeRegistry

# State carried between temporal chunks: per layer, the last input frames it needs next time.
CausalCache = dict[nn.Module, torch.Tensor]


# --------------------------------------------------------------------------- config


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@dataclass(frozen=True)
class VAEConfig(ModelConfig):
    """Every hyperparameter of :class:`CausalVAE`; saved as ``config.json`` next to the weights."""

    in_channels: int = 3
    base_channels: int = 64
    # One multiplier per resolution level; len = log2(spatial_downsample) + 1.
    channel_multipliers: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2  # per encoder level (the decoder uses one more, as in SD / WAN)
    temporal_downsample: int = 4  # applied at the deepest levels; power of two
    spatial_downsample: int = 8  # one x2 per level transition; power of two
    latent_channels: int = 8
    dropout: float = 0.0
    # Latent normalisation z_norm = (z - shift_factor) * scaling_factor. Computed from data after
    # training; see compute_latent_stats. The defaults are the identity.
    scaling_factor: float = 1.0
    shift_factor: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in (
            "in_channels",
            "base_channels",
            "num_res_blocks",
            "temporal_downsample",
            "spatial_downsample",
            "latent_channels",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"VAEConfig.{name} must be a positive int, got {value!r}")
        mults = self.channel_multipliers
        if not mults or not all(
            isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in mults
        ):
            raise ValueError(f"VAEConfig.channel_multipliers must be positive ints, got {mults!r}")
        for name in ("spatial_downsample", "temporal_downsample"):
            if not _is_power_of_two(getattr(self, name)):
                value = getattr(self, name)
                raise ValueError(f"VAEConfig.{name} must be a power of two, got {value}")
        if len(mults) != self.spatial_levels + 1:
            raise ValueError(
                f"VAEConfig.channel_multipliers has {len(mults)} levels (spatial factor "
                f"{2 ** (len(mults) - 1)}) but spatial_downsample={self.spatial_downsample} needs "
                f"log2({self.spatial_downsample}) + 1 = {self.spatial_levels + 1} multipliers"
            )
        if self.temporal_levels > self.spatial_levels:
            raise ValueError(
                f"VAEConfig.temporal_downsample={self.temporal_downsample} needs "
                f"{self.temporal_levels} level transitions but there are only "
                f"{self.spatial_levels}; lower it or raise spatial_downsample"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"VAEConfig.dropout must be in [0, 1), got {self.dropout}")
        if not (math.isfinite(self.scaling_factor) and self.scaling_factor > 0):
            raise ValueError(
                f"VAEConfig.scaling_factor must be finite and > 0, got {self.scaling_factor}"
            )
        if not math.isfinite(self.shift_factor):
            raise ValueError(f"VAEConfig.shift_factor must be finite, got {self.shift_factor}")

    @property
    def spatial_levels(self) -> int:
        return self.spatial_downsample.bit_length() - 1

    @property
    def temporal_levels(self) -> int:
        return self.temporal_downsample.bit_length() - 1

    def is_temporal_transition(self, level: int) -> bool:
        """Whether going from ``level`` to ``level + 1`` also halves time (the deepest ones do)."""
        return level >= self.spatial_levels - self.temporal_levels


@dataclass(frozen=True)
class VideoMeta:
    """A clip's size before ``encode_video`` padded it; ``decode_video`` crops back to it."""

    num_frames: int
    height: int
    width: int


# --------------------------------------------------------------------------- building blocks


class CausalConv3d(nn.Conv3d):
    """3D convolution, causal in time (left padding with the first frame), 'same' in space."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: tuple[int, int, int] = (3, 3, 3)
    ):
        kt, kh, kw = kernel_size
        super().__init__(in_channels, out_channels, kernel_size, padding=(0, kh // 2, kw // 2))
        self.time_pad = kt - 1

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """x: (B, C_in, T, H, W) -> (B, C_out, T, H, W); a cache means x continues a chunk."""
        if self.time_pad:
            if cache is not None and self in cache:
                past = cache[self]  # (B, C_in, time_pad, H, W) from the previous chunk
            else:
                past = x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1)  # replicate frame 0
            x = torch.cat([past, x], dim=2)  # (B, C_in, time_pad + T, H, W)
            if cache is not None:
                cache[self] = x[:, :, -self.time_pad :]
        return super().forward(x)


class ChannelRMSNorm(nn.Module):
    """RMS norm over channels per (t, h, w): no pooling across frames keeps chunks exact."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, T, H, W) -> same shape."""
        inv_rms = x.pow(2).mean(dim=1, keepdim=True).add(self.eps).rsqrt()  # (B, 1, T, H, W)
        return x * inv_rms * rearrange(self.weight, "c -> c 1 1 1")


class ResBlock(nn.Module):
    """Pre-norm residual block of two causal 3x3x3 convolutions."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = ChannelRMSNorm(in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels)
        self.norm2 = ChannelRMSNorm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_channels, out_channels)
        self.skip = (
            nn.Conv3d(in_channels, out_channels, 1)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)), cache)  # (B, C_out, T, H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))), cache)  # (B, C_out, T, H, W)
        return self.skip(x) + h  # (B, C_out, T, H, W)


class Downsample(nn.Module):
    """Halve H and W (strided conv); optionally halve time, frame 0 kept alone (1 + 2k -> 1 + k)."""

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.spatial = nn.Conv3d(channels, channels, (1, 3, 3), stride=(1, 2, 2))
        self.temporal = nn.Conv3d(2 * channels, channels, 1) if temporal else None

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        # a parameter-free shortcut (2x2 average) carries the input past the strided conv
        shortcut = F.avg_pool3d(x, (1, 2, 2))  # (B, C, T, H/2, W/2)
        x = self.spatial(F.pad(x, (0, 1, 0, 1))) + shortcut  # SD-style asymmetric pad
        if self.temporal is None:
            return x
        first_chunk = cache is None or self not in cache
        if cache is not None:
            cache[self] = x[:, :, :0]  # marker only: later chunks have no lone first frame
        head, rest = (x[:, :, :1], x[:, :, 1:]) if first_chunk else (x[:, :, :0], x)
        if rest.shape[2] == 0:  # a chunk holding only frame 0
            return head
        # frame pairs as strided halves: the same numbers as a "(t r)" split, whose symbolic-size
        # arithmetic inductor failed to lower (ValueRangeError) in a Downsample compiled alone
        even, odd = rest[:, :, 0::2], rest[:, :, 1::2]  # (B, C, (T-1)/2, H, W) each
        pairs = rearrange([even, odd], "r b c t h w -> b (c r) t h w")  # (B, 2C, (T-1)/2, H, W)
        mean = (even + odd) / 2  # shortcut: pair average
        return torch.cat([head, self.temporal(pairs) + mean], dim=2)  # (B, C, 1 + (T-1)/2, H, W)


class Upsample(nn.Module):
    """Optionally double time keeping frame 0 alone (1 + k -> 1 + 2k); then double H and W."""

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.temporal = CausalConv3d(channels, 2 * channels, (3, 1, 1)) if temporal else None
        self.spatial = nn.Conv3d(channels, channels, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        if self.temporal is not None:
            first_chunk = cache is None or self not in cache
            if cache is not None:
                cache[self] = x[:, :, :0]  # marker only
            y = self.temporal(x, cache)  # (B, 2C, T, H, W)
            head, y, rest = (
                (x[:, :, :1], y[:, :, 1:], x[:, :, 1:]) if first_chunk else (x[:, :, :0], y, x)
            )
            y = rearrange(y, "b (c r) t h w -> b c (t r) h w", r=2)  # (B, C, 2(T-1), H, W)
            y = y + repeat(rest, "b c t h w -> b c (t r) h w", r=2)  # shortcut: duplicate
            x = torch.cat([head, y], dim=2)  # (B, C, 1 + 2(T-1), H, W)
        x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")  # (B, C, T, 2H, 2W)
        return self.spatial(x) + x  # (B, C, T, 2H, 2W); shortcut: nearest-neighbour copy


class DiagonalGaussian:
    """KL posterior N(mean, exp(logvar)) over latents of shape (B, Z, t, h, w)."""

    def __init__(self, moments: torch.Tensor):
        """moments: (B, 2Z, t, h, w), mean then log-variance along channels."""
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, Z, t, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)  # keeps exp() finite in fp32
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised draw; ``generator`` must live on the latents' device."""
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise  # (B, Z, t, h, w)

    def mode(self) -> torch.Tensor:
        return self.mean  # (B, Z, t, h, w)

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over latent elements -> (B,), in fp32; expm1 keeps terms >= 0."""
        mean, logvar = self.mean.float(), self.logvar.float()  # a bf16 sum loses the small terms
        per_element = mean.pow(2) + torch.expm1(logvar) - logvar
        return 0.5 * per_element.sum(dim=(1, 2, 3, 4))


class WholeClipRegion:
    """Mixin of the encoder and decoder: their training forward is a ``torch.compile`` region.

    :func:`components.core.compile.compile_regions` (``train.compile``) wraps ``whole_clip``:
    a whole clip with gradients, one graph in which inductor fuses the norms, SiLUs, causal pads,
    shortcuts and residual adds around the (eager oneDNN) convolutions. Measured on the vae-xs
    demo step (CPU, bf16 autocast, 1 thread): 1.30-1.53x per step vs eager, against 1.17-1.28x
    for ResBlock-sized regions; 2-4 min to compile cold, ~10-45 s from a warm inductor cache.
    Chunked calls (the cache dict is state, not a graph input) and no-grad calls (validation
    would compile a second, inference graph for a few calls) run ``run`` eagerly.
    """

    compile_regions = ("whole_clip",)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """x: a whole clip, or a chunk continuing ``cache`` -> the subclass's :meth:`run`."""
        if cache is None and torch.is_grad_enabled():
            return self.whole_clip(x)
        return self.run(x, cache)

    def whole_clip(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)  # the subclass's ``run(x, cache=None)``


# --------------------------------------------------------------------------- encoder


def _group_matrix(channels: int, latent_channels: int) -> torch.Tensor:
    """(Z, C) averaging matrix: feature channel i belongs to latent group i * Z // C.

    The encoder's and decoder's parameter-free shortcuts (as in DC-AE and Wan2.2's VAE) use it:
    the latent mean gets each group's average and the decoder input a copy of its latent channel.
    """
    group = torch.arange(channels) * latent_channels // channels  # (C,)
    matrix = F.one_hot(group, latent_channels).T.float()  # (Z, C)
    return matrix / matrix.sum(dim=1, keepdim=True).clamp(min=1.0)


class Encoder(WholeClipRegion, nn.Module):
    """(B, C, 1 + tf*k, H, W) -> posterior moments (B, 2Z, 1 + k, H/s, W/s)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        channels = [config.base_channels * m for m in config.channel_multipliers]
        self.conv_in = CausalConv3d(config.in_channels, channels[0])
        blocks: list[nn.Module] = []
        c = channels[0]
        for level, c_out in enumerate(channels):
            for _ in range(config.num_res_blocks):
                blocks.append(ResBlock(c, c_out, config.dropout))
                c = c_out
            if level < len(channels) - 1:
                blocks.append(Downsample(c, temporal=config.is_temporal_transition(level)))
        blocks += [ResBlock(c, c, config.dropout), ResBlock(c, c, config.dropout)]  # middle
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = ChannelRMSNorm(c)
        self.conv_out = CausalConv3d(c, 2 * config.latent_channels)
        self.register_buffer(
            "group_mean", _group_matrix(c, config.latent_channels), persistent=False
        )  # (Z, C)

    def run(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        x = self.conv_in(x, cache)  # (B, C0, T, H, W)
        for block in self.blocks:
            x = block(x, cache)  # (B, C_level, T_level, H_level, W_level)
        moments = self.conv_out(F.silu(self.norm_out(x)), cache)  # (B, 2Z, t, h, w)
        # shortcut to the mean: channel groups of the features averaged down to Z channels
        mean = torch.einsum("zc,bcthw->bzthw", self.group_mean.to(x.dtype), x)  # (B, Z, t, h, w)
        return moments + F.pad(mean, (0, 0, 0, 0, 0, 0, 0, mean.shape[1]))


# --------------------------------------------------------------------------- decoder


class Decoder(WholeClipRegion, nn.Module):
    """Latents (B, Z, 1 + k, h, w) -> video (B, C, 1 + tf*k, h*s, w*s), mirroring the encoder."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        channels = [config.base_channels * m for m in config.channel_multipliers]
        c = channels[-1]
        self.conv_in = CausalConv3d(config.latent_channels, c)
        self.register_buffer(
            "group_of", _group_matrix(c, config.latent_channels).argmax(0), persistent=False
        )  # (C,) latent channel each feature copies
        blocks: list[nn.Module] = [ResBlock(c, c, config.dropout), ResBlock(c, c, config.dropout)]
        for level in reversed(range(len(channels))):
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResBlock(c, channels[level], config.dropout))
                c = channels[level]
            if level > 0:
                blocks.append(Upsample(c, temporal=config.is_temporal_transition(level - 1)))
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = ChannelRMSNorm(c)
        self.conv_out = CausalConv3d(c, config.in_channels)

    def run(self, z: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        # shortcut: latent channels repeated up to C_last, added to the input conv
        x = self.conv_in(z, cache) + z.index_select(1, self.group_of)  # (B, C_last, t, h, w)
        for block in self.blocks:
            x = block(x, cache)  # (B, C_level, T_level, H_level, W_level)
        return self.conv_out(F.silu(self.norm_out(x)), cache)  # (B, C, T, H, W)


# --------------------------------------------------------------------------- chunking and tiling


def _causal_chunks(net: Callable, x: torch.Tensor, *, step: int | None) -> torch.Tensor:
    """Run ``net`` over time in chunks (frame 0 alone, then ``step`` frames), carrying a cache."""
    if step is None:
        return net(x)
    cache: CausalCache = {}
    bounds = [0, *range(1, x.shape[2], step), x.shape[2]]
    return torch.cat([net(x[:, :, a:b], cache) for a, b in itertools.pairwise(bounds)], dim=2)


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    return [*range(0, size - tile, tile - overlap), size - tile]


def _blend_ramp(length: int, overlap: int, left: bool, right: bool) -> torch.Tensor:
    """1D tile weights (length,). On a side shared with a neighbour, the outer quarter of the
    overlap gets 0 (it saw zero padding, not the neighbour), the middle half a linear ramp, the
    rest 1; the ramps of two neighbours sum to 1."""
    w = torch.ones(length)
    overlap = min(overlap, length)
    position = torch.arange(overlap) + 0.5
    up = ((position - overlap / 4) / (overlap / 2)).clamp(0.0, 1.0)  # (overlap,)
    if left and overlap:
        w[:overlap] = up
    if right and overlap:
        w[length - overlap :] = torch.minimum(w[length - overlap :], up.flip(0))
    return w


def _tiled(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int,
    overlap: int,
    scale: float,
) -> torch.Tensor:
    """Apply ``fn`` to overlapping (tile x tile) windows of x (..., H, W) and blend the outputs.

    ``fn`` maps a window of side n to one of side n * scale (1/s to encode, s to decode).
    """
    height, width = x.shape[-2:]
    out, weight = None, None
    rows, cols = _tile_starts(height, tile, overlap), _tile_starts(width, tile, overlap)
    for top in rows:
        for left in cols:
            y = fn(x[..., top : top + tile, left : left + tile])  # (B, C', T', h', w')
            oh, ow = y.shape[-2:]
            if out is None:
                out = y.new_zeros((*y.shape[:-2], round(height * scale), round(width * scale)))
                weight = y.new_zeros((round(height * scale), round(width * scale)))
            wy = _blend_ramp(oh, round(overlap * scale), top > 0, top + tile < height)
            wx = _blend_ramp(ow, round(overlap * scale), left > 0, left + tile < width)
            w = (wy[:, None] * wx[None, :]).to(y)  # (h', w')
            t0, l0 = round(top * scale), round(left * scale)
            out[..., t0 : t0 + oh, l0 : l0 + ow] += y * w
            weight[t0 : t0 + oh, l0 : l0 + ow] += w
    return out / weight


# --------------------------------------------------------------------------- model


class CausalVAE(Pretrained, nn.Module):
    """Causal 3D VAE: video (B, C, T, H, W) in [-1, 1] <-> latent (B, Z, 1 + (T-1)/tf, H/s, W/s)."""

    config_class = VAEConfig

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    @property
    def temporal_factor(self) -> int:
        return self.config.temporal_downsample

    @property
    def spatial_factor(self) -> int:
        return self.config.spatial_downsample

    def padded_size(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Smallest valid (T, H, W) >= the given one: T = 1 + tf*k, H and W multiples of s."""
        tf, s = self.temporal_factor, self.spatial_factor
        frames = 1 + tf * math.ceil((num_frames - 1) / tf)
        return frames, s * math.ceil(height / s), s * math.ceil(width / s)

    def latent_size(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Latent (t, h, w) for a clip of any size (after ``encode_video``'s padding)."""
        t, h, w = self.padded_size(num_frames, height, width)
        tf, s = self.temporal_factor, self.spatial_factor
        return 1 + (t - 1) // tf, h // s, w // s

    def _check_tiles(self, tile_size: int, tile_overlap: int) -> None:
        s = self.spatial_factor
        if tile_size % s or tile_overlap % s or not 0 <= tile_overlap < tile_size:
            raise ValueError(
                f"tile_size={tile_size} and tile_overlap={tile_overlap} must be "
                f"multiples of the spatial factor {s} with 0 <= overlap < size"
            )

    def encode(
        self,
        video: torch.Tensor,
        *,
        chunk_latent_frames: int | None = None,
        tile_size: int | None = None,
        tile_overlap: int = 32,
    ) -> DiagonalGaussian:
        """video (B, C, 1 + tf*k, H, W), H and W multiples of s -> posterior (B, Z, 1 + k, H/s, W/s)

        chunk_latent_frames: run time in causal chunks of this many latent frames (exact).
        tile_size / tile_overlap: run space in blended tiles of this many pixels (approximate).
        """
        tf, s = self.temporal_factor, self.spatial_factor
        if (
            video.ndim != 5
            or video.shape[1] != self.config.in_channels
            or tuple(video.shape[2:]) != self.padded_size(*video.shape[2:])
        ):
            raise ValueError(
                f"encode needs (B, {self.config.in_channels}, 1 + {tf}k, H, W) with H, W multiples "
                f"of {s}; got {tuple(video.shape)}. Use encode_video for any size."
            )
        step = None if chunk_latent_frames is None else chunk_latent_frames * tf
        run = functools.partial(_causal_chunks, self.encoder, step=step)
        if tile_size is None:
            return DiagonalGaussian(run(video))
        self._check_tiles(tile_size, tile_overlap)
        return DiagonalGaussian(_tiled(run, video, tile_size, tile_overlap, 1 / s))

    def decode(
        self,
        latent: torch.Tensor,
        *,
        chunk_latent_frames: int | None = None,
        tile_size: int | None = None,
        tile_overlap: int = 32,
    ) -> torch.Tensor:
        """latent: (B, Z, 1 + k, h, w) -> video (B, C, 1 + tf*k, h*s, w*s). Tiles are in pixels."""
        if latent.ndim != 5 or latent.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"decode needs (B, {self.config.latent_channels}, t, h, w); "
                f"got {tuple(latent.shape)}"
            )
        run = functools.partial(_causal_chunks, self.decoder, step=chunk_latent_frames)
        if tile_size is None:
            return run(latent)
        self._check_tiles(tile_size, tile_overlap)
        s = self.spatial_factor
        return _tiled(run, latent, tile_size // s, tile_overlap // s, float(s))

    def encode_video(self, video: torch.Tensor, **kwargs) -> tuple[DiagonalGaussian, VideoMeta]:
        """Any (B, C, T, H, W): replicate-pad to the next valid size, encode, remember the size.

        kwargs: the chunk / tile options of :meth:`encode`.
        """
        _, _, t, h, w = video.shape
        pt, ph, pw = self.padded_size(t, h, w)
        pad = (0, pw - w, 0, ph - h, 0, pt - t)  # last frame, bottom rows, right columns repeated
        padded = F.pad(video, pad, mode="replicate")  # (B, C, pt, ph, pw)
        return self.encode(padded, **kwargs), VideoMeta(num_frames=t, height=h, width=w)

    def decode_video(self, latent: torch.Tensor, meta: VideoMeta, **kwargs) -> torch.Tensor:
        """Decode and crop back to the size ``encode_video`` recorded -> (B, C, T, H, W)."""
        expected = self.latent_size(meta.num_frames, meta.height, meta.width)
        if tuple(latent.shape[2:]) != expected:
            raise ValueError(
                f"latent (t, h, w)={tuple(latent.shape[2:])} does not match {meta} "
                f"(expected {expected})"
            )
        video = self.decode(latent, **kwargs)  # (B, C, T_padded, H_padded, W_padded)
        return video[:, :, : meta.num_frames, : meta.height, : meta.width]

    def forward(
        self, video: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """video: (B, C, T, H, W), any size -> (reconstruction of the same shape, posterior)."""
        posterior, meta = self.encode_video(video)  # over (B, Z, t, h, w)
        z = posterior.sample(generator) if sample else posterior.mode()  # (B, Z, t, h, w)
        return self.decode_video(z, meta), posterior  # (B, C, T, H, W)

    def normalize_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latent -> roughly zero-mean, unit-variance latent for the diffusion model."""
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def denormalize_latent(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.config.scaling_factor + self.config.shift_factor

    def set_latent_stats(self, shift: float, scale: float) -> None:
        """Store data statistics (from compute_latent_stats) in the config that gets saved."""
        self.config = dataclasses.replace(self.config, shift_factor=shift, scaling_factor=scale)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return count_parameters(self, trainable_only)


# --------------------------------------------------------------------------- latent statistics


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def compute_latent_stats(vae: CausalVAE, batches: Iterable[torch.Tensor]) -> tuple[float, float]:
    """(shift, scale) so that (mean - shift) * scale has zero mean and unit std over the data.

    batches: videos (B, C, T, H, W) of any size; statistics of posterior means, in float64.
    """
    total, total_sq, count = 0.0, 0.0, 0
    for video in batches:
        posterior, _ = vae.encode_video(video)
        mean = posterior.mode().double()  # (B, Z, t, h, w)
        total += mean.sum().item()
        total_sq += mean.pow(2).sum().item()
        count += mean.numel()
    if count == 0:
        raise ValueError("compute_latent_stats got no batches")
    shift = total / count
    std = math.sqrt(max(total_sq / count - shift**2, 0.0))
    if std == 0.0:
        raise ValueError("latent means have zero variance; cannot compute a scaling factor")
    return shift, 1.0 / std


# --------------------------------------------------------------------------- registry

VAE_SIZES: SizeRegistry[VAEConfig] = SizeRegistry(
    "VAE",
    {
        # Test size: seconds per step on one CPU core; for pipeline tests, not for quality.
        "vae-tiny": VAEConfig(
            base_channels=8, channel_multipliers=(1, 1, 2, 2), num_res_blocks=1, latent_channels=4
        ),
        # CPU demo size; trains in minutes on small clips.
        "vae-xs": VAEConfig(
            base_channels=16, channel_multipliers=(1, 2, 2, 4), num_res_blocks=1, latent_channels=4
        ),
        "vae-s": VAEConfig(
            base_channels=64, channel_multipliers=(1, 2, 4, 4), num_res_blocks=2, latent_channels=8
        ),
        # About the size of WAN 2.1's VAE (96 base channels, 16 latent channels).
        "vae-m": VAEConfig(
            base_channels=96, channel_multipliers=(1, 2, 4, 4), num_res_blocks=2, latent_channels=16
        ),
    },
)


def build_vae(name: str, **overrides) -> CausalVAE:
    """A fresh CausalVAE of a named size; ``overrides`` replace config fields, e.g. z channels."""
    return CausalVAE(VAE_SIZES.config(name, **overrides))
