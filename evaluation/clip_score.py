"""CLIP score of generated videos against their prompts, computed the way the field does.

**What is averaged.** Every frame of every video is embedded and compared with its prompt's
text embedding by cosine similarity; the score is the mean over **all frames** (frame-weighted:
each frame of each video counts once, so a 32-frame clip weighs twice a 16-frame one). That is
CLIPSIM (VideoGPT, Phenaki, Make-A-Video, ...) and VBench's per-frame CLIP scores, and it is what
``torchmetrics.multimodal.CLIPScore`` gives when every frame is fed as an image with its prompt.
A clip-level scorer (one embedding per video) makes it a plain mean over videos.

**The conventions, side by side** (:class:`ClipScoreResult`):

- ``cosine``: the frame-weighted mean raw cosine, in [-1, 1]. **The headline**
  (``clip_score_<name>`` in :meth:`ClipScoreResult.as_metrics`, with its bootstrap interval):
  CLIPSIM's convention, the one T2V papers quote (about 0.29-0.31 on MSR-VTT with ViT-B/32).
- ``torchmetrics``: ``max(100 * cosine, 0)``. torchmetrics' ``CLIPScore.update`` adds
  ``100 * cos`` of every (image, caption) pair it sees to one sum and counts the pairs;
  ``compute`` returns ``max(sum / count, 0)``: the **mean over pairs** (here: over all frames,
  so it is ``cosine`` × 100) with the clamp applied **after** the mean. A negative pair lowers
  the mean; only a negative mean is clamped (the functional ``clip_score`` does ``mean(0)`` then
  the same clamp). The "CLIP score ~30" of text-to-image papers is this scale.
- ``hessel``: Hessel et al. 2021 (CLIPScore), ``mean_i 2.5 * max(cos_i, 0)`` with the clamp
  applied **per sample**, where a video's ``cos_i`` is its frame-averaged cosine. This mean is
  over samples (each video once, whatever its length), unlike the two above.

The bootstrap interval resamples **videos** with replacement (a seeded percentile bootstrap,
as in :mod:`evaluation.frechet`) and recomputes the frame-weighted cosine of each resample.

**Scorers.** Anything satisfying :class:`VideoTextScorer` (``name``, ``sha256``,
``embed_video``, ``embed_text``; L2-normalised embeddings) can be scored; two CLIP loaders are
here, both local-only:

- :meth:`HFClipScorer.from_dir`: a Hugging Face CLIP directory (``transformers.CLIPModel`` +
  its tokenizer, ``local_files_only=True``);
- :meth:`OpenClipScorer.from_file`: an open_clip weights file and model name. open_clip imports
  torchvision at module level; it is imported lazily here, and its absence is explained.

Preprocessing is ours, in torch, the same for both (no torchvision, no PIL), and reproduces
the PIL pipelines of both libraries (``CLIPImageProcessor``'s PIL backend; open_clip's
``Resize``/``CenterCrop`` on PIL images): frames (uint8 ``(T, H, W, 3)``) have their short side
resized to the model's image size (``int(size * long / short)`` for the long side) with PIL's
resampling (``antialias=True`` bicubic or bilinear, which is PIL's filter, applied as PIL does:
a horizontal pass, then a vertical one, each rounded to uint8; a side already at its length is
not resampled, so a frame at the size is untouched), are centre-cropped (the offset floored as
Hugging Face does, or rounded as torchvision does for open_clip) and normalised with the
model's mean/std. On random-noise images PIL and this differ by at most one uint8 level in a
few pixels (PIL's fixed-point arithmetic). Text is tokenised by the model's own tokenizer and
truncated to the model's context with the end-of-text token kept (where torchmetrics, slicing
``input_ids``, drops it and so pools at another position: captions past the context are the one
place its numbers and these differ).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np

# OpenAI CLIP's normalisation constants (also transformers' OPENAI_CLIP_MEAN/STD, open_clip's).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HESSEL_WEIGHT = 2.5  # w in Hessel et al. 2021, CLIP-S = w * max(cos, 0)
# Files counted as weights when hashing a directory (see weights_sha256).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npz")
_NAME = re.compile(r"^[a-z0-9_]+$")
_NORM_TOLERANCE = 1e-2  # |norm - 1| above this: the scorer did not L2-normalise


@runtime_checkable
class VideoTextScorer(Protocol):
    """A video–text embedding model the CLIP score can use.

    ``name`` is the metric suffix (``clip_score_<name>``: "openclip", "hfclip", "domain", ...);
    ``sha256`` identifies the weights (:func:`weights_sha256`).
    """

    name: str
    sha256: str

    def embed_video(self, video: np.ndarray) -> np.ndarray:
        """One uint8 video (T, H, W, 3) -> (K, D) L2-normalised embeddings: K = T for per-frame
        models (CLIP), K = 1 for clip-level ones."""
        ...

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """M texts -> (M, D) L2-normalised embeddings."""
        ...


def weights_sha256(path: str | Path) -> str:
    """Hex sha256 of a weights file, or of a directory's weight files.

    For a directory: one sha256 over the bytes of its files whose names end in
    :data:`WEIGHT_SUFFIXES` (recursively), concatenated in sorted order of their relative POSIX
    paths. A directory holding one weights file therefore hashes like that file alone (the hash
    the Hugging Face Hub shows for it). Streamed; memory stays flat.
    """
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(
            (p for p in path.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        if not files:
            raise FileNotFoundError(
                f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) under {path} to hash"
            )
    else:
        raise FileNotFoundError(f"no weights file or directory at {path}")
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def check_video(video: np.ndarray) -> np.ndarray:
    """``video`` as a uint8 (T, H, W, 3) array with T, H, W >= 1, else a ValueError/TypeError."""
    if not isinstance(video, np.ndarray):
        raise TypeError(f"a video must be a numpy array, got {type(video).__name__}")
    if video.dtype != np.uint8:
        raise TypeError(f"a video must be uint8 (T, H, W, 3), got dtype {video.dtype}")
    if video.ndim != 4 or video.shape[-1] != 3 or min(video.shape[:3]) < 1:
        raise ValueError(f"a video must be (T, H, W, 3) with T, H, W >= 1, got {video.shape}")
    return video


# --------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class Preprocess:
    """How frames become a CLIP image tower's input (see the module docstring)."""

    size: int  # the square input side
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    resize_mode: Literal["shortest", "squash"] = "shortest"  # short side to size, or both sides
    crop_offset: Literal["floor", "round"] = "floor"  # HF centre_crop floors; torchvision rounds

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"image size must be >= 1, got {self.size}")
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"interpolation must be bicubic or bilinear, got {self.interpolation}")
        if self.resize_mode not in ("shortest", "squash"):
            raise ValueError(f"resize_mode must be shortest or squash, got {self.resize_mode}")
        if self.crop_offset not in ("floor", "round"):
            raise ValueError(f"crop_offset must be floor or round, got {self.crop_offset}")

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) after the resize: the short side to ``size``, the long one scaled and
        truncated (``int(size * long / short)``, as transformers and torchvision compute it)."""
        if self.resize_mode == "squash":
            return self.size, self.size
        short, long = min(height, width), max(height, width)
        new_long = int(self.size * long / short)
        return (self.size, new_long) if height <= width else (new_long, self.size)

    def _offset(self, length: int) -> int:
        margin = length - self.size
        return margin // 2 if self.crop_offset == "floor" else int(round(margin / 2.0))

    def __call__(self, frames: np.ndarray, device="cpu"):
        """uint8 (N, H, W, 3) -> float32 (N, 3, size, size) on ``device``."""
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(np.ascontiguousarray(frames)).to(device)
        x = x.permute(0, 3, 1, 2).to(torch.float32)
        height, width = x.shape[-2:]
        target = self.resized_shape(height, width)
        # PIL's resample: a horizontal pass, then a vertical one, each to uint8 (a pass is
        # skipped where that side keeps its length). Antialiased bicubic in torch is PIL's
        # filter (a = -0.5, support scaled when shrinking), so this gives PIL's pixels.
        for size in ((height, target[1]), target):
            if size != tuple(x.shape[-2:]):
                x = (
                    F.interpolate(
                        x, size=size, mode=self.interpolation, align_corners=False, antialias=True
                    )
                    .clamp_(0, 255)
                    .round_()
                )
        top, left = self._offset(target[0]), self._offset(target[1])
        x = x[..., top : top + self.size, left : left + self.size]
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        return (x * (1.0 / 255.0) - mean) / std


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"a scorer name is a metric suffix ([a-z0-9_]+), got {name!r}")
    return name


class _TorchScorer:
    """The shared part of the CLIP scorers: batching, no-grad, normalisation to numpy."""

    name: str
    sha256: str

    def __init__(
        self,
        *,
        preprocess: Preprocess,
        encode_image: Callable,
        encode_text: Callable,
        device,
        batch_size: int,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.preprocess = preprocess
        self.device = device
        self.batch_size = batch_size
        self._encode_image = encode_image
        self._encode_text = encode_text

    @staticmethod
    def _normalised(features) -> np.ndarray:
        import torch

        features = features.to(torch.float32)
        return torch.nn.functional.normalize(features, dim=-1).cpu().numpy()

    def embed_video(self, video: np.ndarray) -> np.ndarray:
        import torch

        video = check_video(video)
        out = []
        with torch.inference_mode():
            for start in range(0, len(video), self.batch_size):
                pixels = self.preprocess(video[start : start + self.batch_size], self.device)
                out.append(self._normalised(self._encode_image(pixels)))
        return np.concatenate(out)

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        texts = _check_texts(texts)
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                out.append(
                    self._normalised(self._encode_text(texts[start : start + self.batch_size]))
                )
        return np.concatenate(out)


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("embed_text takes a sequence of strings, not one string")
    texts = list(texts)
    if not texts:
        raise ValueError("embed_text got no texts")
    wrong = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if wrong:
        raise TypeError(f"texts must be strings, got {wrong[0]}")
    return texts


# --------------------------------------------------------------------------- Hugging Face CLIP


_HF_MODEL_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
_HF_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
_HF_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL.Image.Resampling values in the config


class HFClipScorer(_TorchScorer):
    """CLIP from a local Hugging Face directory (``transformers.CLIPModel`` + its tokenizer)."""

    def __init__(
        self,
        model,
        tokenizer,
        preprocess: Preprocess,
        *,
        sha256: str,
        name: str = "hfclip",
        device="cpu",
        batch_size: int = 64,
    ):
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.name = _check_name(name)
        self.sha256 = sha256
        self.max_length = int(model.config.text_config.max_position_embeddings)
        super().__init__(
            preprocess=preprocess,
            encode_image=self._image_features,
            encode_text=self._text_features,
            device=device,
            batch_size=batch_size,
        )

    @staticmethod
    def _pooled(output):
        # transformers >= 5 returns BaseModelOutputWithPooling (the projection in pooler_output);
        # older versions return the projected tensor itself.
        return output if hasattr(output, "ndim") else output.pooler_output

    def _image_features(self, pixels):
        return self._pooled(self.model.get_image_features(pixel_values=pixels))

    def _text_features(self, texts: list[str]):
        tokens = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return self._pooled(
            self.model.get_text_features(
                input_ids=tokens["input_ids"].to(self.device),
                attention_mask=tokens["attention_mask"].to(self.device),
            )
        )

    @classmethod
    def from_dir(
        cls,
        path: str | Path,
        device="cpu",
        batch_size: int = 64,
        *,
        name: str = "hfclip",
    ) -> HFClipScorer:
        """Load ``path`` (``config.json``, weights, tokenizer files, optionally
        ``preprocessor_config.json`` for mean/std/resample); nothing is downloaded."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"no Hugging Face CLIP directory at {path}")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} has no config.json: not a Hugging Face model directory"
            )
        if not any((path / f).is_file() for f in _HF_MODEL_FILES):
            raise FileNotFoundError(
                f"{path} has no CLIP weights (looked for {', '.join(_HF_MODEL_FILES)})"
            )
        if not any(all((path / f).is_file() for f in group) for group in _HF_TOKENIZER_FILES):
            raise FileNotFoundError(
                f"{path} has no tokenizer files (tokenizer.json, or vocab.json + merges.txt)"
            )
        import torch
        from transformers import AutoTokenizer, CLIPModel

        model = CLIPModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        preprocess = _hf_preprocess(path, int(model.config.vision_config.image_size))
        return cls(
            model,
            tokenizer,
            preprocess,
            sha256=weights_sha256(path),
            name=name,
            device=device,
            batch_size=batch_size,
        )


def _hf_preprocess(path: Path, image_size: int) -> Preprocess:
    """Mean/std, resample and resize mode from ``preprocessor_config.json`` when present, else
    OpenAI's; the size is always the model's ``image_size``."""
    config_file = path / "preprocessor_config.json"
    if not config_file.is_file():
        return Preprocess(image_size, crop_offset="floor")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON: {e}") from e
    resample = config.get("resample", 3)
    if resample not in _HF_RESAMPLE:
        raise ValueError(
            f"{config_file}: resample {resample} is not supported (2 bilinear, 3 bicubic)"
        )

    def triple(key: str, default: tuple[float, float, float]) -> tuple[float, float, float]:
        value = config.get(key, default)
        if value is None:
            return default
        value = tuple(float(v) for v in (value if isinstance(value, list) else [value] * 3))
        if len(value) != 3:
            raise ValueError(f"{config_file}: {key} must have 3 values, got {value}")
        return value

    size = config.get("size")
    # {"height", "width"} (no shortest_edge): the processor resizes both sides, no aspect kept
    squash = isinstance(size, dict) and "height" in size and "shortest_edge" not in size
    return Preprocess(
        image_size,
        mean=triple("image_mean", OPENAI_CLIP_MEAN),
        std=triple("image_std", OPENAI_CLIP_STD),
        interpolation=_HF_RESAMPLE[resample],
        resize_mode="squash" if squash else "shortest",
        crop_offset="floor",
    )


# --------------------------------------------------------------------------- open_clip


def _import_open_clip():
    """``import open_clip``, explaining the usual failure: it imports torchvision."""
    try:
        import open_clip
    except ImportError as e:
        if e.name == "torchvision" or "torchvision" in str(e):
            raise ImportError(
                "open_clip needs torchvision, which it imports at module level; torchvision is "
                "not installed here (it is on GPU deployments). HFClipScorer.from_dir loads a "
                "Hugging Face CLIP directory without it."
            ) from e
        raise ImportError(
            f"open_clip (the open-clip-torch package) could not be imported: {e}"
        ) from e
    return open_clip


class OpenClipScorer(_TorchScorer):
    """CLIP from an open_clip weights file and model name."""

    def __init__(
        self,
        model,
        tokenizer,
        preprocess: Preprocess,
        *,
        sha256: str,
        name: str = "openclip",
        device="cpu",
        batch_size: int = 64,
    ):
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.name = _check_name(name)
        self.sha256 = sha256
        super().__init__(
            preprocess=preprocess,
            encode_image=self.model.encode_image,
            encode_text=lambda texts: self.model.encode_text(self.tokenizer(texts).to(device)),
            device=device,
            batch_size=batch_size,
        )

    @classmethod
    def from_file(
        cls,
        weights_path: str | Path,
        model_name: str,
        device="cpu",
        batch_size: int = 64,
        *,
        name: str = "openclip",
        config_path: str | Path | None = None,
    ) -> OpenClipScorer:
        """``open_clip.create_model(model_name, pretrained=weights_path)`` and
        ``open_clip.get_tokenizer(model_name)``; ``config_path`` (a model-config JSON or a
        folder of them) is registered with ``open_clip.add_model_config`` first. Only a local
        file is accepted as weights, never a pretrained tag, so nothing is downloaded (a model
        whose tokenizer is a Hugging Face one needs that tokenizer in the local HF cache)."""
        weights_path = Path(weights_path)
        if not weights_path.is_file():
            raise FileNotFoundError(f"no open_clip weights file at {weights_path}")
        if model_name.startswith(("hf-hub:", "local-dir:")):
            raise ValueError(
                f"model_name {model_name!r}: give a built-in or registered open_clip model name; "
                "the weights come from weights_path"
            )
        open_clip = _import_open_clip()
        if config_path is not None:
            config_path = Path(config_path)
            if not config_path.exists():
                raise FileNotFoundError(f"no open_clip model config at {config_path}")
            open_clip.add_model_config(config_path)
        if open_clip.get_model_config(model_name) is None:
            raise ValueError(
                f"open_clip has no model config {model_name!r} (pass config_path= for a custom one)"
            )
        model = open_clip.create_model(
            model_name, pretrained=str(weights_path), device=device, require_pretrained=True
        )
        tokenizer = open_clip.get_tokenizer(model_name)
        return cls(
            model,
            tokenizer,
            _open_clip_preprocess(model, model_name),
            sha256=weights_sha256(weights_path),
            name=name,
            device=device,
            batch_size=batch_size,
        )


def _open_clip_preprocess(model, model_name: str) -> Preprocess:
    visual = getattr(model, "visual", model)
    cfg = dict(getattr(visual, "preprocess_cfg", None) or {})
    size = cfg.get("size", getattr(visual, "image_size", None))
    if isinstance(size, list | tuple):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"{model_name}: only square inputs are supported, got size {size}")
        size = size[0]
    if size is None:
        raise ValueError(f"{model_name}: the model states no image size")
    resize_mode = cfg.get("resize_mode", "shortest")
    if resize_mode not in ("shortest", "squash"):
        raise ValueError(
            f"{model_name}: resize_mode {resize_mode!r} is not supported (shortest, squash)"
        )
    interpolation = cfg.get("interpolation", "bicubic")
    return Preprocess(
        int(size),
        mean=tuple(float(v) for v in cfg.get("mean", OPENAI_CLIP_MEAN)),
        std=tuple(float(v) for v in cfg.get("std", OPENAI_CLIP_STD)),
        interpolation="bilinear" if interpolation == "bilinear" else "bicubic",
        resize_mode=resize_mode,
        crop_offset="round",  # torchvision's CenterCrop
    )


# --------------------------------------------------------------------------- the score


@dataclass(frozen=True)
class ClipScoreResult:
    """A CLIP score in each convention, with what it was computed from.

    ``per_sample`` holds each video's frame-averaged cosine, ``frames`` its number of embeddings
    (frames for CLIP, 1 for clip-level scorers).
    """

    cosine: float  # headline: frame-weighted mean raw cosine
    hessel: float  # mean over videos of 2.5 * max(video's frame-averaged cosine, 0)
    torchmetrics: float  # max(100 * cosine, 0): torchmetrics' mean over pairs, clamped after
    low: float  # percentile bootstrap interval of ``cosine`` (videos resampled)
    high: float
    confidence: float
    resamples: int
    seed: int
    per_sample: tuple[float, ...]
    frames: tuple[int, ...]
    n_samples: int
    n_frames: int
    scorer: str
    sha256: str

    @property
    def per_sample_hessel(self) -> tuple[float, ...]:
        return tuple(HESSEL_WEIGHT * max(c, 0.0) for c in self.per_sample)

    def as_metrics(self) -> dict[str, float]:
        """``clip_score_<scorer>`` (the frame-weighted raw cosine) and its interval, the
        Hessel and torchmetrics conventions, and the counts."""
        key = f"clip_score_{self.scorer}"
        return {
            key: self.cosine,
            f"{key}_low": self.low,
            f"{key}_high": self.high,
            f"{key}_hessel": self.hessel,
            f"{key}_torchmetrics": self.torchmetrics,
            f"{key}_n_samples": float(self.n_samples),
            f"{key}_n_frames": float(self.n_frames),
        }

    def as_tags(self) -> dict[str, str]:
        """The weights' identity, for a run's tags/params."""
        return {f"clip_score_{self.scorer}_sha256": self.sha256}


def _checked_embeddings(array, what: str, scorer: str, rows: int | None = None) -> np.ndarray:
    x = np.asarray(array, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"scorer {scorer!r}: {what} must be (K, D) with K, D >= 1, got {x.shape}")
    if rows is not None and x.shape[0] != rows:
        raise ValueError(f"scorer {scorer!r}: {what} has {x.shape[0]} rows, expected {rows}")
    if not np.isfinite(x).all():
        raise ValueError(f"scorer {scorer!r}: {what} contain NaN or inf")
    norms = np.linalg.norm(x, axis=1)
    if np.abs(norms - 1.0).max() > _NORM_TOLERANCE:
        raise ValueError(
            f"scorer {scorer!r}: {what} are not L2-normalised (norms {norms.min():.4g}..{norms.max():.4g})"
        )
    return x / norms[:, None]  # exact unit length in float64


def clip_score(
    scorer: VideoTextScorer,
    videos: Sequence[np.ndarray],
    prompts: Sequence[str],
    *,
    resamples: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> ClipScoreResult:
    """The CLIP score of ``videos[i]`` (uint8 (T, H, W, 3)) against ``prompts[i]``.

    Each distinct prompt is embedded once. See the module docstring for the conventions; the
    interval comes from ``resamples`` bootstrap resamples of the videos (seeded by ``seed``).
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, one per video, not one string")
    videos, prompts = list(videos), list(prompts)
    if len(videos) != len(prompts):
        raise ValueError(f"got {len(videos)} videos but {len(prompts)} prompts: one prompt each")
    if not videos:
        raise ValueError("clip_score got no videos (and no prompts)")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 0:
        raise ValueError(f"resamples must be >= 0, got {resamples}")
    name = getattr(scorer, "name", "?")
    distinct = list(dict.fromkeys(_check_texts(prompts)))
    text = _checked_embeddings(
        scorer.embed_text(distinct), "text embeddings", name, rows=len(distinct)
    )
    row = {prompt: i for i, prompt in enumerate(distinct)}

    sums, counts = np.empty(len(videos)), np.empty(len(videos), dtype=np.int64)
    for i, (video, prompt) in enumerate(zip(videos, prompts, strict=True)):
        emb = _checked_embeddings(scorer.embed_video(check_video(video)), "video embeddings", name)
        if emb.shape[1] != text.shape[1]:
            raise ValueError(
                f"scorer {name!r}: video embeddings have dimension {emb.shape[1]}, "
                f"text embeddings {text.shape[1]}"
            )
        cosines = emb @ text[row[prompt]]
        sums[i], counts[i] = cosines.sum(), len(cosines)

    per_sample = sums / counts
    cosine = float(sums.sum() / counts.sum())
    rng = np.random.default_rng(seed)
    if resamples:
        idx = rng.integers(0, len(videos), size=(resamples, len(videos)))
        draws = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
        tail = (1 - confidence) / 2 * 100
        low, high = (float(v) for v in np.percentile(draws, [tail, 100 - tail]))
    else:
        low = high = cosine
    return ClipScoreResult(
        cosine=cosine,
        hessel=float(np.mean(HESSEL_WEIGHT * np.maximum(per_sample, 0.0))),
        torchmetrics=max(100.0 * cosine, 0.0),
        low=low,
        high=high,
        confidence=confidence,
        resamples=resamples,
        seed=seed,
        per_sample=tuple(float(v) for v in per_sample),
        frames=tuple(int(c) for c in counts),
        n_samples=len(videos),
        n_frames=int(counts.sum()),
        scorer=name,
        sha256=getattr(scorer, "sha256", ""),
    )


__all__ = [
    "HESSEL_WEIGHT",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "ClipScoreResult",
    "HFClipScorer",
    "OpenClipScorer",
    "Preprocess",
    "VideoTextScorer",
    "check_video",
    "clip_score",
    "weights_sha256",
]
