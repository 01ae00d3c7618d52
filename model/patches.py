"""Patchify latents into spacetime tokens and pack clips of any size into token-budget batches.

A latent clip ``(c, t, h, w)`` becomes ``L = (t/pt)(h/ph)(w/pw)`` tokens of width ``c*pt*ph*pw``
plus integer ``(t, h, w)`` patch coordinates, which is all the DiT needs to know about the grid
(3D RoPE is computed from the coordinates, so any grid works at inference).

*Patch n' pack* (NaViT, Dehghani et al. 2023) concatenates the tokens of several clips — images
(``t = 1``) and videos alike, each at its native size — into one sequence of at most
``token_budget`` tokens; segment ids / ``cu_seqlens`` keep attention inside each clip.

Grids that the patch does not divide are an error, not a silent pad: the VAE produces
``1 + k`` latent frames and ``H/8 x W/8`` latents, so the data step chooses sizes that divide
(crop in pixel space, which keeps every token real). Use :func:`pad_to_patch` when padding is
really wanted; it returns the original size so the caller can crop after :func:`unpatchify`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

PatchSize = tuple[int, int, int]
Grid = tuple[int, int, int]

DEFAULT_PATCH_SIZE: PatchSize = (1, 2, 2)


# --------------------------------------------------------------------------- patchify / unpatchify


def _check_patch_size(patch_size: Sequence[int]) -> PatchSize:
    if len(patch_size) != 3 or any(int(p) != p or p < 1 for p in patch_size):
        raise ValueError(f"patch_size must be three positive ints (pt, ph, pw), got {patch_size!r}")
    return (int(patch_size[0]), int(patch_size[1]), int(patch_size[2]))


def grid_shape(latent_shape: Sequence[int], patch_size: Sequence[int] = DEFAULT_PATCH_SIZE) -> Grid:
    """Patch grid ``(gt, gh, gw)`` of a latent ``(c, t, h, w)``; raises if the patch does not divide it."""
    pt, ph, pw = _check_patch_size(patch_size)
    if len(latent_shape) != 4:
        raise ValueError(f"expected a latent shaped (c, t, h, w), got shape {tuple(latent_shape)}")
    _, t, h, w = (int(s) for s in latent_shape)
    bad = [
        f"{name}={size} % {p} != 0"
        for name, size, p in (("t", t, pt), ("h", h, ph), ("w", w, pw))
        if size % p
    ]
    if bad:
        raise ValueError(
            f"latent (c, t, h, w)={tuple(latent_shape)} is not divisible by patch_size={(pt, ph, pw)} "
            f"({', '.join(bad)}); crop the clip to a multiple of the patch (times the VAE stride) "
            "or call model.patches.pad_to_patch first"
        )
    return (t // pt, h // ph, w // pw)


def patch_coords(grid: Sequence[int], device: torch.device | str | None = None) -> Tensor:
    """Integer ``(t, h, w)`` coordinates of every patch of ``grid`` in token order: (L, 3) int64."""
    gt, gh, gw = (int(g) for g in grid)
    axes = [torch.arange(n, device=device) for n in (gt, gh, gw)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)  # (L, 3)


def patchify(
    latent: Tensor, patch_size: Sequence[int] = DEFAULT_PATCH_SIZE
) -> tuple[Tensor, Tensor]:
    """Cut a latent clip into spacetime patches.

    Args:
        latent: (c, t, h, w); an image is ``t = 1``.
        patch_size: (pt, ph, pw), each dividing the matching latent size.

    Returns:
        tokens (L, c*pt*ph*pw) in (t, h, w) raster order and coords (L, 3) int64.
    """
    pt, ph, pw = _check_patch_size(patch_size)
    grid = grid_shape(latent.shape, (pt, ph, pw))
    tokens = rearrange(
        latent, "c (gt pt) (gh ph) (gw pw) -> (gt gh gw) (c pt ph pw)", pt=pt, ph=ph, pw=pw
    )  # (L, D)
    return tokens, patch_coords(grid, device=latent.device)


def unpatchify(
    tokens: Tensor, grid: Sequence[int], patch_size: Sequence[int] = DEFAULT_PATCH_SIZE
) -> Tensor:
    """Inverse of :func:`patchify`: tokens (L, c*pt*ph*pw) on ``grid`` -> latent (c, t, h, w)."""
    pt, ph, pw = _check_patch_size(patch_size)
    gt, gh, gw = (int(g) for g in grid)
    if tokens.ndim != 2 or tokens.shape[0] != gt * gh * gw or tokens.shape[1] % (pt * ph * pw):
        raise ValueError(
            f"tokens of shape {tuple(tokens.shape)} do not fit grid {(gt, gh, gw)} with patch_size "
            f"{(pt, ph, pw)}: expected ({gt * gh * gw}, c*{pt * ph * pw})"
        )
    return rearrange(
        tokens,
        "(gt gh gw) (c pt ph pw) -> c (gt pt) (gh ph) (gw pw)",
        gt=gt,
        gh=gh,
        gw=gw,
        pt=pt,
        ph=ph,
        pw=pw,
    )  # (c, t, h, w)


def pad_to_patch(
    latent: Tensor, patch_size: Sequence[int] = DEFAULT_PATCH_SIZE
) -> tuple[Tensor, tuple[int, int, int]]:
    """Zero-pad (c, t, h, w) at the end of t, h, w to a multiple of the patch.

    Returns the padded latent and the original ``(t, h, w)``; crop with
    ``x[:, :t, :h, :w]`` after :func:`unpatchify`. Padded tokens are not masked anywhere —
    prefer cropping the clip so every token is real.
    """
    pt, ph, pw = _check_patch_size(patch_size)
    _, t, h, w = latent.shape
    pads = (0, -w % pw, 0, -h % ph, 0, -t % pt)  # F.pad order: last dim first
    return F.pad(latent, pads), (t, h, w)


# --------------------------------------------------------------------------- patch n' pack


@dataclass
class PackedBatch:
    """Clips of different sizes packed into one token sequence.

    ``B`` segments, ``N = sum(seqlens) <= token_budget`` tokens; segment ``b`` holds tokens
    ``cu_seqlens[b]:cu_seqlens[b+1]`` of input clip ``indices[b]``.

    Attributes:
        tokens: (N, D) patch tokens.
        coords: (N, 3) int64 ``(t, h, w)`` patch coordinates, restarting at 0 in every clip.
        seg_ids: (N,) int64 segment index in ``[0, B)``.
        cu_seqlens: (B + 1,) int64 token offsets.
        grids: per-segment full patch grid ``(gt, gh, gw)`` (before token dropping).
        indices: per-segment index into the list given to :func:`pack_patches`.
        keep: per-segment bool mask over the full grid's ``prod(grid)`` tokens (raster order), or
            ``None`` when no token was dropped.
    """

    tokens: Tensor
    coords: Tensor
    seg_ids: Tensor
    cu_seqlens: Tensor
    grids: list[Grid]
    indices: list[int]
    keep: list[Tensor] | None = None

    @property
    def num_segments(self) -> int:
        return len(self.indices)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seqlens(self) -> list[int]:
        return torch.diff(self.cu_seqlens).tolist()

    @property
    def max_seqlen(self) -> int:
        return max(self.seqlens)

    @property
    def grid_tokens(self) -> Tensor:
        """(B,) int64 tokens of each clip's full grid — what the resolution-aware shift uses."""
        return torch.tensor(
            [math.prod(g) for g in self.grids], dtype=torch.int64, device=self.tokens.device
        )

    def to(self, device: torch.device | str) -> PackedBatch:
        return PackedBatch(
            tokens=self.tokens.to(device),
            coords=self.coords.to(device),
            seg_ids=self.seg_ids.to(device),
            cu_seqlens=self.cu_seqlens.to(device),
            grids=list(self.grids),
            indices=list(self.indices),
            keep=None if self.keep is None else [k.to(device) for k in self.keep],
        )


def plan_packs(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Bin item lengths into packs of at most ``token_budget`` tokens (first-fit decreasing).

    Deterministic: items are placed longest first (ties by index) into the first pack with room.
    Returns lists of item indices, each in placement order. Raises if one item alone exceeds the
    budget — raise the budget, drop tokens, or use a smaller clip.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    too_long = [(i, n) for i, n in enumerate(lengths) if n > token_budget]
    if too_long:
        raise ValueError(
            f"{len(too_long)} item(s) exceed token_budget={token_budget} on their own, e.g. item "
            f"{too_long[0][0]} with {too_long[0][1]} tokens; raise the budget or set a token drop rate"
        )
    if any(n < 1 for n in lengths):
        raise ValueError(f"every item needs at least one token, got lengths {list(lengths)}")
    packs: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        slot = next((p for p, r in enumerate(room) if r >= lengths[i]), None)
        if slot is None:
            packs.append([i])
            room.append(token_budget - lengths[i])
        else:
            packs[slot].append(i)
            room[slot] -= lengths[i]
    return packs


def cu_seqlens_from(
    lengths: Sequence[int] | Tensor, device: torch.device | str | None = None
) -> Tensor:
    """(B + 1,) int64 token offsets of B packed clips of ``lengths`` tokens: clip b holds tokens
    ``cu_seqlens[b]:cu_seqlens[b + 1]``."""
    lengths = torch.as_tensor(lengths, dtype=torch.int64, device=device)
    return F.pad(torch.cumsum(lengths, 0), (1, 0))


def segment_ids(cu_seqlens: Tensor) -> Tensor:
    """(N,) int64 index of the clip each packed token belongs to."""
    clips = torch.arange(cu_seqlens.shape[0] - 1, device=cu_seqlens.device)
    return torch.repeat_interleave(clips, torch.diff(cu_seqlens))


def kept_tokens(num_tokens: int, drop_rate: float) -> int:
    """Tokens left after NaViT dropping: ``max(1, round((1 - drop_rate) * num_tokens))``."""
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
    return max(1, round((1.0 - drop_rate) * num_tokens))


def clip_tokens(
    latent_shape: Sequence[int],
    patch_size: Sequence[int] = DEFAULT_PATCH_SIZE,
    drop_rate: float = 0.0,
) -> int:
    """Tokens a latent clip (c, t, h, w) contributes to a pack: its patch grid, minus dropped ones."""
    return kept_tokens(math.prod(grid_shape(latent_shape, patch_size)), drop_rate)


def pack_grids(
    grids: Sequence[Sequence[int]], device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """coords (N, 3) and cu_seqlens (B + 1,) of clips with the given patch grids, e.g. to sample."""
    coords = torch.cat([patch_coords(g, device=device) for g in grids])  # (N, 3)
    return coords, cu_seqlens_from([math.prod(g) for g in grids], device)


def unpack_grids(
    tokens: Tensor, grids: Sequence[Sequence[int]], patch_size: Sequence[int] = DEFAULT_PATCH_SIZE
) -> list[Tensor]:
    """Inverse of :func:`pack_grids`: packed tokens (N, D) of whole clips -> latents (c, t, h, w)."""
    segments = tokens.split([math.prod(g) for g in grids])
    return [unpatchify(seg, grid, patch_size) for seg, grid in zip(segments, grids, strict=True)]


def pad_text(rows: Sequence[Tensor], masks: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Text rows (L_b, D) with masks (L_b,) -> (B, L, D) zero-padded and (B, L) bool, L = max L_b:
    the text rows that go with a packed batch's clips, one per segment."""
    length = max(int(row.shape[0]) for row in rows)
    text = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])
    mask = torch.zeros(len(rows), length, dtype=torch.bool, device=rows[0].device)
    for b, (row, valid) in enumerate(zip(rows, masks, strict=True)):
        text[b, : row.shape[0]], mask[b, : row.shape[0]] = row, valid
    return text, mask


def _collate(
    pieces: Sequence[tuple[Tensor, Tensor]],
    grids: Sequence[Grid],
    indices: Sequence[int],
    keep: list[Tensor] | None,
) -> PackedBatch:
    tokens = torch.cat([p[0] for p in pieces])  # (N, D)
    coords = torch.cat([p[1] for p in pieces])  # (N, 3)
    cu_seqlens = cu_seqlens_from([p[0].shape[0] for p in pieces], tokens.device)  # (B + 1,)
    seg_ids = segment_ids(cu_seqlens)  # (N,)
    return PackedBatch(tokens, coords, seg_ids, cu_seqlens, list(grids), list(indices), keep)


def drop_tokens(
    num_tokens: int, drop_rate: float, generator: torch.Generator | None = None
) -> Tensor:
    """NaViT token dropping: bool keep mask (num_tokens,) of :func:`kept_tokens` tokens."""
    n_keep = kept_tokens(num_tokens, drop_rate)
    order = torch.randperm(num_tokens, generator=generator)
    keep = torch.zeros(num_tokens, dtype=torch.bool)
    keep[order[:n_keep]] = True
    return keep


def pack_patches(
    items: Sequence[Tensor],
    token_budget: int,
    patch_size: Sequence[int] = DEFAULT_PATCH_SIZE,
    *,
    drop_rate: float = 0.0,
    generator: torch.Generator | None = None,
) -> list[PackedBatch]:
    """Patchify latents of any size and pack them into batches of at most ``token_budget`` tokens.

    Args:
        items: latents (c, t, h, w) with the same ``c``; images (t = 1) and videos mix freely.
        token_budget: max tokens per packed batch.
        patch_size: (pt, ph, pw).
        drop_rate: fraction of each clip's tokens dropped at random (NaViT); 0 keeps all. The
            kept tokens keep their true coordinates; ``PackedBatch.keep`` records which.
        generator: RNG for token dropping.

    Returns:
        Packed batches planned with :func:`plan_packs`; together they hold every item once.
    """
    patch_size = _check_patch_size(patch_size)
    channels = {int(x.shape[0]) for x in items}
    if len(channels) > 1:
        raise ValueError(
            f"all items must have the same number of latent channels, got {sorted(channels)}"
        )
    grids = [grid_shape(x.shape, patch_size) for x in items]
    pieces = [patchify(x, patch_size) for x in items]
    keep: list[Tensor] | None = None
    if drop_rate > 0.0:
        keep = [drop_tokens(tok.shape[0], drop_rate, generator).to(tok.device) for tok, _ in pieces]
        pieces = [(tok[k], crd[k]) for (tok, crd), k in zip(pieces, keep, strict=True)]
    plan = plan_packs([tok.shape[0] for tok, _ in pieces], token_budget)
    return [
        _collate(
            [pieces[i] for i in pack],
            [grids[i] for i in pack],
            pack,
            None if keep is None else [keep[i] for i in pack],
        )
        for pack in plan
    ]


def unpack(batch: PackedBatch, tokens: Tensor | None = None) -> list[Tensor]:
    """Split packed (N, ...) tokens (default ``batch.tokens``) back into per-segment tensors (L_b, ...)."""
    tokens = batch.tokens if tokens is None else tokens
    if tokens.shape[0] != batch.num_tokens:
        raise ValueError(
            f"tokens have {tokens.shape[0]} rows but the batch packs {batch.num_tokens} tokens"
        )
    return list(torch.split(tokens, batch.seqlens))


def unpack_latents(
    batch: PackedBatch, tokens: Tensor | None = None, patch_size: Sequence[int] = DEFAULT_PATCH_SIZE
) -> list[Tensor]:
    """Packed tokens -> per-segment latents (c, t, h, w); dropped tokens come back as zeros."""
    out = []
    for b, seg in enumerate(unpack(batch, tokens)):
        full = seg
        if batch.keep is not None:
            full = seg.new_zeros(batch.keep[b].shape[0], seg.shape[1])
            full[batch.keep[b]] = seg
        out.append(unpatchify(full, batch.grids[b], patch_size))
    return out


def real_token_fraction(
    batches: Sequence[PackedBatch] | Sequence[Sequence[int]], token_budget: int
) -> float:
    """Fraction of the ``len(batches) * token_budget`` token slots holding real tokens.

    Accepts packed batches or planned packs of lengths (``[[len, ...], ...]``). Packs are not
    padded in memory, but static-shape kernels (and the budget-based cost model) pay for the slots.
    """
    if not batches:
        return 0.0
    used = sum(b.num_tokens if isinstance(b, PackedBatch) else sum(b) for b in batches)
    return used / (len(batches) * token_budget)
