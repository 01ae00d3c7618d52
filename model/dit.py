"""Diffusion transformer (DiT) over packed spacetime tokens.

Peebles & Xie's DiT with the pieces a text-to-video model needs:

* **adaLN-Zero** blocks conditioned on the timestep (one per clip, broadcast to its tokens);
* self-attention over *packed* tokens of several clips (see ``model.patches``) that never crosses a
  clip boundary, with **3D RoPE** computed from integer ``(t, h, w)`` coordinates (so any grid works
  at inference) and **QK-norm** (RMSNorm on queries and keys);
* **cross-attention** to each clip's own text tokens (PixArt-α style, zero-initialised output);
* a zero-initialised final layer, so the model outputs exactly zero at init.

Attention over packed clips and its backends live in ``model.attention``; parameter and FLOP
counts in ``model.flops``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from model.attention import (
    ATTENTION_BACKENDS,
    AttentionContext,
    TextCache,
    build_attention_context,
    resolve_backend,
    segment_attention,
    text_attention,
)
from model.config import ModelConfig, Pretrained, SizeRegistry

# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class DiTConfig(ModelConfig):
    """Hyperparameters of a :class:`DiT`; passed whole to every submodule.

    Attributes:
        hidden_size: token width D.
        depth: number of DiT blocks.
        num_heads: attention heads; ``hidden_size / num_heads`` must be even (RoPE rotates pairs).
        mlp_ratio: MLP hidden width / D.
        patch_size: (pt, ph, pw) latent patch; tokens are ``in_channels * pt * ph * pw`` wide.
        in_channels: latent channels of the VAE.
        out_channels: predicted channels; ``None`` means ``in_channels``.
        text_dim: width of the text encoder's hidden states.
        qk_norm: RMSNorm on queries and keys (self- and cross-attention).
        rope_theta: RoPE base period.
        rope_axes_dim: head dims rotated by t, h, w (even, summing to the head dim); ``None``
            gives h and w each the largest even number <= head_dim / 3 and t the rest.
        attention_backend: one of ``ATTENTION_BACKENDS``.
        gradient_checkpointing: recompute each block in backward (training only).
        timestep_scale: flow time t in [0, 1] is multiplied by this before the sinusoidal
            embedding, so its frequencies match DiT's 0..1000 step range.
        frequency_embedding_size: width of the sinusoidal timestep features.
        pooled_text: also condition every block's adaLN on the masked mean of the text states
            (a sentence embedding, as MiniLM is trained to give), projected and added to the
            timestep embedding, as SD3 and Flux add a pooled text vector. Cross-attention still
            reads every token; the pooled path gives the prompt a global handle from step one.
    """

    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_channels: int = 8
    out_channels: int | None = None
    text_dim: int = 384
    qk_norm: bool = True
    rope_theta: float = 10000.0
    rope_axes_dim: tuple[int, int, int] | None = None
    attention_backend: str = "sdpa_segments"
    gradient_checkpointing: bool = False
    timestep_scale: float = 1000.0
    frequency_embedding_size: int = 256
    pooled_text: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in (
            "hidden_size",
            "depth",
            "num_heads",
            "in_channels",
            "text_dim",
            "frequency_embedding_size",
        ):
            _check_int(name, getattr(self, name))
        if self.out_channels is not None:
            _check_int("out_channels", self.out_channels)
        if len(self.patch_size) != 3:
            raise ValueError(f"DiTConfig.patch_size must be (pt, ph, pw), got {self.patch_size!r}")
        for p in self.patch_size:
            _check_int("patch_size", p)
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"DiTConfig.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"DiTConfig head dim hidden_size/num_heads={self.head_dim} must be even for RoPE"
            )
        if not (isinstance(self.mlp_ratio, (int, float)) and self.mlp_ratio > 0):
            raise ValueError(f"DiTConfig.mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        if not self.rope_theta > 0 or not self.timestep_scale > 0:
            raise ValueError("DiTConfig.rope_theta and timestep_scale must be > 0")
        axes = self.rope_dims
        if len(axes) != 3 or sum(axes) != self.head_dim or any(a <= 0 or a % 2 for a in axes):
            raise ValueError(
                f"DiTConfig.rope_axes_dim={axes} must be three positive even ints summing to the "
                f"head dim {self.head_dim}"
            )
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"DiTConfig.attention_backend={self.attention_backend!r} is not one of {ATTENTION_BACKENDS}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        if self.rope_axes_dim is not None:
            return tuple(self.rope_axes_dim)
        hw = 2 * (self.head_dim // 6)
        return (self.head_dim - 2 * hw, hw, hw)

    @property
    def output_channels(self) -> int:
        return self.in_channels if self.out_channels is None else self.out_channels

    @property
    def in_dim(self) -> int:
        """Width of an input token: in_channels * pt * ph * pw."""
        return self.in_channels * math.prod(self.patch_size)

    @property
    def out_dim(self) -> int:
        """Width of an output token: out_channels * pt * ph * pw."""
        return self.output_channels * math.prod(self.patch_size)

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"DiTConfig.{name} must be a positive int, got {value!r}")


# --------------------------------------------------------------------------- embeddings: timestep, 3D RoPE


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return torch.addcmul(shift, x, 1 + scale)  # x * (1 + scale) + shift in one pass


class TimestepEmbedder(nn.Module):
    """Flow time t in [0, 1] -> sinusoidal features of ``t * timestep_scale`` -> MLP."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.freq_dim, self.scale = cfg.frequency_embedding_size, cfg.timestep_scale
        self.mlp = nn.Sequential(
            nn.Linear(self.freq_dim, cfg.hidden_size),
            nn.SiLU(),
            nn.Linear(cfg.hidden_size, cfg.hidden_size),
        )

    @staticmethod
    def sinusoidal(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half
        )
        args = t.float()[:, None] * freqs[None]  # (B, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
        return F.pad(emb, (0, dim % 2))  # (B, dim)

    def forward(self, t: Tensor) -> Tensor:
        freq = self.sinusoidal(t * self.scale, self.freq_dim)  # (B, F)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))  # (B, D)


def rope_angles(coords: Tensor, axes_dim: Sequence[int], theta: float) -> tuple[Tensor, Tensor]:
    """3D RoPE: cos and sin (N, head_dim/2) in float32 from integer (t, h, w) coords (N, 3).

    Each axis rotates its own slice of the head dim with the usual 1D frequencies, so the score
    between two tokens depends only on their coordinate *difference* — any grid size works.
    """
    angles = []
    for axis, dim in enumerate(axes_dim):
        inv_freq = theta ** (
            -torch.arange(0, dim, 2, device=coords.device, dtype=torch.float32) / dim
        )  # (dim/2,)
        angles.append(coords[:, axis].float()[:, None] * inv_freq[None])  # (N, dim/2)
    angle = torch.cat(angles, dim=-1)  # (N, head_dim/2)
    return angle.cos(), angle.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent pairs of x (N, H, head_dim) by the per-token angles (N, head_dim/2)."""
    return apply_rope_cis(x, torch.complex(cos.float(), sin.float()))


def apply_rope_cis(x: Tensor, freqs_cis: Tensor) -> Tensor:
    """:func:`apply_rope` with ``freqs_cis = cos + i sin`` (N, head_dim/2) complex64, built once
    per forward. Eagerly one complex multiply instead of six real kernels and a stack (~10x faster
    on CPU, forward + backward); under ``torch.compile`` the real form, which inductor fuses into
    one kernel (it has no fused complex arithmetic)."""
    if torch.compiler.is_compiling():
        pairs = x.float().unflatten(-1, (-1, 2))  # (N, H, hd/2, 2)
        even, odd = pairs[..., 0], pairs[..., 1]  # (N, H, hd/2)
        cos, sin = freqs_cis.real[:, None], freqs_cis.imag[:, None]  # (N, 1, hd/2)
        out = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
        return out.flatten(-2).type_as(x)  # (N, H, hd)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (N, H, hd/2) complex
    out = torch.view_as_real(pairs * freqs_cis[:, None])  # (N, H, hd/2, 2)
    return out.flatten(-2).type_as(x)  # (N, H, hd)


# --------------------------------------------------------------------------- attention


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` computed in its weight's dtype: under CPU bf16 autocast a bf16 input would
    miss the fused kernel (fp32 weight), so it is normalised in fp32."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.to(self.weight.dtype))


def _qk_norm(cfg: DiTConfig) -> nn.Module:
    return RMSNorm(cfg.head_dim, eps=1e-6) if cfg.qk_norm else nn.Identity()


class SelfAttention(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.q_norm, self.k_norm = _qk_norm(cfg), _qk_norm(cfg)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def qkv_heads(self, x: Tensor, rope: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (..., D) -> q, k, v (N, H, hd): projected, QK-normed, q and k rotated by ``rope``."""
        q, k, v = rearrange(
            self.qkv(x), "... (three h d) -> three (...) h d", three=3, h=self.num_heads
        )  # (N, H, hd)
        # QK-norm and RoPE in fp32; q and k leave in the projection's dtype (bf16 under
        # autocast), as the attention matmuls read them, not cast again per clip run
        q, k = (
            apply_rope_cis(norm(t), rope).to(v.dtype)
            for norm, t in ((self.q_norm, q), (self.k_norm, k))
        )
        return q, k, v


class CrossAttention(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.kv = nn.Linear(cfg.hidden_size, 2 * cfg.hidden_size)
        self.q_norm, self.k_norm = _qk_norm(cfg), _qk_norm(cfg)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def text_kv(self, text: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values (B, H, Lt, hd) of the real text tokens ``text`` (T, D), laid out by
        ``mask`` (B, Lt) with T True entries; padding positions are zeros (and masked anyway).

        Heads before tokens: a run of clips' first keys, ``k[first:end, :, :keys]``, is then a
        batch the attention matmuls read in place (no per-run copy)."""
        k, v = rearrange(
            self.kv(text), "t (two h d) -> two t h d", two=2, h=self.num_heads
        )  # (T, H, hd)
        return _scatter_rows(self.k_norm(k).to(v.dtype), mask), _scatter_rows(v, mask)

    def query_heads(self, x: Tensor) -> Tensor:
        """x (..., D) -> QK-normed queries (N, H, hd) in the projection's dtype."""
        q = rearrange(self.q(x), "... (h d) -> (...) h d", h=self.num_heads)
        return self.q_norm(q).to(q.dtype)


def _scatter_rows(rows: Tensor, mask: Tensor) -> Tensor:
    """rows (T, H, hd) -> (B, H, Lt, hd) zeros with ``rows`` where ``mask`` (B, Lt) is True."""
    batch, text_len = mask.shape
    out = rows.new_zeros(batch, rows.shape[1], text_len, rows.shape[2])
    out.transpose(1, 2)[mask] = rows
    return out


# --------------------------------------------------------------------------- blocks


class Mlp(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.mlp_hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention, cross-attention to text, adaLN-Zero MLP."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(cfg)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=True, eps=1e-6)
        self.cross_attn = CrossAttention(cfg)
        self.norm3 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(cfg)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    # the parts of forward between the attention calls: pure tensor code that
    # components.core.compile wraps in torch.compile (attention stays eager: its loop over clip
    # runs would specialise a graph per pack layout)
    compile_regions = ("self_attention_input", "cross_attention_input", "mlp_output")

    def forward(
        self,
        x: Tensor,
        c: Tensor,
        rope: Tensor,
        kv: tuple[Tensor, Tensor],
        ctx: AttentionContext,
    ) -> Tensor:
        """x (N, D) packed tokens, c (B, D) per-clip conditioning -> (N, D)."""
        mod = self.adaLN_modulation(c)  # (B, 6D)
        q, k, v = self.self_attention_input(x, mod, rope, ctx.seg_ids, ctx.uniform)
        attended = segment_attention(q, k, v, ctx)  # (N, H, hd)
        x, q = self.cross_attention_input(x, mod, attended, ctx.seg_ids, ctx.uniform)
        read = text_attention(q, *kv, ctx)  # (N, H, hd)
        return self.mlp_output(x, mod, read, ctx.seg_ids, ctx.uniform)  # (N, D)

    def self_attention_input(
        self, x: Tensor, mod: Tensor, rope: Tensor, seg_ids: Tensor, uniform: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        xt, (shift, scale) = _per_token(x, mod, seg_ids, uniform, 0, 2)
        return self.attn.qkv_heads(modulate(self.norm1(xt), shift, scale), rope)  # (N, H, hd) x3

    def cross_attention_input(
        self, x: Tensor, mod: Tensor, attended: Tensor, seg_ids: Tensor, uniform: bool
    ) -> tuple[Tensor, Tensor]:
        """x + gate * self-attention output -> (that (N, D), cross-attention queries (N, H, hd))."""
        xt, (gate,) = _per_token(x, mod, seg_ids, uniform, 2, 3)
        h = self.attn.proj(rearrange(attended, "n h d -> n (h d)")).view(xt.shape)
        xt = torch.addcmul(xt, gate, h)  # x + gate * attention
        return xt.reshape(x.shape), self.cross_attn.query_heads(self.norm2(xt))

    def mlp_output(
        self, x: Tensor, mod: Tensor, read: Tensor, seg_ids: Tensor, uniform: bool
    ) -> Tensor:
        """x + cross-attention output, then x + gate * MLP(modulated norm) -> (N, D)."""
        xt, (shift, scale, gate) = _per_token(x, mod, seg_ids, uniform, 3, 6)
        xt = xt + self.cross_attn.proj(rearrange(read, "n h d -> n (h d)")).view(xt.shape)
        xt = torch.addcmul(xt, gate, self.mlp(modulate(self.norm3(xt), shift, scale)))
        return xt.reshape(x.shape)


def _per_token(
    x: Tensor, mod: Tensor, seg_ids: Tensor, uniform: bool, first: int, end: int
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Tokens x (N, D) and modulation chunks ``first:end`` of mod (B, 6D) as per-token operands.

    Equal-length clips: x as a (B, L, D) view and each chunk (B, 1, D), broadcast. Otherwise x
    as is and chunks gathered per token (N, D) with ``index_select``, not ``mod[seg_ids]``: its
    backward (index_add) is ~5x faster on CPU.
    """
    d = x.shape[-1]
    mod = mod[:, first * d : end * d]  # (B, (end - first) D)
    if uniform:
        xt, mod = x.view(mod.shape[0], -1, d), mod[:, None]  # (B, L, D), (B, 1, kD)
    else:
        xt, mod = x, mod.index_select(0, seg_ids)  # (N, D), (N, kD)
    return xt, mod.chunk(end - first, dim=-1)


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(cfg.hidden_size, 2 * cfg.hidden_size)
        )
        self.linear = nn.Linear(cfg.hidden_size, cfg.out_dim)

    def forward(self, x: Tensor, c: Tensor, seg_ids: Tensor) -> Tensor:
        mod = self.adaLN_modulation(c).index_select(0, seg_ids)  # (N, 2D), as in DiTBlock
        shift, scale = mod.chunk(2, dim=-1)  # (N, D) each
        return self.linear(modulate(self.norm(x), shift, scale))  # (N, Dout)


# --------------------------------------------------------------------------- the model


class DiT(Pretrained, nn.Module):
    """Text-conditioned diffusion transformer over packed patch tokens (see module docstring)."""

    config_class = DiTConfig

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.x_embedder = nn.Linear(config.in_dim, d)
        self.t_embedder = TimestepEmbedder(config)
        self.text_embedder = nn.Sequential(
            nn.Linear(config.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d)
        )
        self.pooled_embedder = (
            nn.Sequential(nn.Linear(config.text_dim, d), nn.SiLU(), nn.Linear(d, d))
            if config.pooled_text
            else None
        )
        self.blocks = nn.ModuleList([DiTBlock(config) for _ in range(config.depth)])
        self.final_layer = FinalLayer(config)
        self.gradient_checkpointing = config.gradient_checkpointing
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier linears; N(0, 0.02) embedder MLPs; zero adaLN modulation, cross-attn output and final layer."""

        def _basic(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(_basic)
        for layer in (*self.t_embedder.mlp, *self.text_embedder, *(self.pooled_embedder or ())):
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.02)
        for module in (
            *[b.adaLN_modulation[-1] for b in self.blocks],
            *[b.cross_attn.proj for b in self.blocks],
        ):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)
        for module in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    def encode_text(self, text: Tensor, text_mask: Tensor | None = None) -> TextCache:
        """Project text states (B, Lt, text_dim) into every block's keys/values, once per prompt batch.

        ``text_mask`` (B, Lt) bool marks real tokens (default: all); an all-False row means
        "no text" and that clip gets zero cross-attention (the CFG null condition).
        """
        if text.ndim != 3 or text.shape[-1] != self.config.text_dim:
            raise ValueError(
                f"text must be (B, Lt, {self.config.text_dim}), got {tuple(text.shape)}"
            )
        if text_mask is None:
            text_mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
        if text_mask.shape != text.shape[:2]:
            raise ValueError(
                f"text_mask {tuple(text_mask.shape)} must match text (B, Lt)={tuple(text.shape[:2])}"
            )
        text_mask = text_mask.bool()
        text = text.to(self.x_embedder.weight.dtype)
        # only real tokens reach the projections (a pack's captions are ~45 % real tokens)
        h = self.text_embedder(text[text_mask])  # (T, D)
        kv = [block.cross_attn.text_kv(h, text_mask) for block in self.blocks]  # (B, H, Lt, hd)
        valid = [row.nonzero().squeeze(1) for row in text_mask]  # B x (Lb,)
        weight = text_mask.to(text.dtype).unsqueeze(-1)  # (B, Lt, 1)
        if self.pooled_embedder is not None:
            mean = (text * weight).sum(1) / weight.sum(1).clamp(min=1.0)  # (B, text_dim)
            pooled = self.pooled_embedder(mean) * text_mask.any(-1, keepdim=True)  # (B, D)
        else:
            pooled = text.new_zeros(text.shape[0], self.config.hidden_size)
        return TextCache(kv=kv, mask=text_mask, valid_index=valid, pooled=pooled)

    def forward(
        self,
        x: Tensor,
        coords: Tensor,
        cu_seqlens: Tensor,
        t: Tensor,
        text: Tensor | None = None,
        text_mask: Tensor | None = None,
        *,
        text_cache: TextCache | None = None,
    ) -> Tensor:
        """Predict the output tokens of B packed clips.

        Args:
            x: (N, in_dim) noisy patch tokens of B clips, concatenated.
            coords: (N, 3) integer (t, h, w) patch coordinates of each token within its clip.
            cu_seqlens: (B + 1,) token offsets; clip b is ``x[cu_seqlens[b]:cu_seqlens[b+1]]``.
            t: (B,) flow time in [0, 1] per clip.
            text: (B, Lt, text_dim) text encoder states, one row per clip.
            text_mask: (B, Lt) bool, True for real text tokens.
            text_cache: output of :meth:`encode_text`, instead of ``text`` / ``text_mask``.

        Returns:
            (N, out_dim) prediction per token.
        """
        cfg = self.config
        if x.ndim != 2 or x.shape[1] != cfg.in_dim:
            raise ValueError(f"x must be (N, in_dim={cfg.in_dim}), got {tuple(x.shape)}")
        if coords.shape != (x.shape[0], 3):
            raise ValueError(f"coords must be (N, 3)=({x.shape[0]}, 3), got {tuple(coords.shape)}")
        if text_cache is None:
            if text is None:
                raise ValueError("pass text (B, Lt, text_dim) or a text_cache from encode_text")
            text_cache = self.encode_text(text, text_mask)
        num_clips = cu_seqlens.shape[0] - 1
        if t.shape != (num_clips,) or text_cache.mask.shape[0] != num_clips:
            raise ValueError(
                f"cu_seqlens describes {num_clips} clips but t has shape {tuple(t.shape)} and text has "
                f"{text_cache.mask.shape[0]} rows; pass one timestep and one text row per clip"
            )
        backend = resolve_backend(cfg.attention_backend, x.device)
        ctx = build_attention_context(backend, cu_seqlens, x.shape[0], x.device, text_cache)
        rope = torch.complex(*rope_angles(coords, cfg.rope_dims, cfg.rope_theta))  # (N, hd/2)
        h = self.x_embedder(x)  # (N, D)
        c = self.t_embedder(t) + text_cache.pooled.to(h.dtype)  # (B, D)
        for block, kv in zip(self.blocks, text_cache.kv, strict=True):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, c, rope, kv, ctx, use_reentrant=False)  # (N, D)
            else:
                h = block(h, c, rope, kv, ctx)  # (N, D)
        return self.final_layer(h, c, ctx.seg_ids)  # (N, out_dim)


# --------------------------------------------------------------------------- size registry

# Widths/depths follow DiT-S/B/L/XL (head dim 64, 72 for xl); xs is the CPU demo size, xxs the
# step below it for iso-FLOP sweeps on a CPU (about a decade apart in parameters: tiny, xxs, xs)
# and tiny the unit-test size (seconds per hundred steps on one CPU core).
DIT_SIZES: SizeRegistry[DiTConfig] = SizeRegistry(
    "DiT",
    {
        "tessera-tiny": DiTConfig(hidden_size=32, depth=2, num_heads=2),
        "tessera-xxs": DiTConfig(hidden_size=128, depth=4, num_heads=2),
        "tessera-xs": DiTConfig(hidden_size=256, depth=6, num_heads=4),
        "tessera-s": DiTConfig(hidden_size=384, depth=12, num_heads=6),
        "tessera-m": DiTConfig(hidden_size=768, depth=12, num_heads=12),
        "tessera-l": DiTConfig(hidden_size=1024, depth=24, num_heads=16),
        "tessera-xl": DiTConfig(hidden_size=1152, depth=28, num_heads=16),
    },
)


def dit_config(name: str, **overrides: Any) -> DiTConfig:
    """Config of a named size, e.g. ``dit_config("tessera-s", in_channels=8, text_dim=384)``."""
    return DIT_SIZES.config(name, **overrides)
