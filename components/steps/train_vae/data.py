"""The VAE's training data: which clips train, validate and stay held out, and random
spatio-temporal crops of them at native size, a pure function of (seed, sample position)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from components.core import media
from components.core.config import TrainVAEConfig
from components.core.manifest import Clip

# --------------------------------------------------------------------------- clips


def is_holdout(clip: Clip, names: Sequence[str]) -> bool:
    """Whether the clip's source URI contains one of ``names`` (``train_vae.holdout``)."""
    return any(name and name in (clip.source_uri or clip.uri) for name in names)


def select_clips(clips: Sequence[Clip], tv: TrainVAEConfig) -> dict[str, Any]:
    """``train`` / ``val`` / ``holdout`` clips; ``val_source`` says where the val clips came from.

    Validation takes the first ``val_clips`` val-split clips; a manifest without any (tiny
    corpora) falls back to the first training videos, reported as ``val_source = "train"``.
    """
    holdout = [c for c in clips if is_holdout(c, tv.holdout)]
    rest = [c for c in clips if not is_holdout(c, tv.holdout)]
    train = [c for c in rest if c.split == "train"]
    if not train:
        raise ValueError(
            f"no training clips: the manifest has {len(clips)} rows, {len(holdout)} held out "
            f"({list(tv.holdout)}), none of the rest in split 'train'"
        )
    val = [c for c in rest if c.split == "val"][: tv.val_clips]
    source = "val"
    if not val and tv.val_clips > 0:  # videos first: they show more than stills
        val, source = sorted(train, key=lambda c: c.kind != "video")[: tv.val_clips], "train"
    return {"train": train, "val": val, "holdout": holdout, "val_source": source}


# --------------------------------------------------------------------------- data


class CropDataset(torch.utils.data.Dataset):
    """Random ``crop_frames`` x ``crop_size`` crops of native-size clips, keyed by position.

    Indexing takes ``(position, clip index)`` (see :class:`components.core.trainer.PositionedSampler`) and returns
    ``video`` (3, crop_frames, crop_h, crop_w) in [-1, 1], replication-padded where the clip is
    smaller than the crop, and ``valid`` (3,) = the real (frames, height, width) at the front.
    Decoded clips are cached per process up to ``cache_mb``.
    """

    def __init__(
        self,
        clips: Sequence[Clip],
        crop_frames: int,
        crop_size: tuple[int, int],
        seed: int,
        cache_mb: int = 0,
    ):
        if not clips:
            raise ValueError("CropDataset needs at least one clip")
        self.clips = list(clips)
        self.crop_frames = crop_frames
        self.crop_h, self.crop_w = crop_size
        self.seed = seed
        self.cache_budget = cache_mb * 2**20
        self._cache: dict[str, np.ndarray] = {}
        self._cached_bytes = 0
        self._uncached: set[str] = set()

    def __len__(self) -> int:
        return len(self.clips)

    def _frames(
        self, index: int, start: int, count: int, box: tuple[int, int, int, int]
    ) -> np.ndarray:
        """(n <= count, h, w, 3) uint8 frames from ``start``, cropped to ``box`` (top, left,
        height, width) as they are decoded, so memory follows the crop, not the clip's size; the
        whole clip is decoded and cached instead while it fits the cache (at most the frames the
        manifest counts, at most the budget left, whatever the headers declare)."""
        clip = self.clips[index]
        top, left, h, w = box
        if clip.uri not in self._cache and clip.uri not in self._uncached:
            room = self.cache_budget - self._cached_bytes
            if clip.num_frames * clip.width * clip.height * 3 <= room:
                try:
                    whole = media.read_frames(
                        clip.uri, count=clip.num_frames, rotation=clip.rotation, max_bytes=room
                    )
                    self._cache[clip.uri] = whole  # by URI: balance_kinds repeats clips
                    self._cached_bytes += whole.nbytes
                except ValueError:  # larger than its header said: read windows, uncached
                    self._uncached.add(clip.uri)
        if (whole := self._cache.get(clip.uri)) is not None:
            frames = whole[start : start + count] if start < len(whole) else whole[-count:]
            return frames[:, top : top + h, left : left + w]
        read = {"count": count, "rotation": clip.rotation, "crop": box}
        try:
            return media.read_frames(clip.uri, start=start, **read)
        except ValueError:  # the header over-counted frames: take the clip's first ones
            return media.read_frames(clip.uri, **read)

    def crop(self, position: int, index: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + position)

        def randint(high: int) -> int:  # uniform in [0, high]
            return int(torch.randint(0, high + 1, (1,), generator=gen))

        clip = self.clips[index]
        n = min(self.crop_frames, clip.num_frames)
        start = randint(clip.num_frames - n)
        h, w = min(self.crop_h, clip.height), min(self.crop_w, clip.width)
        box = (randint(clip.height - h), randint(clip.width - w), h, w)
        frames = self._frames(index, start, n, box)  # (t, h, w, 3); less where the file is
        t, h, w = frames.shape[:3]
        video = media.to_video(frames)  # (3, t, h, w)
        pad = (0, self.crop_w - w, 0, self.crop_h - h, 0, self.crop_frames - t)
        video = F.pad(video[None], pad, mode="replicate")[0]  # (3, crop_frames, crop_h, crop_w)
        return {
            "video": video,
            "valid": torch.tensor([t, h, w]),
            "position": torch.tensor(position),
        }

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        position, index = key
        return self.crop(position, index)


def center_clip(
    clip: Clip, frames: int, crop_size: tuple[int, int], temporal_factor: int
) -> torch.Tensor:
    """The fixed validation view of a clip: its first ``1 + tf*k <= frames`` frames, centre crop
    of ``crop_size`` (or less where the clip is smaller) -> (3, T, h, w)."""
    count = media.usable_frames(clip.num_frames, frames, temporal_factor)
    pixels = media.read_frames(clip.uri, count=count, rotation=clip.rotation)
    h, w = min(crop_size[0], pixels.shape[1]), min(crop_size[1], pixels.shape[2])
    return media.to_video(media.center_crop(pixels, h, w))
