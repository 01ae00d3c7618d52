"""Attention over packed clips: backends that never let a token attend across clips.

Packed tokens of B clips (see ``model.patches``) arrive as one (N, H, hd) sequence plus
``cu_seqlens``; self-attention stays inside each clip and cross-attention reads only the clip's
own text. Backends (``DiTConfig.attention_backend``):

* ``"sdpa_segments"`` — ``F.scaled_dot_product_attention`` per run of consecutive equal-length
  clips, batched (strided views, no copies). The CPU default: a dense block mask is ~4x slower on
  CPU and FlexAttention has no CPU backward. Under CPU bf16 autocast, calls within
  ``MATMUL_ATTENTION_MAX_BYTES`` of probabilities use :func:`matmul_attention`, not the flash kernel.
* ``"dense_mask"`` — one SDPA call with an (N, N) block-diagonal mask; O(N²) memory, for tests.
* ``"flex"`` — ``torch.nn.attention.flex_attention`` with a document mask; CUDA only.
* ``"auto"`` — ``"flex"`` on CUDA when importable, else ``"sdpa_segments"``.

:class:`TextCache` holds every block's text keys/values, computed once per prompt batch
(``DiT.encode_text``) and reused at every sampling step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from model.patches import segment_ids

ATTENTION_BACKENDS = ("sdpa_segments", "dense_mask", "flex", "auto")
_FLEX_BLOCK = 128  # FlexAttention's sparse block size; sequences are padded to a multiple of it


@dataclass
class TextCache:
    """Text keys/values of every block, computed once per prompt batch and reused across steps.

    Attributes:
        kv: per block ``(k, v)``, each (B, H, Lt, head_dim), k already QK-normed.
        mask: (B, Lt) bool, True for real text tokens.
        valid_index: per row, the int64 positions of its real text tokens.
        pooled: (B, D) projected pooled text added to the timestep embedding (zeros for rows
            without text, or when the model has no pooled path).
    """

    kv: list[tuple[Tensor, Tensor]]
    mask: Tensor
    valid_index: list[Tensor]
    pooled: Tensor

    @property
    def has_text(self) -> Tensor:
        """(B,) bool; a row without text (e.g. the CFG null prompt) gets zero cross-attention."""
        return self.mask.any(dim=-1)


@dataclass
class AttentionContext:
    """Everything about the packing that attention needs, built once per forward."""

    backend: str
    seg_ids: Tensor  # (N,) int64
    seqlens: list[int]  # B python ints
    token_has_text: Tensor  # (N, 1) float: 0 where the clip has no text tokens
    self_mask: Any = None  # dense: (N, N) bool; flex: BlockMask
    cross_mask: Any = None  # dense: (N, B*Lt) bool; flex: BlockMask
    text_valid_index: list[Tensor] | None = None
    all_have_text: bool = False  # every clip has text: token_has_text is all ones, skip it
    uniform: bool = False  # every clip has the same length: blocks broadcast (B, 1, D) modulation
    runs: list[SegmentRun] | None = None  # sdpa_segments: clips batched per SDPA call


@dataclass
class SegmentRun:
    """Consecutive packed clips of equal length, attended to in one batched SDPA call.

    ``plan_packs`` places clips longest first, so equal sizes sit next to each other and a pack
    of same-shape clips (fixed-shape training, CFG's cond + null halves) is a single run.
    """

    first: int  # index of its first clip
    count: int  # number of clips
    length: int  # tokens per clip
    text_len: int  # text keys its clips read: up to the run's last real text token
    text_mask: Tensor | None  # (count, 1, 1, text_len) bool key mask, None when all are real


def _flex_available() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _compiled_flex_attention() -> Callable[..., Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "flex" if device.type == "cuda" and _flex_available() else "sdpa_segments"
    if backend == "flex":
        if device.type != "cuda":
            raise RuntimeError(
                f"attention_backend='flex' needs CUDA tensors (got device {device}); FlexAttention has "
                "no CPU backward — use 'sdpa_segments' on CPU"
            )
        if not _flex_available():
            raise RuntimeError(
                "attention_backend='flex' needs torch.nn.attention.flex_attention (torch >= 2.5)"
            )
    return backend


def _pad_to_block(x: Tensor, fill: float | int = 0) -> Tensor:
    """Pad dim 0 to a multiple of the flex block size."""
    pad = -x.shape[0] % _FLEX_BLOCK
    return F.pad(x, (0, 0) * (x.ndim - 1) + (0, pad), value=fill) if pad else x


def _segment_runs(seqlens: list[int], text: TextCache) -> list[SegmentRun]:
    """Split the packed clips into runs of consecutive equal-length clips (see SegmentRun).

    Each run reads text keys only up to its clips' last real token, not the pack's longest
    caption: stills with short captions packed beside a long-captioned video skip the padding.
    """
    batch, text_len = text.mask.shape
    positions = torch.arange(1, text_len + 1, device=text.mask.device)
    ends = (text.mask * positions).amax(dim=1).tolist() if text_len else [0] * batch  # B ints
    runs, first = [], 0
    while first < len(seqlens):
        end = first + 1
        while end < len(seqlens) and seqlens[end] == seqlens[first]:
            end += 1
        keys = max(1, *ends[first:end])
        mask = text.mask[first:end, :keys]  # (count, keys)
        # rows without text attend to all of it (no NaN) and are zeroed by token_has_text
        mask = mask | ~mask.any(dim=1, keepdim=True)
        mask = None if bool(mask.all()) else mask[:, None, None, :]  # (count, 1, 1, keys)
        runs.append(SegmentRun(first, end - first, seqlens[first], keys, mask))
        first = end
    return runs


def build_attention_context(
    backend: str, cu_seqlens: Tensor, num_tokens: int, device: torch.device, text: TextCache
) -> AttentionContext:
    seqlens = torch.diff(cu_seqlens).tolist()
    if sum(seqlens) != num_tokens or any(n < 1 for n in seqlens):
        raise ValueError(
            f"cu_seqlens {cu_seqlens.tolist()} does not describe {num_tokens} tokens in non-empty segments"
        )
    seg_ids = segment_ids(cu_seqlens.to(device))  # (N,)
    token_has_text = text.has_text.to(device)[seg_ids].float()[:, None]  # (N, 1)
    ctx = AttentionContext(backend, seg_ids, seqlens, token_has_text)
    ctx.all_have_text = bool(text.has_text.all())
    ctx.uniform = len(set(seqlens)) == 1
    if backend == "sdpa_segments":
        ctx.text_valid_index = text.valid_index
        ctx.runs = _segment_runs(seqlens, text)
        return ctx
    batch, text_len = text.mask.shape
    text_seg = torch.arange(batch, device=device).repeat_interleave(text_len)  # (B*Lt,)
    # rows without text attend to everything (no NaN) and are zeroed by token_has_text
    text_ok = text.mask.reshape(-1) | ~text.has_text.repeat_interleave(text_len)  # (B*Lt,)
    if backend == "dense_mask":
        ctx.self_mask = seg_ids[:, None] == seg_ids[None, :]  # (N, N)
        ctx.cross_mask = (seg_ids[:, None] == text_seg[None, :]) & text_ok[None, :]  # (N, B*Lt)
    elif backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        q_seg = _pad_to_block(seg_ids, fill=-1)  # pad tokens form their own segment
        kv_seg = _pad_to_block(
            torch.where(text_ok, text_seg, -2), fill=-2
        )  # masked text matches nothing

        def same_clip(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            return q_seg[q] == q_seg[kv]

        def own_text(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            return q_seg[q] == kv_seg[kv]

        n_pad, t_pad = q_seg.shape[0], kv_seg.shape[0]
        ctx.self_mask = create_block_mask(
            same_clip, None, None, n_pad, n_pad, device=device, _compile=True
        )
        ctx.cross_mask = create_block_mask(
            own_text, None, None, n_pad, t_pad, device=device, _compile=True
        )
    return ctx


# bf16 self-attention on CPU runs as two bf16 matmuls and a softmax (:func:`matmul_attention`):
# ~1.5x faster than SDPA's CPU flash kernel in bf16 (1,280 tokens, head dim 64, forward +
# backward), for the (L, L) probabilities of every head kept for backward. Calls whose
# probabilities would exceed this many bytes keep the flash kernel's O(L) memory.
MATMUL_ATTENTION_MAX_BYTES = 128 * 2**20


def _cpu_bf16_autocast() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def _use_matmul_attention(q: Tensor, keys: int | None = None) -> bool:
    """q (..., L, hd) attending to ``keys`` keys (default L): on CPU in bf16 (or under bf16
    autocast), within the memory cap."""
    if q.device.type != "cpu" or not (q.dtype == torch.bfloat16 or _cpu_bf16_autocast()):
        return False
    return q.shape[:-1].numel() * (keys or q.shape[-2]) * 2 <= MATMUL_ATTENTION_MAX_BYTES


def matmul_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Softmax attention as bf16 matmuls: q (..., L, hd), k and v (..., M, hd), optional bool
    key ``mask`` broadcastable to (..., L, M) -> (..., L, hd) in bf16.

    The CPU softmax kernel accumulates bf16 inputs in fp32; scores and probabilities are stored in
    bf16, as the math SDPA backend does in bf16.
    """
    q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))  # (..., L, M)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), v)


def segment_attention(q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
    """Self-attention within each packed clip: q, k, v (N, H, hd) -> (N, H, hd)."""
    if ctx.backend == "sdpa_segments":
        # split, not slices: the backward of a split is one cat, of a slice a full-size zero fill
        sizes = [run.count * run.length for run in ctx.runs]
        outs = []
        for run, qs, ks, vs in zip(
            ctx.runs, q.split(sizes), k.split(sizes), v.split(sizes), strict=True
        ):
            qs, ks, vs = (
                rearrange(s, "(b n) h d -> b h n d", b=run.count) for s in (qs, ks, vs)
            )  # (count, H, L, hd) strided views, no copy
            if _use_matmul_attention(qs):
                out = matmul_attention(qs, ks, vs)  # (count, H, L, hd)
            else:
                out = F.scaled_dot_product_attention(qs, ks, vs)  # (count, H, L, hd)
            outs.append(rearrange(out, "b h n d -> (b n) h d"))  # a view when SDPA wrote it
        return outs[0] if len(outs) == 1 else torch.cat(outs)  # (N, H, hd)
    if ctx.backend == "dense_mask":
        q, k, v = (rearrange(s, "n h d -> 1 h n d") for s in (q, k, v))  # (1, H, N, hd)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.self_mask)  # (1, H, N, hd)
        return rearrange(out, "1 h n d -> n h d")
    n = q.shape[0]
    q, k, v = (
        rearrange(_pad_to_block(s), "n h d -> 1 h n d") for s in (q, k, v)
    )  # (1, H, Npad, hd)
    out = _compiled_flex_attention()(q, k, v, block_mask=ctx.self_mask)  # (1, H, Npad, hd)
    return rearrange(out, "1 h n d -> n h d")[:n]


def text_attention(q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
    """Cross-attention of each clip's tokens q (N, H, hd) to its own text k, v (B, H, Lt, hd)."""
    if ctx.backend == "sdpa_segments":
        sizes, counts = [r.count * r.length for r in ctx.runs], [r.count for r in ctx.runs]
        outs = []
        for run, qs, ks, vs in zip(
            ctx.runs, q.split(sizes), k.split(counts), v.split(counts), strict=True
        ):
            qs = rearrange(qs, "(b n) h d -> b h n d", b=run.count)  # (count, H, L, hd)
            ks, vs = (s[:, :, : run.text_len] for s in (ks, vs))  # (count, H, text_len, hd)
            if _use_matmul_attention(qs, ks.shape[-2]):
                out = matmul_attention(qs, ks, vs, run.text_mask)
            else:
                out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=run.text_mask)
            outs.append(rearrange(out, "b h n d -> (b n) h d"))  # (count * L, H, hd)
        out = outs[0] if len(outs) == 1 else torch.cat(outs)  # (N, H, hd)
    elif ctx.backend == "dense_mask":
        q = rearrange(q, "n h d -> 1 h n d")  # (1, H, N, hd)
        k, v = (rearrange(s, "b h l d -> 1 h (b l) d") for s in (k, v))  # (1, H, B*Lt, hd)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.cross_mask)  # (1, H, N, hd)
        out = rearrange(out, "1 h n d -> n h d")
    else:
        n = q.shape[0]
        q = rearrange(_pad_to_block(q), "n h d -> 1 h n d")  # (1, H, Npad, hd)
        k, v = (
            rearrange(_pad_to_block(rearrange(s, "b h l d -> (b l) h d")), "m h d -> 1 h m d")
            for s in (k, v)
        )
        out = _compiled_flex_attention()(q, k, v, block_mask=ctx.cross_mask)  # (1, H, Npad, hd)
        out = rearrange(out, "1 h n d -> n h d")[:n]
    if ctx.all_have_text:
        return out  # (N, H, hd)
    return out * ctx.token_has_text[:, :, None].to(out.dtype)  # (N, H, hd)
