"""The in-domain evaluator as the metrics see it: ``fvd_domain`` and ``clip_score_domain``.

:class:`DomainScorer` wraps a trained :class:`~model.evaluator.VideoTextModel` and the frozen text
encoder it was trained with (anything with ``encode(texts) -> (states (M, L, E), mask (M, L))``,
as ``model.text`` returns) and implements both protocols the metrics are written against:

- **video features** (``evaluation.fvd``): ``name``, ``sha256``, ``num_frames`` and
  ``features(videos) -> (N, D)``. The features are the model's FVD features
  (:meth:`~model.evaluator.VideoTextModel.video_features`): the *pre-projection* features, not
  the joint embedding, plus first-layer detail statistics (spatial and temporal high-pass
  energy), each block scaled by its spread on training clips. Not the embedding: the projection
  is trained only to agree with captions and is normalised onto a sphere, so it keeps least of
  what no caption names (noise, blur, flicker, frame order); the layer before it keeps more, as
  I3D's pre-softmax layer serves the usual FVD. But contrastive training leaves even that layer
  nearly blind to image quality on the demo corpus, hence the detail blocks (the
  train_evaluator step measures all three choices, ``feature_layer`` = ``features``,
  ``semantic`` or ``embedding``, on every run and reports them).
- **video-text scorer** (``evaluation.clip_score``): ``name``, ``sha256``, ``embed_video(video)
  -> (1, D)`` (a clip-level model: one embedding per clip, K = 1) and ``embed_text(texts) ->
  (M, D)``, both L2-normalised, so their dot product is the cosine similarity.

Videos are uint8 (T, H, W, 3) arrays, RGB, any length and size (the model resizes them so the
short side is its working size); a clip longer than ``max_frames`` is scored on its first
``max_frames`` frames, so ``num_frames`` is 0 (any length). Everything runs under
``torch.no_grad`` in float32 on the scorer's device. Imports only ``model``, numpy and torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from model.evaluator import VideoTextModel

FEATURE_LAYERS = ("features", "semantic", "embedding")


def to_tensor(video: np.ndarray, max_frames: int = 0) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> (3, T', H, W) float32 in [-1, 1]; the first ``max_frames`` frames
    (0 = all). A single (H, W, 3) frame is read as a one-frame clip."""
    array = np.asarray(video)
    if array.ndim == 3:
        array = array[None]
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3 or not array.shape[0]:
        raise ValueError(
            f"videos must be uint8 (T, H, W, 3) RGB arrays with T >= 1, got {array.dtype} "
            f"{array.shape}"
        )
    if max_frames > 0:
        array = array[:max_frames]
    x = torch.from_numpy(np.ascontiguousarray(array)).float().div(127.5).sub(1.0)
    return x.permute(3, 0, 1, 2)  # (3, T, H, W)


class DomainScorer:
    """A trained video-text model as an FVD feature extractor and a CLIP-score scorer.

    Args:
        model: the trained :class:`VideoTextModel` (moved to ``device``, put in eval mode).
        text_encoder: the frozen text encoder it was trained with (``encode(texts)``).
        sha256: hex digest of the model's weights file (names the extractor in reports).
        max_frames: frames read from a clip (its first ones); 0 = all.
        batch_size: clips per forward pass (clips of one shape are batched together).
        feature_layer: what :meth:`features` returns: ``"features"`` (the FVD features, the
            default), ``"semantic"`` (the pre-projection features alone) or ``"embedding"``
            (the normalised joint embedding).
    """

    name = "domain"
    num_frames = 0  # any length: the model pools over time

    def __init__(
        self,
        model: VideoTextModel,
        text_encoder: Any,
        sha256: str,
        *,
        max_frames: int = 16,
        batch_size: int = 16,
        feature_layer: str = "features",
        device: Any = None,
    ):
        if feature_layer not in FEATURE_LAYERS:
            raise ValueError(
                f"feature_layer must be one of {FEATURE_LAYERS}, got {feature_layer!r}"
            )
        if max_frames < 0 or batch_size < 1:
            raise ValueError(
                f"need max_frames >= 0 and batch_size >= 1, got {max_frames}, {batch_size}"
            )
        encoder_dim = getattr(text_encoder, "dim", model.config.text_dim)
        if encoder_dim != model.config.text_dim:
            raise ValueError(
                f"the text encoder gives {encoder_dim}-wide tokens but the evaluator's text tower "
                f"takes {model.config.text_dim} (trained with {model.config.text_encoder!r})"
            )
        self.device = (
            torch.device(device) if device is not None else next(model.parameters()).device
        )
        self.model = model.to(self.device).eval()
        self.text_encoder = text_encoder
        self.sha256 = sha256
        self.max_frames = max_frames
        self.batch_size = batch_size
        self.feature_layer = feature_layer

    @property
    def dim(self) -> int:
        """Width of :meth:`features`."""
        config = self.model.config
        return {
            "features": config.fvd_dim,
            "semantic": config.feature_dim,
            "embedding": config.embed_dim,
        }[self.feature_layer]

    @property
    def embed_dim(self) -> int:
        """Width of :meth:`embed_video` / :meth:`embed_text`."""
        return self.model.config.embed_dim

    def _run(self, videos: Sequence[np.ndarray], fn: Any) -> np.ndarray:
        clips = [to_tensor(v, self.max_frames) for v in videos]
        if not clips:
            raise ValueError("no videos given")
        # Batches of one shape, in a stable order; results go back to the input order.
        order = sorted(range(len(clips)), key=lambda i: tuple(clips[i].shape))
        out: list[np.ndarray | None] = [None] * len(clips)
        with torch.no_grad():
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                rows = fn([clips[i].to(self.device) for i in idx]).float().cpu().numpy()
                for j, i in enumerate(idx):
                    out[i] = rows[j]
        return np.stack(out)

    # --------------------------------------------------------------------------- FVD protocol

    def features(self, videos: Sequence[np.ndarray]) -> np.ndarray:
        """(N, dim) float64 features of N uint8 clips (T, H, W, 3)."""
        fn = {
            "features": self.model.video_features,
            "semantic": self.model.semantic_features,
            "embedding": self.model.encode_video,
        }[self.feature_layer]
        return self._run(videos, fn).astype(np.float64)

    # --------------------------------------------------------------------------- CLIP-score protocol

    def embed_videos(self, videos: Sequence[np.ndarray]) -> np.ndarray:
        """(N, embed_dim) float32 L2-normalised embeddings of N clips (batched)."""
        return self._run(videos, self.model.encode_video).astype(np.float32)

    def embed_video(self, video: np.ndarray) -> np.ndarray:
        """(1, embed_dim) L2-normalised embedding of one clip (one per clip: K = 1)."""
        return self.embed_videos([video])

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """(M, embed_dim) float32 L2-normalised embeddings of M texts."""
        if isinstance(texts, str):
            raise TypeError("embed_text takes a list of texts, not one string; wrap it")
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.embed_dim), np.float32)
        with torch.no_grad():
            states, mask = self.text_encoder.encode(texts)  # (M, L, E), (M, L)
            z = self.model.encode_text(states.to(self.device).float(), mask.to(self.device))
        return z.float().cpu().numpy()

    def similarity(self, video: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        """(M,) cosine similarities of one clip with each text."""
        return (self.embed_text(texts) @ self.embed_video(video).T)[:, 0]

    def __repr__(self) -> str:
        return (
            f"DomainScorer(sha256={self.sha256[:12]}…, features={self.feature_layer} "
            f"({self.dim}), embed={self.embed_dim}, max_frames={self.max_frames})"
        )
