"""The DiT's training data: latent clips held in memory, and the resumable stream of
*patch n' pack* batches every rank draws its share from (see the step's docstring)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from components.core import storage
from components.core.latents import key, shard_uri
from components.core.trainer import (
    ResumableSampler,
)
from model.patches import PackedBatch, pack_patches, pad_text

DEFAULT_TEXT_DIM = 384  # only used when no clip at all has text (all-null conditioning)

# --------------------------------------------------------------------------- latents in memory


@dataclass
class LatentSet:
    """Clips held in memory, in a fixed order (sorted by clip_id).

    Attributes:
        latents: per clip (C, t, h, w) float32, normalised.
        texts: per clip (L, D) float32 text states; (1, D) zeros for a clip without text.
        text_masks: per clip (L,) bool; all False = the null condition.
        short_texts, short_masks: per clip, the short caption's states and mask, or None.
        sources: per clip, its caption's ``caption_source`` (``recaptioned`` or the original's).
        original_texts, original_masks: per clip that trains on a re-captioned caption, its own
            caption's states and mask (None where the clip had none, or trains on its own).
    """

    clip_ids: list[str]
    latents: list[Tensor]
    texts: list[Tensor]
    text_masks: list[Tensor]
    kinds: list[str]
    captions: list[str]
    short_texts: list[Tensor | None] = field(default_factory=list)
    short_masks: list[Tensor | None] = field(default_factory=list)
    sources: list[str | None] = field(default_factory=list)
    original_texts: list[Tensor | None] = field(default_factory=list)
    original_masks: list[Tensor | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.clip_ids)

    @property
    def channels(self) -> int:
        return int(self.latents[0].shape[0])

    @property
    def text_dim(self) -> int:
        return int(self.texts[0].shape[1])

    def text_batch(
        self, indices: Sequence[int], short: Sequence[bool] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Texts of clips ``indices`` padded to a common length: (B, L, D) and (B, L) bool.

        ``short[j]`` picks clip ``indices[j]``'s short caption where it has one.
        """
        chosen = [
            (self.short_texts[i], self.short_masks[i])
            if short and short[j] and self.short_texts[i] is not None
            else (self.texts[i], self.text_masks[i])
            for j, i in enumerate(indices)
        ]
        return pad_text([t for t, _ in chosen], [m for _, m in chosen])


def split_clips(index: Any, val_clips: int) -> tuple[Any, Any, bool]:
    """(train rows, validation rows, held out?) of the index.

    Validation uses the first ``val_clips`` clips (by clip_id) of the ``val`` split; without a
    val split, the first ``val_clips`` training clips are held out of training — unless that
    would leave no training clip, in which case they are scored but not held out.
    """
    train = index[index["split"] == "train"]
    if train.empty:
        raise ValueError(
            f"the latents index has no split == 'train' rows (splits: "
            f"{sorted(set(index['split']))}); nothing to train on"
        )
    val = index[index["split"] == "val"].head(val_clips)
    if not val.empty or val_clips < 1:
        return train, val, True
    val = train.head(val_clips)
    if len(train) > len(val):
        return train.iloc[len(val) :], val, True
    return train, val, False


def load_latents(latents: str, rows: Any, text_dim: int | None = None) -> LatentSet:
    """Read the clips of ``rows`` (index rows) from their shards, each shard once.

    ``text_dim`` sets the width of the null text when none of these clips has text.
    """
    from safetensors.torch import load as load_safetensors

    by_id: dict[str, tuple[Tensor, Tensor | None, Tensor | None]] = {}
    shorts: dict[str, tuple[Tensor, Tensor]] = {}
    originals: dict[str, tuple[Tensor, Tensor]] = {}
    for shard, group in rows.groupby("shard", sort=True):
        uri = shard_uri(latents, shard)
        tensors = load_safetensors(storage.read_bytes(uri))
        for clip_id in group["clip_id"]:
            name = key(clip_id, "latent")
            if name not in tensors:
                raise KeyError(f"shard {uri} has no tensor {name!r} for a clip listed in the index")
            latent = tensors[name].float()
            if latent.ndim != 4:
                raise ValueError(f"{name} in {uri} is {tuple(latent.shape)}, expected (C, t, h, w)")
            text = tensors.get(key(clip_id, "text"))
            mask = tensors.get(key(clip_id, "text_mask"))
            if text is not None and mask is None:
                mask = torch.ones(text.shape[0], dtype=torch.bool)
            by_id[clip_id] = (latent, text, mask)
            for name, found in (("short_text", shorts), ("original_text", originals)):
                states = tensors.get(key(clip_id, name))
                if states is not None:
                    states_mask = tensors.get(key(clip_id, f"{name}_mask"))
                    found[clip_id] = (
                        states.float(),
                        torch.ones(states.shape[0], dtype=torch.bool)
                        if states_mask is None
                        else states_mask.bool(),
                    )
    clip_ids = list(rows["clip_id"])
    dims = {int(t.shape[1]) for _, t, _ in by_id.values() if t is not None}
    if len(dims) > 1:
        raise ValueError(f"text states of different widths {sorted(dims)} in one latents set")
    dim = dims.pop() if dims else (text_dim or DEFAULT_TEXT_DIM)
    channels = {int(z.shape[0]) for z, _, _ in by_id.values()}
    if len(channels) > 1:
        raise ValueError(f"latents with different channel counts {sorted(channels)}")
    texts, masks = [], []
    for clip_id in clip_ids:
        _, text, mask = by_id[clip_id]
        if text is None:  # uncaptioned: the null condition
            text, mask = torch.zeros(1, dim), torch.zeros(1, dtype=torch.bool)
        texts.append(text.float())
        masks.append(mask.bool())
    captions = [str(c) if isinstance(c, str) else "" for c in rows.get("caption", [""] * len(rows))]
    kinds = [str(k) for k in rows["kind"]] if "kind" in rows else ["video"] * len(rows)
    return LatentSet(
        clip_ids,
        [by_id[c][0] for c in clip_ids],
        texts,
        masks,
        kinds,
        captions,
        [shorts.get(c, (None, None))[0] for c in clip_ids],
        [shorts.get(c, (None, None))[1] for c in clip_ids],
        [s if isinstance(s, str) else None for s in rows.get("caption_source", [None] * len(rows))],
        [originals.get(c, (None, None))[0] for c in clip_ids],
        [originals.get(c, (None, None))[1] for c in clip_ids],
    )


def apply_variant(data: LatentSet, framing: str, captions: str) -> LatentSet:
    """The training set of a sweep variant (``train_dit.framing`` / ``train_dit.captions``).

    ``square_crop`` centre-crops every latent to a square of its shorter side: the common
    practice of square training crops, done in latent space (the VAE is convolutional, so a
    latent crop is an encoded pixel crop up to the border pixels of the receptive field).
    Captions: ``recaptioned`` trains on the captions the latents were encoded with (the
    captioner's, blended with ``caption.original_share`` of the originals) and needs latents
    encoded after the caption step; ``original`` on each clip's own caption (a clip that came
    without one gets the null condition, as it would without re-captioning); ``short`` on the
    short caption where a clip has one.
    """
    recaptioned = [s == "recaptioned" for s in data.sources] or [False] * len(data)
    if captions == "recaptioned" and not any(recaptioned):
        raise ValueError(
            "train_dit.captions=recaptioned needs latents encoded with re-captioned captions "
            "(caption_source=recaptioned, written by the caption step); these latents have "
            "none. Run the caption step before encode (encode --captions), or use "
            "train_dit.captions=original"
        )
    latents = data.latents
    if framing == "square_crop":
        latents = [_centre_square(z) for z in latents]
    texts, masks = list(data.texts), list(data.text_masks)
    if captions == "original" and any(recaptioned):
        originals = data.original_texts or [None] * len(data)
        original_masks = data.original_masks or [None] * len(data)
        for i, was in enumerate(recaptioned):
            if was and originals[i] is not None:
                texts[i], masks[i] = originals[i], original_masks[i]
            elif was:  # no caption of its own: the null condition
                texts[i] = torch.zeros(1, data.text_dim)
                masks[i] = torch.zeros(1, dtype=torch.bool)
    if captions == "short":
        pairs = [
            (s, m) if s is not None else (t, tm)
            for s, m, t, tm in zip(
                data.short_texts or [None] * len(data),
                data.short_masks or [None] * len(data),
                data.texts,
                data.text_masks,
                strict=True,
            )
        ]
        texts, masks = [t for t, _ in pairs], [m for _, m in pairs]
    return dataclasses.replace(data, latents=latents, texts=texts, text_masks=masks)


def _centre_square(latent: Tensor) -> Tensor:
    h, w = latent.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return latent[..., top : top + side, left : left + side].contiguous()


# --------------------------------------------------------------------------- patch n' pack over a resumable clip stream


class PackStream:
    """The global pack sequence: greedy fill to ``token_budget`` over a resumable clip order.

    Clip ``k`` of the stream is position ``k`` of ``ResumableSampler(len(lengths), seed)`` (an
    endless sequence of seeded epoch permutations). A pack takes clips in that order while they
    fit; the first clip that does not fit opens the next pack. ``position`` (clips consumed) is
    all a resume needs.
    """

    def __init__(self, lengths: Sequence[int], token_budget: int, seed: int, position: int = 0):
        too_long = [n for n in lengths if n > token_budget]
        if too_long:
            raise ValueError(
                f"{len(too_long)} clip(s) have more tokens than train_dit.token_budget="
                f"{token_budget} (largest {max(too_long)}); raise train_dit.token_budget, set "
                "train_dit.drop_rate, or encode smaller clips (encode.max_pixels / max_frames)"
            )
        self.lengths, self.token_budget, self.position = list(lengths), token_budget, position
        self._order = iter(ResumableSampler(len(self.lengths), seed, start=position))
        self._next = next(self._order)

    def next_pack(self) -> list[int]:
        """Clip indices of the next pack, in stream order."""
        pack, used = [], 0
        while not pack or used + self.lengths[self._next] <= self.token_budget:
            pack.append(self._next)
            used += self.lengths[self._next]
            self.position += 1
            self._next = next(self._order)
        return pack


def rank_packs(first_index: int, packs: Sequence[Any], rank: int, world_size: int) -> list:
    """``(global index, pack)`` of the packs rank ``rank`` trains on: ``rank, rank + w, ...``."""
    return [(first_index + k, packs[k]) for k in range(rank, len(packs), world_size)]


def pack_generator(seed: int, stream: int, index: int) -> torch.Generator:
    """RNG of one pack: depends only on the run seed and the pack's global index."""
    return torch.Generator().manual_seed((seed * 1_000_003 + stream) * 1_000_000_007 + index)


def make_batch(
    data: LatentSet,
    pack: Sequence[int],
    patch_size: Sequence[int],
    token_budget: int,
    drop_rate: float = 0.0,
    generator: torch.Generator | None = None,
    short_caption_rate: float = 0.0,
) -> tuple[PackedBatch, Tensor, Tensor]:
    """One packed batch of clips ``pack`` with its text rows: (batch, (B, L, D), (B, L) bool).

    With ``short_caption_rate`` > 0 each clip that has a short caption gets it instead of the
    long one with that probability (drawn from ``generator`` after the packing's draws).
    """
    batches = pack_patches(
        [data.latents[i] for i in pack],
        token_budget,
        patch_size,
        drop_rate=drop_rate,
        generator=generator,
    )
    if len(batches) != 1:
        raise RuntimeError(f"pack {list(pack)} did not fit one batch of {token_budget} tokens")
    batch = batches[0]
    indices = [pack[j] for j in batch.indices]  # text rows follow the segments
    short = None
    if (
        short_caption_rate > 0
        and data.short_texts
        and any(data.short_texts[i] is not None for i in indices)
    ):
        draws = torch.rand(len(indices), generator=generator)
        short = (draws < short_caption_rate).tolist()
    text, mask = data.text_batch(indices, short)
    return batch, text, mask
