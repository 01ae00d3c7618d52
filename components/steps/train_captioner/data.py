"""The captioner's data: captioned clips of the manifest, decoded once into a memory cache at the
model's working size, and training samples (one of three tasks each, a pure function of seed and
sample position), augmented only in ways that keep their captions true."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from components.core import manifest as mf
from components.core import media
from components.core.config import TrainCaptionerConfig
from components.core.manifest import Clip
from model.captioner import (
    CaptionTokenizer,
    prompt_batch,
    sample_frames,
    teacher_forcing,
)
from model.evaluator import fit_short_side

TRAINED_SOURCES = ("given", "synthetic")  # caption_source values the captioner learns from


# --------------------------------------------------------------------------- clips


@dataclass(frozen=True)
class Item:
    """A manifest clip with its captions ('' when it has none) and their source."""

    clip: Clip
    caption: str
    short_caption: str
    source: str

    @property
    def trainable(self) -> bool:
        return bool(self.caption) and self.source in TRAINED_SOURCES

    @property
    def file_name(self) -> str:
        """The file name it was ingested under (``image_0001.jpg``): the factor sidecar's key."""
        return Path((self.clip.source_uri or self.clip.uri).rstrip("/")).name


def read_items(manifest: str) -> list[Item]:
    """Every manifest row as an :class:`Item`, in manifest order."""
    rows = mf.read_table(manifest).to_pylist()
    clips = mf.read_clips(manifest)
    return [
        Item(
            clip,
            (row.get("caption") or "").strip(),
            (row.get("short_caption") or "").strip(),
            row.get("caption_source") or "",
        )
        for clip, row in zip(clips, rows, strict=True)
    ]


def select(items: Sequence[Item], tc: TrainCaptionerConfig) -> dict[str, Any]:
    """``train`` (train-split clips with a given or synthetic caption), ``val`` (val-split ones,
    the first ``tc.val_clips`` when > 0), ``uncaptioned`` (clips with no caption, never trained
    on) and ``val_source``: a manifest with fewer than 2 captioned val clips (tiny corpora)
    reports on its first training clips instead, as ``val_source = "train"``."""
    train = [i for i in items if i.clip.split == "train" and i.trainable]
    if len(train) < 2:
        raise ValueError(
            f"train_captioner needs at least 2 training clips with a caption whose source is one "
            f"of {TRAINED_SOURCES}; the manifest has {len(items)} rows, {len(train)} such in "
            "split 'train'"
        )
    val = [i for i in items if i.clip.split == "val" and i.trainable]
    if tc.val_clips > 0:
        val = val[: tc.val_clips]
    source = "val"
    if len(val) < 2:
        val, source = train[: tc.val_clips or 32], "train"
    uncaptioned = [i for i in items if not i.caption]
    return {"train": train, "val": val, "uncaptioned": uncaptioned, "val_source": source}


def pairs(items: Sequence[Item]) -> list[dict[str, str]]:
    """The distinct (short, long) caption pairs of ``items``, in first-seen order."""
    seen: dict[tuple[str, str], None] = {}
    for item in items:
        if item.short_caption and item.caption:
            seen.setdefault((item.short_caption, item.caption), None)
    return [{"short": s, "long": long} for s, long in seen]


def read_clip(clip: Clip, frames: int, short_side: int) -> torch.Tensor:
    """The clip as the model sees it: ``frames`` frames sampled evenly over all of it (a still:
    one), resized so the short side is ``short_side``; (3, F, h, w) float32 in [-1, 1]. The
    model's own sampling and resizing leave such a clip unchanged."""
    try:
        decoded = media.read_frames(clip.uri, rotation=clip.rotation)
    except ValueError:  # the header over-counted frames: take what decodes
        decoded = media.read_frames(clip.uri, count=clip.num_frames, rotation=clip.rotation)
    video = sample_frames(media.to_video(decoded), frames)
    return fit_short_side(video[None], short_side)[0].contiguous()


class ClipCache:
    """Decoded clips at the working size by URI, up to ``cache_mb``; the rest decode each time."""

    def __init__(self, frames: int, short_side: int, cache_mb: int):
        self.frames, self.short_side = frames, short_side
        self.budget = cache_mb * 2**20
        self._cache: dict[str, torch.Tensor] = {}
        self._bytes = 0

    def __call__(self, clip: Clip) -> torch.Tensor:
        if clip.uri in self._cache:
            return self._cache[clip.uri]
        video = read_clip(clip, self.frames, self.short_side)
        if self._bytes + video.nbytes <= self.budget:
            self._cache[clip.uri] = video
            self._bytes += video.nbytes
        return video


# --------------------------------------------------------------------------- samples


def task_of(item: Item, u: float, tc: TrainCaptionerConfig) -> str:
    """The task of a sample with uniform draw ``u``: ``expand`` below ``expand_rate``, ``short``
    below ``expand_rate + short_rate`` (both need a short caption), else ``descriptive``."""
    if item.short_caption and u < tc.expand_rate:
        return "expand"
    if item.short_caption and u < tc.expand_rate + tc.short_rate:
        return "short"
    return "descriptive"


_MIRRORED = {
    "left": "right",
    "right": "left",
    "leftward": "rightward",
    "rightward": "leftward",
    "leftwards": "rightwards",
    "rightwards": "leftwards",
    "clockwise": "counterclockwise",
    "counterclockwise": "clockwise",
    "anticlockwise": "clockwise",
    "counter-clockwise": "clockwise",
}
_MIRROR_WORD = re.compile(
    r"\b(" + "|".join(sorted(map(re.escape, _MIRRORED), key=len, reverse=True)) + r")\b",
    re.IGNORECASE,
)


def mirror_caption(text: str) -> str:
    """The caption of the left-right mirrored clip: every left/right (and clockwise) word
    swapped, its case kept ("from left to right" -> "from right to left"; "Left" -> "Right")."""

    def swap(m: re.Match) -> str:
        word = m[0]
        new = _MIRRORED[word.lower()]
        return new.capitalize() if word[0].isupper() else new

    return _MIRROR_WORD.sub(swap, text)


def shift(video: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """(C, F, H, W) translated by (dy, dx) pixels, the edge pixels repeated into the gap."""
    _, _, h, w = video.shape
    pad = max(abs(dy), abs(dx))
    if not pad:
        return video
    padded = torch.nn.functional.pad(video, (pad, pad, pad, pad), mode="replicate")
    return padded[..., pad - dy : pad - dy + h, pad - dx : pad - dx + w].contiguous()


def augment(
    video: torch.Tensor, texts: tuple[str, str], tc: TrainCaptionerConfig, gen: torch.Generator
) -> tuple[torch.Tensor, tuple[str, str]]:
    """A training clip and its (descriptive, short) captions, augmented so the captions stay
    true: with probability ``tc.hflip`` mirrored left-right with :func:`mirror_caption` applied
    to both captions, then translated by up to ``tc.shift`` of the short side in each axis
    (small against the thirds a caption's "upper left" names). Draws from ``gen`` always, so
    the draws of a sample do not depend on the config."""
    flip, dy, dx = torch.rand(3, generator=gen).tolist()
    if flip < tc.hflip:
        video, texts = video.flip(-1), (mirror_caption(texts[0]), mirror_caption(texts[1]))
    reach = round(tc.shift * min(video.shape[-2:]))
    if reach:
        video = shift(video, round((2 * dy - 1) * reach), round((2 * dx - 1) * reach))
    return video, texts


class CaptionDataset(torch.utils.data.Dataset):
    """Training samples keyed by ``(position, index)``: the task and the augmentation are drawn
    from (seed, position), so a resumed run sees what an uninterrupted one would. Augmentation
    (:func:`augment`) only mirrors with the caption's left and right swapped, and translates a
    little: colours, shapes, sizes, aspect ratios and motion stay what the caption says."""

    def __init__(self, items: Sequence[Item], tc: TrainCaptionerConfig, seed: int):
        if not items:
            raise ValueError("CaptionDataset needs at least one clip")
        self.items, self.tc, self.seed = list(items), tc, seed
        self.clips = ClipCache(tc.frames, tc.short_side, tc.cache_mb)

    def __len__(self) -> int:
        return len(self.items)

    def sample(self, position: int, index: int) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + position)
        item = self.items[index]
        task = task_of(item, float(torch.rand((), generator=gen)), self.tc)
        video, (caption, short) = None, (item.caption, item.short_caption)
        if task != "expand":
            video, (caption, short) = augment(self.clips(item.clip), (caption, short), self.tc, gen)
        return {
            "task": task,
            "video": video,
            "prompt": short if task == "expand" else "",
            "text": short if task == "short" else caption,
            "position": position,
        }

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        return self.sample(*key)


class Collate:
    """Samples -> the batch the training objective takes: clips of the video tasks (a list, any
    sizes), prompt ids and mask of the expand task, and teacher-forcing ids of all in the order
    video samples first, then prompt samples; with ``text_embeds`` (text -> frozen text
    encoder embedding) also ``text_embeds`` (Bv, E) of the video samples' captions."""

    def __init__(
        self,
        tokenizer: CaptionTokenizer,
        max_tokens: int,
        text_embeds: dict[str, torch.Tensor] | None = None,
    ):
        self.tokenizer, self.max_tokens = tokenizer, max_tokens
        self.text_embeds = text_embeds

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        ordered = [s for s in samples if s["video"] is not None]
        ordered += [s for s in samples if s["video"] is None]
        prompts = [s["prompt"] for s in ordered if s["video"] is None]
        inputs, targets = teacher_forcing(
            self.tokenizer,
            [s["task"] for s in ordered],
            [s["text"] for s in ordered],
            self.max_tokens,
        )
        batch: dict[str, Any] = {
            "videos": [s["video"] for s in ordered if s["video"] is not None],
            "prompt_ids": None,
            "prompt_mask": None,
            "inputs": inputs,
            "targets": targets,
            "positions": [int(s["position"]) for s in samples],
            "tasks": [s["task"] for s in samples],
            "text_embeds": None,
        }
        videos = [s for s in ordered if s["video"] is not None]
        if self.text_embeds is not None and videos:
            batch["text_embeds"] = torch.stack([self.text_embeds[s["text"]] for s in videos])
        if prompts:
            batch["prompt_ids"], batch["prompt_mask"] = prompt_batch(
                self.tokenizer, prompts, self.max_tokens
            )
        return batch
