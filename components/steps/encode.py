"""Encode every validated clip to normalised VAE latents at native size: the ``encode`` step.

Each clip keeps its aspect ratio: it is downscaled only when ``width * height`` exceeds
``encode.max_pixels`` (area filter), then centre-cropped to multiples of the VAE's spatial factor
(at most ``factor - 1`` pixels per side; nothing is stretched), and cut to its longest
``1 + tf*k`` prefix of at most ``encode.max_frames`` frames, so every latent frame is made of real
pixels and an image is one latent frame. The VAE runs in causal temporal chunks
(``chunk_latent_frames``, exact) and, for frames with a side above ``tile_size``, in blended
spatial tiles (approximate), which bounds memory on long or large clips. Latents are the posterior
mode, normalised with the scale/shift stored in the VAE's config.

**Output**: ``latents/`` in the format of :mod:`components.core.latents` (what the DiT trainer
reads), its index carrying the manifest's lineage (the dataset revision).

**In parts.** :func:`plan_shards` splits the manifest into ``encode.shard_size``-clip shards;
each shard is one committed part (:func:`encode_shard`; Airflow maps it, so a retried or re-run
shard that already committed is a no-op), and :func:`run` gathers them into ``latents/``
with one index; its MLflow run reports every shard (``part/*`` metrics by shard index).
``tessera encode`` runs the same plan, parts and merge in one process.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from components.core import artifacts, latents, media, storage, tracking
from components.core import manifest as mf
from components.core.config import Environment, TesseraConfig
from components.core.manifest import Clip, read_clips
from components.core.runner import StepResult, StepSpec
from model.vae import CausalVAE

ROWS_NAME = "rows.parquet"


# --------------------------------------------------------------------------- planning


def plan_shards(cfg: TesseraConfig, manifest: str, **_: Any) -> list[dict[str, Any]]:
    """Split the manifest's clips, in manifest order, into ``encode.shard_size``-clip shards:
    ``[{"clip_ids": [...]}, ...]`` (small enough for XCom; the runner numbers them)."""
    size = cfg.encode.shard_size
    ids = [c.clip_id for c in read_clips(manifest)]
    return [{"clip_ids": ids[start : start + size]} for start in range(0, len(ids), size)]


def _captions(
    manifest: str, captions: str | None, original_share: float = 0.0, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """clip_id -> the caption each clip trains with, and where it came from.

    Without ``captions`` that is the manifest's. ``captions`` (Parquet keyed by ``clip_id``, with
    ``caption`` and optionally ``short_caption``, ``caption_source``, ``captioner_version``)
    overrides it; a ``recaptioned`` row (the caption step's) replaces the caption of every clip
    except a deterministic ``original_share`` of those that have their own (DALL-E 3's blend),
    and fills a short caption only where the clip has none. The original stays in
    ``original_caption`` / ``original_source``.
    """
    fields = ("caption", "short_caption", "caption_source")
    rows = mf.read_table(manifest).select(["clip_id", *fields]).to_pylist()
    found = {
        r["clip_id"]: {
            **{k: r[k] for k in fields},
            "captioner_version": None,
            "original_caption": r["caption"],
            "original_source": r["caption_source"],
        }
        for r in rows
    }
    if captions:
        table = pq.read_table(io.BytesIO(storage.read_bytes(captions)))
        missing = [c for c in ("clip_id", "caption") if c not in table.column_names]
        if missing:
            raise ValueError(
                f"captions table {captions} lacks columns {missing}; it needs "
                f"clip_id, caption (and optionally short_caption, caption_source)"
            )
        for r in table.to_pylist():
            mine = found.get(r["clip_id"])
            if mine is None or not (r.get("caption") or "").strip():
                continue
            if r.get("caption_source") != "recaptioned":
                mine.update({k: r[k] for k in fields if r.get(k) is not None})
                mine["original_caption"], mine["original_source"] = mine["caption"], None
                continue
            if (mine["original_caption"] or "").strip() and keeps_original(
                r["clip_id"], original_share, seed
            ):
                continue
            mine["caption"], mine["caption_source"] = r["caption"], "recaptioned"
            mine["captioner_version"] = r.get("captioner_version")
            if not (mine["short_caption"] or "").strip():
                mine["short_caption"] = r.get("short_caption")
    return found


def keeps_original(clip_id: str, share: float, seed: int) -> bool:
    """Whether a clip keeps its own caption under re-captioning: a uniform draw from the clip id
    and the run seed (the same on every rank, shard and retry) below ``share``."""
    draw = int(hashlib.sha256(f"{seed}:{clip_id}".encode()).hexdigest()[:12], 16) / 16**12
    return draw < share


# --------------------------------------------------------------------------- encoding


class ClipEncoder:
    """The VAE (and lazily the text encoder) that turn clips into shard tensors + index rows."""

    def __init__(self, cfg: TesseraConfig, vae: CausalVAE):
        self.cfg = cfg
        self.vae = vae.eval().requires_grad_(False)
        self.device = next(vae.parameters()).device
        self._text: Any = None

    @classmethod
    def load(cls, cfg: TesseraConfig, vae_uri: str) -> ClipEncoder:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(cfg, artifacts.load_vae(vae_uri, device=device))

    @property
    def text(self) -> Any:
        if self._text is None:
            from model.text import CachedTextEncoder, load_text_encoder

            encoder = load_text_encoder(self.cfg.text.encoder, self.cfg.text.max_length)
            cache = Environment.read().home / "cache" / "text"
            self._text = CachedTextEncoder(encoder.to(self.device), cache_dir=cache)
        return self._text

    def pixels(self, clip: Clip) -> torch.Tensor:
        """The clip at its encode size -> (3, T, H, W) in [-1, 1].

        Sides are cropped to multiples of the VAE stride times the DiT's spatial patch, so every
        latent cuts into whole spacetime patches."""
        patch = max(self.cfg.train_dit.patch_size[1:])
        return media.encode_pixels(
            clip, self.cfg.encode, self.vae.spatial_factor * patch, self.vae.temporal_factor
        )

    @torch.inference_mode()
    def latent(self, video: torch.Tensor) -> torch.Tensor:
        """(3, T, H, W) -> normalised posterior mode (C, t, h, w) float32 on CPU."""
        enc = self.cfg.encode
        tile = enc.tile_size if enc.tile_size and max(video.shape[-2:]) > enc.tile_size else None
        posterior, _ = self.vae.encode_video(
            video[None].to(self.device),
            chunk_latent_frames=enc.chunk_latent_frames or None,
            tile_size=tile,
            tile_overlap=enc.tile_overlap,
        )
        z = self.vae.normalize_latent(posterior.mode())  # (1, C, t, h, w)
        return z[0].float().cpu().contiguous()

    def encode_clips(
        self,
        clips: Sequence[Clip],
        captions: dict[str, dict[str, Any]],
        path: Path,
        shard: str,
        desc: str = "encode",
    ) -> list[dict[str, Any]]:
        """Encode ``clips`` into the safetensors file ``path``; returns their index rows."""
        from safetensors.torch import save_file
        from tqdm.auto import tqdm

        tensors: dict[str, torch.Tensor] = {}
        rows: list[dict[str, Any]] = []
        for clip in tqdm(clips, desc=desc, unit="clip", disable=None):
            video = self.pixels(clip)  # (3, T, H, W)
            z = self.latent(video)  # (C, t, h, w)
            tensors[latents.key(clip.clip_id, "latent")] = z
            cap = captions.get(clip.clip_id, {})
            rows.append(
                {
                    "clip_id": clip.clip_id,
                    "shard": shard,
                    "split": clip.split,
                    "kind": clip.kind,
                    "caption": cap.get("caption"),
                    "short_caption": cap.get("short_caption"),
                    "caption_source": cap.get("caption_source"),
                    "width": video.shape[3],
                    "height": video.shape[2],
                    "num_frames": video.shape[1],
                    "latent_c": z.shape[0],
                    "latent_t": z.shape[1],
                    "latent_h": z.shape[2],
                    "latent_w": z.shape[3],
                    "uri": clip.uri,
                    "fps": clip.fps,
                    "has_text": bool((cap.get("caption") or "").strip()),
                    "source_width": clip.width,
                    "source_height": clip.height,
                    "source_frames": clip.num_frames,
                    "source_uri": clip.source_uri,
                    "captioner_version": cap.get("captioner_version"),
                    "original_caption": cap.get("original_caption"),
                    "original_source": cap.get("original_source"),
                }
            )
        for column, key in (
            ("caption", "text"),
            ("short_caption", "short_text"),
            ("original_caption", "original_text"),
        ):
            texted = [r for r in rows if r["has_text"] and (r[column] or "").strip()]
            if column == "original_caption":  # only where the clip trains on another caption
                texted = [r for r in texted if r["caption_source"] == "recaptioned"]
            if not texted:
                continue
            states, mask = self.text.encode([r[column] for r in texted])  # (B, L, D), (B, L)
            for r, s, m in zip(texted, states.float().cpu(), mask.cpu(), strict=True):
                n = max(1, int(m.sum()))  # real tokens only: train_dit pads per batch
                tensors[latents.key(r["clip_id"], key)] = s[:n].contiguous()
                tensors[latents.key(r["clip_id"], f"{key}_mask")] = m[:n].to(torch.uint8)
        cfg, vc = self.cfg, self.vae.config
        metadata = {
            "format": latents.FORMAT,
            "scaling_factor": repr(vc.scaling_factor),
            "shift_factor": repr(vc.shift_factor),
            "text_encoder": cfg.text.encoder,
            "text_max_length": str(cfg.text.max_length),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=metadata)
        return rows


def _summary(rows: list[dict[str, Any]], seconds: float) -> tuple[dict[str, Any], dict[str, float]]:
    frames = sum(r["num_frames"] for r in rows)
    values = {
        "clips": len(rows),
        "frames": frames,
        "with_text": sum(r["has_text"] for r in rows),
        "recaptioned": sum(r["caption_source"] == "recaptioned" for r in rows),
        "images": sum(r["kind"] == "image" for r in rows),
    }
    metrics = {
        "clips": float(len(rows)),
        "encode_seconds": seconds,
        "clips_per_s": len(rows) / seconds if seconds > 0 else 0.0,
        "frames_per_s": frames / seconds if seconds > 0 else 0.0,
    }
    return values, metrics


# --------------------------------------------------------------------------- the step


def encode_shard(
    cfg: TesseraConfig,
    workdir: Path,
    shard: dict[str, Any],
    manifest: str,
    vae: str,
    captions: str | None = None,
) -> StepResult:
    """Encode one planned shard (one part of the step).

    Args:
        shard: one item of :func:`plan_shards`, numbered (``index``).
        manifest: URI of the (versioned) manifest the shards were planned from.
        vae: the train_vae step's ``vae`` output (a VAE directory URI).
        captions: optional Parquet of newer captions by ``clip_id``: the caption step's
            ``captions.parquet`` (re-captioned, blended with ``caption.original_share`` of the
            originals; see :func:`_captions`).

    Returns:
        ``files={"shard": "shard-00003.safetensors", "rows": "rows.parquet"}``, ``index``, counts.
    """
    workdir = Path(workdir)
    started = time.perf_counter()
    clips = mf.shard_clips(manifest, shard)
    name = latents.shard_name(int(shard["index"]))
    encoder = ClipEncoder.load(cfg, vae)
    rows = encoder.encode_clips(
        clips,
        _captions(manifest, captions, cfg.caption.original_share, cfg.seed),
        workdir / name,
        f"{latents.SHARDS_DIR}/{name}",
        desc=f"encode shard {int(shard['index'])}",
    )
    latents.write_rows(rows, workdir / ROWS_NAME, mf.read_lineage(manifest))
    values, metrics = _summary(rows, time.perf_counter() - started)
    return StepResult(
        files={"shard": name, "rows": ROWS_NAME},
        values={"index": int(shard["index"]), **values},
        metrics=metrics,
    )


def run(cfg: TesseraConfig, workdir: Path, parts: list[dict[str, Any]]) -> StepResult:
    """Gather the committed shards into ``latents/`` (shards copied, one index).

    Args:
        parts: the outputs of the :func:`encode_shard` parts (``shard``, ``rows``, ``index``).
    """
    workdir = Path(workdir)
    started = time.perf_counter()
    out = workdir / latents.LATENTS_DIR
    (out / latents.SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    lineage = None
    for item in sorted(parts, key=lambda s: int(s["index"])):
        name = latents.shard_name(int(item["index"]))
        storage.download_file(item["shard"], out / latents.SHARDS_DIR / name)
        table = latents.read_rows(item["rows"])
        lineage = lineage or mf.lineage_of(table)
        rows += table.to_pylist()
    ids = [r["clip_id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError("the shards hold some clips twice; plan them once per manifest")
    latents.write_rows(rows, out / latents.INDEX_NAME, lineage)
    if lineage is not None:
        tracking.log_lineage(lineage)
    seconds = sum(float(p.get("metrics", {}).get("encode_seconds", 0.0)) for p in parts)
    values, metrics = _summary(rows, seconds)
    print(
        f"encode: {values['clips']} clips ({values['with_text']} with text, "
        f"{values['recaptioned']} re-captioned, {values['images']} images) in {len(parts)} shard(s), {seconds:.1f}s of encoding = "
        f"{metrics['clips_per_s']:.2f} clips/s; merged in {time.perf_counter() - started:.1f}s"
    )
    return StepResult(
        files={
            "latents": latents.LATENTS_DIR,
            "index": f"{latents.LATENTS_DIR}/{latents.INDEX_NAME}",
        },
        values={**values, "shards": len(parts)},
        metrics=metrics,
    )


STEP = StepSpec("encode", run, plan=plan_shards, part=encode_shard)
