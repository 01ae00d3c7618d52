"""The evaluator's data: captioned clips of the manifest, their frozen caption states, and the
random training views (native aspect, a pure function of seed and sample position)."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.core import manifest as mf
from components.core import media
from components.core.config import TrainEvaluatorConfig
from components.core.manifest import Clip
from model.evaluator import fit_short_side
from model.text import pooled_states  # noqa: F401  (the step calls data.pooled_states)

TEXT_STATES = "text_states.safetensors"

# --------------------------------------------------------------------------- clips


@dataclass(frozen=True)
class Item:
    """A manifest clip with its captions ('' when it has none)."""

    clip: Clip
    caption: str
    short_caption: str

    @property
    def captioned(self) -> bool:
        return bool(self.caption)


def read_items(manifest: str) -> list[Item]:
    """Every manifest row as an :class:`Item`, in manifest order."""
    rows = mf.read_table(manifest).to_pylist()
    clips = mf.read_clips(manifest)
    return [
        Item(clip, (row.get("caption") or "").strip(), (row.get("short_caption") or "").strip())
        for clip, row in zip(clips, rows, strict=True)
    ]


def select(items: Sequence[Item], te: TrainEvaluatorConfig) -> dict[str, Any]:
    """``train`` (captioned train-split clips) and ``val`` (val-split clips, the first
    ``te.val_clips`` when > 0, captioned or not); ``val_source`` says where val came from.

    A manifest whose val split has no captioned clip (tiny corpora) validates on the first
    training clips instead, reported as ``val_source = "train"``: then the checks say the
    evaluator fits its data, not that it generalises.
    """
    train = [i for i in items if i.clip.split == "train" and i.captioned]
    if len(train) < 2:
        raise ValueError(
            f"train_evaluator needs at least 2 captioned training clips; the manifest has "
            f"{len(items)} rows, {len(train)} of them captioned in split 'train'"
        )
    val = [i for i in items if i.clip.split == "val"]
    if te.val_clips > 0:
        val = val[: te.val_clips]
    source = "val"
    if sum(i.captioned for i in val) < 2:
        val, source = train[: te.val_clips or 32], "train"
    return {"train": train, "val": val, "val_source": source}


def read_view(clip: Clip, max_frames: int) -> np.ndarray:
    """The clip as the scorer sees it: its first ``max_frames`` frames (0 = all), native size,
    uint8 (T, H, W, 3)."""
    count = min(clip.num_frames, max_frames) if max_frames > 0 else None
    try:
        return media.read_frames(clip.uri, count=count, rotation=clip.rotation)
    except ValueError:  # the header over-counted frames: take what decodes
        return media.read_frames(clip.uri, rotation=clip.rotation)


# --------------------------------------------------------------------------- caption states


def texts_of(items: Sequence[Item]) -> list[str]:
    """The distinct captions (long and short) of ``items``, in first-seen order."""
    seen: dict[str, None] = {}
    for item in items:
        for text in (item.caption, item.short_caption):
            if text:
                seen.setdefault(text, None)
    return list(seen)


def states_key(encoder: Any, texts: Sequence[str]) -> str:
    """sha256 of the encoder's name and length and the texts: a cached file is still right."""
    digest = hashlib.sha256(
        f"{getattr(encoder, 'name', type(encoder).__name__)}|{encoder.max_length}".encode()
    )
    for text in texts:
        digest.update(b"\0" + text.encode())
    return digest.hexdigest()


def save_states(path: Path, texts: Sequence[str], states: torch.Tensor, key: str) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(
        {"states": states.contiguous()},
        str(tmp),
        metadata={"key": key, "texts": json.dumps(list(texts))},
    )
    tmp.replace(path)


def load_states(path: Path, key: str | None = None) -> dict[str, torch.Tensor] | None:
    """text -> (E,) pooled state, from :func:`save_states`' file (None when absent or stale)."""
    from safetensors import safe_open

    if not Path(path).is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if key is not None and meta.get("key") != key:
            return None
        states = f.get_tensor("states")
    texts = json.loads(meta["texts"])
    return {t: states[i] for i, t in enumerate(texts)}


# --------------------------------------------------------------------------- training views


class ViewDataset(torch.utils.data.Dataset):
    """Random training views of captioned clips, keyed by ``(position, index)``.

    A clip is decoded once (its first ``read_frames`` frames), resized so its short side is
    ``ceil(short_side / crop_scale)`` and cached (up to ``cache_mb``). A view is a window of
    ``frames`` consecutive frames (the whole clip when shorter; a still stays one frame) and a
    crop of a random ``u`` in [crop_scale, 1] of each side, aspect ratio kept, at a random place:
    the model then resizes it to ``short_side``, a downscale, as it does any clip it scores.
    No flips and no colour jitter: captions name colours, sides and directions. The caption is
    the short one with probability ``short_caption_rate`` (where the clip has one).
    """

    def __init__(
        self,
        items: Sequence[Item],
        states: dict[str, torch.Tensor],
        te: TrainEvaluatorConfig,
        seed: int,
    ):
        if not items:
            raise ValueError("ViewDataset needs at least one clip")
        self.items = list(items)
        self.states = states
        self.frames, self.crop_scale = te.frames, te.crop_scale
        self.short_caption_rate = te.short_caption_rate
        self.cache_side = math.ceil(te.short_side / te.crop_scale)
        self.read_frames = max(te.frames, te.max_frames, 1) * 2
        self.seed = seed
        self.cache_budget = te.cache_mb * 2**20
        self._cache: dict[str, torch.Tensor] = {}
        self._cached_bytes = 0

    def __len__(self) -> int:
        return len(self.items)

    def pixels(self, index: int) -> torch.Tensor:
        """(3, T, h, w) float32 in [-1, 1] at the cache size."""
        clip = self.items[index].clip
        if clip.uri in self._cache:  # by URI: balance_kinds repeats clips
            return self._cache[clip.uri]
        frames = read_view(clip, self.read_frames)
        video = fit_short_side(media.to_video(frames)[None], self.cache_side)[0]
        if self._cached_bytes + video.nbytes <= self.cache_budget:
            self._cache[clip.uri] = video
            self._cached_bytes += video.nbytes
        return video

    def view(self, position: int, index: int) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + position)

        def uniform() -> float:
            return float(torch.rand((), generator=gen))

        def randint(high: int) -> int:  # uniform in [0, high]
            return int(torch.randint(0, high + 1, (1,), generator=gen))

        item = self.items[index]
        video = self.pixels(index)
        _, t, h, w = video.shape
        n = min(self.frames, t)
        start = randint(t - n)
        u = self.crop_scale + (1 - self.crop_scale) * uniform()
        ch, cw = max(1, round(u * h)), max(1, round(u * w))
        top, left = randint(h - ch), randint(w - cw)
        short = bool(item.short_caption) and uniform() < self.short_caption_rate
        text = item.short_caption if short else item.caption
        return {
            "video": video[:, start : start + n, top : top + ch, left : left + cw],
            "text": self.states[text],
            "position": position,
        }

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        position, index = key
        return self.view(position, index)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Views of different sizes stay a list; the pooled caption states stack to (B, 1, E)."""
    texts = torch.stack([s["text"] for s in samples])[:, None]  # (B, 1, E)
    return {
        "videos": [s["video"] for s in samples],
        "tokens": texts,
        "mask": torch.ones(texts.shape[:2], dtype=torch.bool),
        "positions": [int(s["position"]) for s in samples],
    }
