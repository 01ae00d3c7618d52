"""Text -> video sampling and SDEdit editing: VAE + DiT + text encoder + flow matching.

A request is a prompt and a size ``(frames, height, width)``; :func:`video_size` turns an aspect
ratio into a valid size. :class:`VideoGenerator` encodes the prompts once, draws the initial noise,
integrates the flow ODE over the *packed* patch tokens of every clip (patch n' pack: a 16:9 video,
a 9:16 video and a still can share one sampling batch, attention never crossing clips), then
denormalises and decodes each clip at its own size.

**Noise.** Clip ``i`` of a call with ``seed`` starts from ``torch.randn`` of its latent shape
``(C, t, h, w)`` drawn from ``torch.Generator().manual_seed(seed + i)`` on the CPU (then moved to
the device). A clip's noise therefore depends only on its own seed and size — not on the device,
nor on what else is in the batch — so :meth:`VideoGenerator.generate_many` equals one
:meth:`~VideoGenerator.generate` per request up to float rounding, and an edit at strength 1
equals :meth:`~VideoGenerator.generate` with the same seed exactly.

**Guidance.** Conditional and null rows run in one packed forward inside
:class:`~model.diffusion.FlowMatching`; the text keys/values of every DiT block are computed once
per sampling call (``DiT.encode_text``), not per step. The null row is the "no text" condition
(all-False mask) the DiT was trained with, or a negative prompt.

**Sizes.** Valid sizes have ``frames = 1 + tf * k`` (``tf`` = the VAE's temporal factor) and
height / width multiples of ``s * p`` (VAE spatial factor times the DiT patch), so every latent
token is real; :meth:`VideoGenerator.edit` takes any size (replicate-pad, crop back).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import CONFIG_NAME, WEIGHTS_NAME
from model.diffusion import SAMPLERS, FlowConfig, FlowMatching
from model.dit import DiT
from model.patches import clip_tokens, pack_grids, patchify, plan_packs, unpack_grids
from model.vae import CausalVAE

FLOW_CONFIG_NAME = "flow.json"  # the FlowConfig a DiT was trained with, next to its weights
MODEL_FILES = (CONFIG_NAME, WEIGHTS_NAME)

# Named aspect ratios (width : height). "image" is a square still: one frame.
ASPECTS: dict[str, tuple[int, int]] = {
    "16:9": (16, 9),
    "9:16": (9, 16),
    "1:1": (1, 1),
    "21:9": (21, 9),
    "4:3": (4, 3),
    "image": (1, 1),
}
REQUEST_KEYS = ("prompt", "frames", "height", "width", "seed", "negative")


class TextEncoderLike(Protocol):
    """What the generator needs from ``model.text``: ``.dim`` and ``.encode(list[str])``."""

    dim: int

    def encode(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]: ...


# --------------------------------------------------------------------------- sizes


def parse_aspect(aspect: str) -> tuple[int, int]:
    """``"16:9"`` -> (16, 9); a name of :data:`ASPECTS` or any ``"W:H"`` of positive ints."""
    if aspect in ASPECTS:
        return ASPECTS[aspect]
    w, sep, h = str(aspect).partition(":")
    if sep and w.strip().isdigit() and h.strip().isdigit() and int(w) > 0 and int(h) > 0:
        return int(w), int(h)
    raise ValueError(f"unknown aspect {aspect!r}; use one of {sorted(ASPECTS)} or 'W:H'")


def video_size(
    aspect: str, frames: int, max_pixels: int, multiple: int, *, temporal_factor: int = 4
) -> tuple[int, int, int]:
    """A valid ``(frames, height, width)`` for an aspect ratio under a pixel budget.

    Args:
        aspect: ``"16:9"``, ``"9:16"``, ``"1:1"``, ``"21:9"``, ``"4:3"``, any ``"W:H"``, or
            ``"image"`` (a square still; ``frames`` is ignored and becomes 1).
        frames: wanted frame count, **rounded up** to the next ``1 + temporal_factor * k``
            (the causal VAE's valid lengths), so at least ``frames`` frames are generated.
        max_pixels: upper bound on ``height * width``.
        multiple: height and width are multiples of this (VAE spatial factor * DiT patch).
        temporal_factor: the VAE's temporal compression.

    Height and width are the exact-aspect size with area ``max_pixels``, each rounded *down* to
    a multiple of ``multiple``: the area never exceeds the budget and the aspect stays close.
    """
    w_ratio, h_ratio = parse_aspect(aspect)
    if aspect == "image":
        frames = 1
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if multiple < 1 or temporal_factor < 1:
        raise ValueError(
            f"multiple and temporal_factor must be >= 1, got {multiple}, {temporal_factor}"
        )
    frames = 1 + temporal_factor * math.ceil((frames - 1) / temporal_factor)
    height = multiple * math.floor(math.sqrt(max_pixels * h_ratio / w_ratio) / multiple)
    width = multiple * math.floor(math.sqrt(max_pixels * w_ratio / h_ratio) / multiple)
    if height < multiple or width < multiple:
        raise ValueError(
            f"max_pixels={max_pixels} is too small for aspect {aspect} at multiples of {multiple} "
            f"(the short side would be below {multiple}); raise max_pixels"
        )
    return frames, height, width


# --------------------------------------------------------------------------- model files


def check_pretrained(vae_dir: str | Path, dit_dir: str | Path) -> None:
    """Raise FileNotFoundError naming the first missing model file and the step that writes it."""
    _require_files(
        Path(vae_dir), MODEL_FILES, "VAE", "the train_vae step (CausalVAE.save_pretrained)"
    )
    _require_files(Path(dit_dir), MODEL_FILES, "DiT", "the train_dit step (DiT.save_pretrained)")
    _require_files(
        Path(dit_dir),
        (FLOW_CONFIG_NAME,),
        "DiT's flow schedule",
        "the train_dit step (the FlowConfig it trained with, as JSON)",
    )


def _require_files(directory: Path, names: Sequence[str], what: str, producer: str) -> None:
    if not directory.is_dir():
        raise FileNotFoundError(
            f"{what} directory {directory} does not exist; it is written by {producer}"
        )
    for name in names:
        if not (directory / name).is_file():
            raise FileNotFoundError(
                f"{directory / name} is missing: the {what} needs {', '.join(names)} in "
                f"{directory}, written by {producer}"
            )


# --------------------------------------------------------------------------- the generator


@dataclass(frozen=True)
class _Clip:
    """One clip to sample; ``noise`` (C, t, h, w) overrides the seeded draw."""

    prompt: str
    frames: int
    height: int
    width: int
    seed: int
    negative: str | None = None
    noise: Tensor | None = None


class VideoGenerator:
    """Text -> video with a trained VAE, DiT and text encoder (see the module docstring).

    Args:
        vae, dit: trained models; ``dit.config.in_channels`` must equal the VAE's latent channels.
        text_encoder: ``model.text`` encoder (or anything with ``.dim`` and ``.encode``) — the one
            the DiT was trained with.
        flow: the flow-matching schedule the DiT was trained with (prediction, shift).
        device: where sampling runs; models are moved there.
        max_frames, max_pixels: limits that requests are checked against (``None`` = no limit).
        vae_chunk_latent_frames: decode/encode in causal chunks of this many latent frames
            (exact, bounds memory on long clips).
    """

    def __init__(
        self,
        vae: CausalVAE,
        dit: DiT,
        text_encoder: TextEncoderLike,
        flow: FlowMatching,
        *,
        device: str | torch.device = "cpu",
        max_frames: int | None = None,
        max_pixels: int | None = None,
        vae_chunk_latent_frames: int | None = None,
    ):
        if vae.config.latent_channels != dit.config.in_channels:
            raise ValueError(
                f"the VAE has {vae.config.latent_channels} latent channels but the DiT expects "
                f"in_channels={dit.config.in_channels}; use the VAE the DiT was trained on"
            )
        if dit.config.output_channels != dit.config.in_channels:
            raise ValueError(
                f"the DiT predicts {dit.config.output_channels} channels for "
                f"{dit.config.in_channels} input channels; sampling needs them equal"
            )
        if int(text_encoder.dim) != dit.config.text_dim:
            raise ValueError(
                f"the text encoder gives {text_encoder.dim}-dim states but the DiT was trained "
                f"with text_dim={dit.config.text_dim}; load the encoder it was trained with"
            )
        self.device = torch.device(device)
        self.vae = vae.to(self.device).eval()
        self.dit = dit.to(self.device).eval()
        if isinstance(text_encoder, nn.Module):
            text_encoder = text_encoder.to(self.device)
        self.text_encoder = text_encoder
        self.flow = flow
        self.max_frames = max_frames
        self.max_pixels = max_pixels
        self.vae_chunk_latent_frames = vae_chunk_latent_frames

    @classmethod
    def from_pretrained(
        cls,
        vae_dir: str | Path,
        dit_dir: str | Path,
        text_encoder: TextEncoderLike,
        device: str | torch.device = "cpu",
        **kwargs: Any,
    ) -> VideoGenerator:
        """Load ``vae_dir`` (CausalVAE.save_pretrained) and ``dit_dir`` (DiT.save_pretrained plus
        ``flow.json``); ``kwargs`` go to the constructor (``max_frames``, ``max_pixels``, ...)."""
        vae_dir, dit_dir = Path(vae_dir), Path(dit_dir)
        check_pretrained(vae_dir, dit_dir)
        device = torch.device(device)
        vae = CausalVAE.from_pretrained(vae_dir, device=device)
        dit_config = json.loads((dit_dir / CONFIG_NAME).read_text())
        overrides = {}
        if dit_config.get("attention_backend") == "flex" and device.type != "cuda":
            overrides["attention_backend"] = "sdpa_segments"  # flex is CUDA-only
        dit = DiT.from_pretrained(dit_dir, device=device, **overrides)
        flow = FlowMatching(FlowConfig.from_json(dit_dir / FLOW_CONFIG_NAME))
        return cls(vae, dit, text_encoder, flow, device=device, **kwargs)

    # --------------------------------------------------------------------------- sizes

    @property
    def size_multiples(self) -> tuple[int, int]:
        """Height and width must be multiples of these: VAE spatial factor * DiT patch h, w."""
        _, ph, pw = self.dit.config.patch_size
        return self.vae.spatial_factor * ph, self.vae.spatial_factor * pw

    @property
    def size_multiple(self) -> int:
        """One multiple for both sides (what :func:`video_size` takes)."""
        return math.lcm(*self.size_multiples)

    def video_size(self, aspect: str, frames: int) -> tuple[int, int, int]:
        """:func:`video_size` with this model's multiples and ``max_pixels`` (required)."""
        if self.max_pixels is None:
            raise ValueError("video_size needs max_pixels; pass it to the VideoGenerator")
        return video_size(
            aspect,
            frames,
            self.max_pixels,
            self.size_multiple,
            temporal_factor=self.vae.temporal_factor,
        )

    def check_size(self, frames: int, height: int, width: int) -> None:
        """Raise a ValueError saying what to change if (frames, height, width) is not valid."""
        tf = self.vae.temporal_factor
        pt = self.dit.config.patch_size[0]
        mh, mw = self.size_multiples
        problems = []
        if frames < 1 or (frames - 1) % tf:
            up = 1 + tf * math.ceil(max(frames - 1, 0) / tf)
            problems.append(f"frames={frames} is not 1 + {tf}k (try {up})")
        elif (1 + (frames - 1) // tf) % pt:
            problems.append(
                f"frames={frames} gives {1 + (frames - 1) // tf} latent frames, not "
                f"a multiple of the DiT's temporal patch {pt}"
            )
        if height < mh or height % mh:
            problems.append(f"height={height} is not a positive multiple of {mh}")
        if width < mw or width % mw:
            problems.append(f"width={width} is not a positive multiple of {mw}")
        if self.max_frames is not None and frames > self.max_frames:
            problems.append(f"frames={frames} exceeds max_frames={self.max_frames}")
        if self.max_pixels is not None and height * width > self.max_pixels:
            problems.append(
                f"{height}x{width}={height * width} pixels exceeds max_pixels={self.max_pixels}"
            )
        if problems:
            raise ValueError(
                f"invalid size (frames, height, width)={(frames, height, width)}: "
                f"{'; '.join(problems)}. video_size(aspect, frames, max_pixels, "
                f"{self.size_multiple}) gives a valid one"
            )

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, t, h, w) of a valid clip."""
        t, h, w = self.vae.latent_size(frames, height, width)
        return self.vae.config.latent_channels, t, h, w

    # --------------------------------------------------------------------------- text and noise

    def _encode_text(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        states, mask = self.text_encoder.encode(list(prompts))  # (B, L, Dt), (B, L)
        return states.to(self.device, torch.float32), mask.to(self.device).bool()

    def _null_text(self, negatives: Sequence[str | None]) -> tuple[Tensor | None, Tensor | None]:
        """Per-row null condition: the row's negative prompt, else no text (all-False mask)."""
        rows = [i for i, n in enumerate(negatives) if n is not None]
        if not rows:
            return None, None  # FlowMatching's default: zeros with an all-False mask
        states, mask = self._encode_text([negatives[i] for i in rows])  # (R, L, Dt)
        null = states.new_zeros(len(negatives), *states.shape[1:])  # (B, L, Dt)
        null_mask = mask.new_zeros(len(negatives), mask.shape[1])  # (B, L)
        null[rows], null_mask[rows] = states, mask
        return null, null_mask

    def noise(self, seed: int, frames: int, height: int, width: int) -> Tensor:
        """The initial latent noise (C, t, h, w) of a clip: seeded on the CPU, then moved."""
        return self._seeded_noise(seed, self.latent_shape(frames, height, width))

    def _seeded_noise(self, seed: int, shape: Sequence[int]) -> Tensor:
        generator = torch.Generator().manual_seed(int(seed))
        return torch.randn(tuple(shape), generator=generator).to(self.device)

    # --------------------------------------------------------------------------- sampling core

    def _decode(self, latents: Sequence[Tensor]) -> list[Tensor]:
        """Normalised latents (C, t, h, w) -> videos (3, T, H, W) in [-1, 1].

        One clip at a time: the decoder's activations dominate memory (far more than sampling's).
        """
        vae_dtype = next(self.vae.parameters()).dtype
        videos = []
        for z in latents:
            z = self.vae.denormalize_latent(z[None].to(vae_dtype))  # (1, C, t, h, w)
            video = self.vae.decode(z, chunk_latent_frames=self.vae_chunk_latent_frames)
            videos.append(video[0].float().clamp(-1.0, 1.0))  # (3, T, H, W)
        return videos

    def _sample_pack(
        self, clips: Sequence[_Clip], steps: int, guidance: float, sampler: str
    ) -> list[Tensor]:
        """Sample clips of any sizes in one packed batch -> normalised latents (C, t, h, w)."""
        patch = self.dit.config.patch_size
        dtype = next(self.dit.parameters()).dtype
        noises = [
            c.noise if c.noise is not None else self.noise(c.seed, c.frames, c.height, c.width)
            for c in clips
        ]
        pieces = [patchify(z.to(self.device, dtype), patch) for z in noises]  # (L_i, D) each
        grids = [tuple(n // p for n, p in zip(z.shape[1:], patch, strict=True)) for z in noises]
        coords, cu_seqlens = pack_grids(grids, device=self.device)
        text, text_mask = self._encode_text([c.prompt for c in clips])  # (B, L, Dt), (B, L)
        null, null_mask = self._null_text([c.negative for c in clips])
        tokens = self.flow.sample(
            self.dit,
            coords,
            cu_seqlens,
            text,
            text_mask,
            steps=steps,
            guidance=guidance,
            method=sampler,
            null_text=null,
            null_mask=null_mask,
            noise=torch.cat([tok for tok, _ in pieces]),
        )  # (N, D)
        return unpack_grids(tokens, grids, patch)

    @torch.no_grad()
    def _generate(
        self,
        clips: Sequence[_Clip],
        *,
        steps: int,
        guidance: float,
        sampler: str,
        token_budget: int | None = None,
    ) -> list[Tensor]:
        if not clips:
            raise ValueError("nothing to generate: no prompts / requests given")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler {sampler!r} is not one of {SAMPLERS}")
        for c in clips:
            if not isinstance(c.prompt, str):
                raise TypeError(f"prompts must be strings, got {type(c.prompt).__name__}")
            self.check_size(c.frames, c.height, c.width)
        patch = self.dit.config.patch_size
        lengths = [
            clip_tokens(self.latent_shape(c.frames, c.height, c.width), patch) for c in clips
        ]
        budget = max(token_budget or sum(lengths), max(lengths))  # a big clip gets its own pack
        latents: list[Tensor | None] = [None] * len(clips)
        for pack in plan_packs(lengths, budget):
            for i, z in zip(
                pack,
                self._sample_pack([clips[i] for i in pack], steps, guidance, sampler),
                strict=True,
            ):
                latents[i] = z
        return self._decode(latents)  # type: ignore[arg-type]

    # --------------------------------------------------------------------------- public API

    def generate(
        self,
        prompts: list[str],
        frames: int,
        height: int,
        width: int,
        *,
        steps: int = 30,
        guidance: float = 4.0,
        sampler: str = "euler",
        seed: int = 0,
        negative: list[str] | None = None,
    ) -> Tensor:
        """Generate one clip per prompt, all at (frames, height, width).

        Args:
            prompts: B strings.
            frames, height, width: a valid size (see :meth:`check_size` / :func:`video_size`).
            steps, guidance, sampler: ODE steps, CFG scale (1 = no guidance), "euler" | "heun".
            seed: prompt ``i`` uses noise seed ``seed + i``.
            negative: negative prompts for the guidance's null row: one for all, or one per prompt.

        Returns:
            (B, 3, frames, height, width) in [-1, 1].
        """
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings; wrap the single prompt in [...]")
        negatives = self._negatives(negative, len(prompts))
        clips = [
            _Clip(p, frames, height, width, seed + i, n)
            for i, (p, n) in enumerate(zip(prompts, negatives, strict=True))
        ]
        videos = self._generate(clips, steps=steps, guidance=guidance, sampler=sampler)
        return torch.stack(videos)

    def generate_many(
        self,
        requests: list[dict],
        *,
        steps: int = 30,
        guidance: float = 4.0,
        sampler: str = "euler",
        token_budget: int | None = None,
    ) -> list[Tensor]:
        """Generate clips of different sizes, packed into shared sampling batches.

        Args:
            requests: dicts with ``prompt``, ``frames``, ``height``, ``width`` and optionally
                ``seed`` (default 0) and ``negative``. Each result equals ``generate([prompt],
                frames, height, width, seed=seed, ...)`` up to float rounding.
            token_budget: max patch tokens per sampling batch (before CFG doubles it); ``None``
                packs everything into one batch. A clip larger than the budget runs alone.

        Returns:
            one (3, frames, height, width) tensor in [-1, 1] per request, in request order.
        """
        clips = []
        for i, req in enumerate(requests):
            unknown = sorted(set(req) - set(REQUEST_KEYS))
            missing = [k for k in ("prompt", "frames", "height", "width") if k not in req]
            if unknown or missing:
                raise ValueError(
                    f"request {i}: unknown keys {unknown}, missing keys {missing}; "
                    f"allowed keys are {list(REQUEST_KEYS)}"
                )
            clips.append(
                _Clip(
                    req["prompt"],
                    int(req["frames"]),
                    int(req["height"]),
                    int(req["width"]),
                    int(req.get("seed", 0)),
                    req.get("negative"),
                )
            )
        return self._generate(
            clips, steps=steps, guidance=guidance, sampler=sampler, token_budget=token_budget
        )

    def prototype_then_full(
        self, prompt: str, frames: int, height: int, width: int, *, scale: float = 0.5, **kw: Any
    ) -> tuple[Tensor, Tensor]:
        """A cheap low-resolution prototype, then the full-resolution clip, same model and seed.

        The full clip is exactly ``generate([prompt], frames, height, width, seed=seed)``. The
        prototype (``scale`` x the height and width, rounded to the size multiples; same frames)
        starts from *that same noise* area-pooled to its latent grid (``adaptive_avg_pool3d``),
        each cell multiplied by sqrt(its cell size) so the pooled noise is unit-variance again:
        the prototype previews the full clip's layout rather than an unrelated sample.

        ``kw``: ``steps``, ``guidance``, ``sampler``, ``seed``, ``negative`` as in :meth:`generate`.
        Returns (prototype (3, T, h, w), full (3, T, H, W)), both in [-1, 1].
        """
        if not 0.0 < scale <= 1.0:
            raise ValueError(f"scale must be in (0, 1], got {scale}")
        unknown = sorted(set(kw) - {"steps", "guidance", "sampler", "seed", "negative"})
        if unknown:
            raise TypeError(f"prototype_then_full got unexpected arguments {unknown}")
        seed = int(kw.pop("seed", 0))
        negative = kw.pop("negative", None)
        negative = self._negatives(negative, 1)[0]
        mh, mw = self.size_multiples
        low_h = max(mh, mh * math.floor(height * scale / mh + 0.5))  # half rounds up
        low_w = max(mw, mw * math.floor(width * scale / mw + 0.5))
        self.check_size(frames, height, width)
        full_noise = self.noise(seed, frames, height, width)  # (C, t, h, w)
        _, t, h, w = self.latent_shape(frames, low_h, low_w)
        low_noise = pooled_noise(full_noise, (t, h, w))  # (C, t, h', w')
        settings = {"steps": 30, "guidance": 4.0, "sampler": "euler", **kw}
        (prototype,) = self._generate(
            [_Clip(prompt, frames, low_h, low_w, seed, negative, noise=low_noise)], **settings
        )
        (full,) = self._generate(
            [_Clip(prompt, frames, height, width, seed, negative, noise=full_noise)], **settings
        )
        return prototype, full

    @torch.no_grad()
    def reconstruct(self, video: Tensor) -> Tensor:
        """VAE round trip (posterior mode) with :meth:`edit`'s padding: what strength 0 returns."""
        batched, video = self._as_batch(video)
        latent, size = self._encode_any(video)
        out = self._decode_any(latent, size)
        return out if batched else out[0]

    @torch.no_grad()
    def edit(
        self,
        video: Tensor,
        prompt: str,
        *,
        strength: float,
        steps: int = 30,
        guidance: float = 4.0,
        seed: int = 0,
        sampler: str = "euler",
        negative: str | None = None,
    ) -> Tensor:
        """SDEdit: re-generate ``video`` toward ``prompt``, keeping its layout where strength < 1.

        Args:
            video: (3, T, H, W) or (B, 3, T, H, W) in [-1, 1], any size (replicate-padded to a
                valid size for the VAE and patches, cropped back after decoding).
            prompt: the new prompt (the same for every clip of a batch).
            strength: in [0, 1]; the last ``round(strength * steps)`` steps of the shifted
                schedule are run from the input noised to that time (as FlowMatching.sdedit).
                0 returns :meth:`reconstruct` (the VAE round trip); 1 ignores the input and, at a
                valid size, equals ``generate([prompt], T, H, W, seed=seed)`` exactly.
            seed: clip ``i`` of a batch uses noise seed ``seed + i``.

        Returns:
            the edited video, same shape as ``video``, in [-1, 1].
        """
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler {sampler!r} is not one of {SAMPLERS}")
        batched, video = self._as_batch(video)
        _, _, frames, height, width = video.shape
        if self.max_frames is not None and frames > self.max_frames:
            raise ValueError(
                f"the video has {frames} frames, above max_frames={self.max_frames};"
                " keep its first frames"
            )
        if self.max_pixels is not None and height * width > self.max_pixels:
            raise ValueError(
                f"the video is {height}x{width}, above max_pixels="
                f"{self.max_pixels}; downscale it first"
            )
        latent, size = self._encode_any(video)  # (B, C, t, h, w) normalised
        latent = self._sdedit(latent, prompt, negative, strength, steps, guidance, sampler, seed)
        out = self._decode_any(latent, size)
        return out if batched else out[0]

    # --------------------------------------------------------------------------- edit helpers

    def _sdedit(
        self,
        latent: Tensor,
        prompt: str,
        negative: str | None,
        strength: float,
        steps: int,
        guidance: float,
        sampler: str,
        seed: int,
    ) -> Tensor:
        """Normalised latents (B, C, t, h, w) edited by :meth:`FlowMatching.sdedit`; clip ``i``
        is noised with :meth:`noise` of seed ``seed + i`` (what :meth:`generate` starts from)."""
        patch = self.dit.config.patch_size
        dtype = next(self.dit.parameters()).dtype
        batch, _, t, h, w = latent.shape
        grids = [(t // patch[0], h // patch[1], w // patch[2])] * batch
        coords, cu_seqlens = pack_grids(grids, device=self.device)
        x0 = torch.cat([patchify(z.to(dtype), patch)[0] for z in latent])  # (N, D)
        noise = torch.cat(
            [
                patchify(self._seeded_noise(seed + i, z.shape).to(dtype), patch)[0]
                for i, z in enumerate(latent)
            ]
        )  # (N, D)
        text, text_mask = self._encode_text([prompt] * batch)
        null, null_mask = self._null_text([negative] * batch)
        tokens = self.flow.sdedit(
            self.dit,
            x0,
            coords,
            cu_seqlens,
            text,
            text_mask,
            strength=strength,
            steps=steps,
            noise=noise,
            guidance=guidance,
            method=sampler,
            null_text=null,
            null_mask=null_mask,
        )  # (N, D)
        return torch.stack(unpack_grids(tokens, grids, patch))

    def _as_batch(self, video: Tensor) -> tuple[bool, Tensor]:
        if video.ndim not in (4, 5) or video.shape[-4] != 3:
            raise ValueError(
                f"video must be (3, T, H, W) or (B, 3, T, H, W); got {tuple(video.shape)}"
            )
        low, high = float(video.min()), float(video.max())
        if low < -1.01 or high > 1.01:
            raise ValueError(
                f"video values must be in [-1, 1], got [{low:.3g}, {high:.3g}]; "
                "map uint8 frames with x / 127.5 - 1"
            )
        batched = video.ndim == 5
        return batched, (video if batched else video[None]).to(self.device)

    def _valid_frames(self, frames: int) -> int:
        """Smallest 1 + tf*k >= frames whose latent count divides the temporal patch."""
        tf, pt = self.vae.temporal_factor, self.dit.config.patch_size[0]
        k = math.ceil((frames - 1) / tf)
        while (1 + k) % pt:
            k += 1
        return 1 + tf * k

    def _encode_any(self, video: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
        """(B, 3, T, H, W) any size -> normalised posterior-mode latents on a patch-valid grid."""
        _, _, frames, height, width = video.shape
        mh, mw = self.size_multiples
        padded = (
            self._valid_frames(frames),
            mh * math.ceil(height / mh),
            mw * math.ceil(width / mw),
        )
        pad = (0, padded[2] - width, 0, padded[1] - height, 0, padded[0] - frames)
        video = F.pad(video.float(), pad, mode="replicate")  # (B, 3, T', H', W')
        vae_dtype = next(self.vae.parameters()).dtype
        posterior, _ = self.vae.encode_video(
            video.to(vae_dtype), chunk_latent_frames=self.vae_chunk_latent_frames
        )
        return self.vae.normalize_latent(posterior.mode()), (frames, height, width)

    def _decode_any(self, latent: Tensor, size: tuple[int, int, int]) -> Tensor:
        frames, height, width = size
        video = torch.stack(self._decode(list(latent)))  # (B, 3, T', H', W')
        return video[:, :, :frames, :height, :width]

    @staticmethod
    def _negatives(negative: Sequence[str] | str | None, count: int) -> list[str | None]:
        if negative is None:
            return [None] * count
        if isinstance(negative, str):
            return [negative] * count
        negative = list(negative)
        if len(negative) == 1:
            return negative * count
        if len(negative) != count:
            raise ValueError(
                f"negative has {len(negative)} prompts for {count} prompts; "
                "give one for all or one per prompt"
            )
        return negative


def _cell_sizes(size_in: int, size_out: int) -> Tensor:
    """Input cells per output cell of adaptive pooling (PyTorch's floor/ceil boundaries)."""
    i = torch.arange(size_out)
    start = (i * size_in) // size_out
    end = ((i + 1) * size_in + size_out - 1) // size_out
    return (end - start).float()  # (size_out,)


def pooled_noise(noise: Tensor, size: tuple[int, int, int]) -> Tensor:
    """Area-pool noise (C, t, h, w) to ``size`` and rescale each cell to unit variance."""
    pooled = F.adaptive_avg_pool3d(noise[None].float(), size)[0]  # (C, t', h', w')
    cells = (
        _cell_sizes(noise.shape[1], size[0])[:, None, None]
        * _cell_sizes(noise.shape[2], size[1])[None, :, None]
        * _cell_sizes(noise.shape[3], size[2])[None, None, :]
    )  # (t', h', w')
    return (pooled * cells.to(pooled.device).sqrt()).to(noise.dtype)
