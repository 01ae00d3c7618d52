"""Encode every validated clip to normalised VAE latents at native size (``tessera encode``).

Each clip keeps its aspect ratio: it is downscaled only when ``width * height`` exceeds
``encode.max_pixels`` (area filter), then centre-cropped to multiples of the VAE's spatial factor
(at most ``factor - 1`` pixels per side; nothing is stretched), and cut to its longest
``1 + tf*k`` prefix of at most ``encode.max_frames`` frames, so every latent frame is made of real
pixels and an image is one latent frame. The VAE runs in causal temporal chunks
(``chunk_latent_frames``, exact) and, for frames with a side above ``tile_size``, in blended
spatial tiles (approximate), which bounds memory on long or large clips. Latents are the posterior
mode, normalised with the scale/shift stored in the VAE's config.

**Output contract** (what ``components.train_dit`` reads)::

    latents/index.parquet                   one row per clip, INDEX_SCHEMA
    latents/shards/shard-00000.safetensors  "{clip_id}/latent"    (C, t, h, w) float32
                                            "{clip_id}/text"      (L, D) float32   } captioned
                                            "{clip_id}/text_mask" (L,) uint8       } clips only
                                            "{clip_id}/short_text", "…/short_text_mask"  the
                                            short caption's, where the clip has one
                                            (L = the caption's real tokens, <= text.max_length)

The index's ``shard`` column is the shard's path relative to ``latents/``.

**Sharding.** :func:`plan_shards` splits the manifest into ``shard_size``-clip shards; Airflow
maps :func:`encode_shard` over them (one committed step each, ``encode-shard-00003``, so a retried
or re-run shard that already committed is a no-op), and :func:`merge` copies the shards next to
one index. :func:`run` does the same in one process for the CLI.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from components import frames as fr
from components import storage
from components.config import Environment, TesseraConfig
from components.frames import Clip, read_clips
from components.runner import StepResult
from components.train_vae import load_vae
from model.vae import CausalVAE

LATENTS_DIR = "latents"
SHARDS_DIR = "shards"
INDEX_NAME = "index.parquet"
ROWS_NAME = "rows.parquet"
FORMAT = "tessera-latents/1"

INDEX_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("shard", pa.string()),  # relative to latents/: "shards/shard-00000.safetensors"
        ("split", pa.string()),
        ("kind", pa.string()),  # "video" | "image"
        ("caption", pa.string()),
        ("short_caption", pa.string()),
        ("caption_source", pa.string()),
        ("width", pa.int32()),  # of the encoded pixels
        ("height", pa.int32()),
        ("num_frames", pa.int32()),  # encoded frames
        ("latent_c", pa.int32()),
        ("latent_t", pa.int32()),
        ("latent_h", pa.int32()),
        ("latent_w", pa.int32()),
        ("uri", pa.string()),
        # extras
        ("fps", pa.float64()),
        ("has_text", pa.bool_()),
        ("source_width", pa.int32()),  # the clip as stored
        ("source_height", pa.int32()),
        ("source_frames", pa.int32()),
    ]
)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def shard_step(shard: dict[str, Any]) -> str:
    """The run_step name of one shard: ``encode-shard-00003``."""
    return f"encode-shard-{int(shard['index']):05d}"


# --------------------------------------------------------------------------- planning


def plan_shards(cfg: TesseraConfig, manifest: str) -> list[dict[str, Any]]:
    """Split the manifest's clips, in manifest order, into ``encode.shard_size``-clip shards.

    Returns ``[{"index": 0, "clip_ids": [...]}, ...]`` (small enough for XCom).
    """
    size = cfg.encode.shard_size
    if size < 1:
        raise ValueError(f"encode.shard_size must be >= 1, got {size}")
    ids = [c.clip_id for c in read_clips(manifest)]
    return [
        {"index": i, "clip_ids": ids[start : start + size]}
        for i, start in enumerate(range(0, len(ids), size))
    ]


def _captions(manifest: str, captions: str | None) -> dict[str, dict[str, Any]]:
    """clip_id -> caption, short_caption, caption_source; ``captions`` rows override the
    manifest's (a Parquet with those columns keyed by ``clip_id``)."""
    from components import manifest as mf

    fields = ("caption", "short_caption", "caption_source")
    rows = mf.read_table(manifest).select(["clip_id", *fields]).to_pylist()
    found = {r["clip_id"]: {k: r[k] for k in fields} for r in rows}
    if captions:
        table = pq.read_table(io.BytesIO(storage.read_bytes(captions)))
        missing = [c for c in ("clip_id", "caption") if c not in table.column_names]
        if missing:
            raise ValueError(
                f"captions table {captions} lacks columns {missing}; it needs "
                f"clip_id, caption (and optionally short_caption, caption_source)"
            )
        for r in table.to_pylist():
            if r["clip_id"] in found and r.get("caption"):
                found[r["clip_id"]].update({k: r[k] for k in fields if r.get(k) is not None})
    return found


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
        return cls(cfg, load_vae(vae_uri, device=device))

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
        return fr.encode_pixels(
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
            tensors[f"{clip.clip_id}/latent"] = z
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
                }
            )
        for column, key in (("caption", "text"), ("short_caption", "short_text")):
            texted = [r for r in rows if r["has_text"] and (r[column] or "").strip()]
            if not texted:
                continue
            states, mask = self.text.encode([r[column] for r in texted])  # (B, L, D), (B, L)
            for r, s, m in zip(texted, states.float().cpu(), mask.cpu(), strict=True):
                n = max(1, int(m.sum()))  # real tokens only: train_dit pads per batch
                tensors[f"{r['clip_id']}/{key}"] = s[:n].contiguous()
                tensors[f"{r['clip_id']}/{key}_mask"] = m[:n].to(torch.uint8)
        cfg, vc = self.cfg, self.vae.config
        metadata = {
            "format": FORMAT,
            "scaling_factor": repr(vc.scaling_factor),
            "shift_factor": repr(vc.shift_factor),
            "text_encoder": cfg.text.encoder,
            "text_max_length": str(cfg.text.max_length),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=metadata)
        return rows


def _write_rows(rows: list[dict[str, Any]], path: Path) -> None:
    table = pa.Table.from_pylist(rows, schema=INDEX_SCHEMA) if rows else INDEX_SCHEMA.empty_table()
    pq.write_table(table, path, compression="zstd")


def _summary(rows: list[dict[str, Any]], seconds: float) -> tuple[dict[str, Any], dict[str, float]]:
    frames = sum(r["num_frames"] for r in rows)
    values = {
        "clips": len(rows),
        "frames": frames,
        "with_text": sum(r["has_text"] for r in rows),
        "images": sum(r["kind"] == "image" for r in rows),
    }
    metrics = {
        "clips": float(len(rows)),
        "encode_seconds": seconds,
        "clips_per_s": len(rows) / seconds if seconds > 0 else 0.0,
        "frames_per_s": frames / seconds if seconds > 0 else 0.0,
    }
    return values, metrics


def _shard_clips(manifest: str, shard: dict[str, Any]) -> list[Clip]:
    by_id = {c.clip_id: c for c in read_clips(manifest)}
    missing = [i for i in shard["clip_ids"] if i not in by_id]
    if missing:
        raise ValueError(
            f"shard {shard['index']}: {len(missing)} clip id(s) are not in {manifest} "
            f"(e.g. {missing[0]}); re-plan the shards from this manifest"
        )
    return [by_id[i] for i in shard["clip_ids"]]


# --------------------------------------------------------------------------- the steps


def encode_shard(
    cfg: TesseraConfig,
    workdir: Path,
    manifest: str,
    vae: str,
    shard: dict[str, Any],
    captions: str | None = None,
) -> StepResult:
    """Encode one planned shard (run it as ``run_step(shard_step(shard), encode_shard, ...)``).

    Args:
        manifest: URI of the validated manifest the shards were planned from.
        vae: the train_vae step's ``vae`` output (a VAE directory URI).
        shard: one item of :func:`plan_shards`.
        captions: optional Parquet of newer captions by ``clip_id`` (e.g. from re-captioning).

    Returns:
        ``files={"shard": "shard-00003.safetensors", "rows": "rows.parquet"}``, ``index``, counts.
    """
    workdir = Path(workdir)
    started = time.perf_counter()
    clips = _shard_clips(manifest, shard)
    name = shard_name(int(shard["index"]))
    encoder = ClipEncoder.load(cfg, vae)
    rows = encoder.encode_clips(
        clips,
        _captions(manifest, captions),
        workdir / name,
        f"{SHARDS_DIR}/{name}",
        desc=shard_step(shard),
    )
    _write_rows(rows, workdir / ROWS_NAME)
    values, metrics = _summary(rows, time.perf_counter() - started)
    return StepResult(
        files={"shard": name, "rows": ROWS_NAME},
        values={"index": int(shard["index"]), **values},
        metrics=metrics,
    )


def merge(cfg: TesseraConfig, workdir: Path, shards: list[dict[str, Any]]) -> StepResult:
    """Gather the committed shard steps' outputs into ``latents/`` (shards copied, one index).

    Args:
        shards: the outputs of the :func:`encode_shard` steps (``shard``, ``rows``, ``index``).
    """
    workdir = Path(workdir)
    started = time.perf_counter()
    out = workdir / LATENTS_DIR
    (out / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for item in sorted(shards, key=lambda s: int(s["index"])):
        name = shard_name(int(item["index"]))
        storage.download_file(item["shard"], out / SHARDS_DIR / name)
        rows += pq.read_table(io.BytesIO(storage.read_bytes(item["rows"]))).to_pylist()
    ids = [r["clip_id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError("the shards hold some clips twice; plan them once per manifest")
    _write_rows(rows, out / INDEX_NAME)
    values, _ = _summary(rows, 1.0)
    print(
        f"encode: merged {len(shards)} shard(s), {values['clips']} clips "
        f"({values['with_text']} with text) in {time.perf_counter() - started:.1f}s"
    )
    return StepResult(
        files={"latents": LATENTS_DIR, "index": f"{LATENTS_DIR}/{INDEX_NAME}"},
        values={**values, "shards": len(shards)},
        metrics={"clips": float(len(rows))},
    )


def run(
    cfg: TesseraConfig, workdir: Path, manifest: str, vae: str, captions: str | None = None
) -> StepResult:
    """Encode every clip of ``manifest`` in this process (the CLI path); same output as
    :func:`encode_shard` over :func:`plan_shards` followed by :func:`merge`."""
    workdir = Path(workdir)
    started = time.perf_counter()
    out = workdir / LATENTS_DIR
    shards = plan_shards(cfg, manifest)
    encoder = ClipEncoder.load(cfg, vae)
    texts = _captions(manifest, captions)
    rows: list[dict[str, Any]] = []
    for shard in shards:
        name = shard_name(int(shard["index"]))
        rows += encoder.encode_clips(
            _shard_clips(manifest, shard),
            texts,
            out / SHARDS_DIR / name,
            f"{SHARDS_DIR}/{name}",
            desc=shard_step(shard),
        )
    out.mkdir(parents=True, exist_ok=True)
    _write_rows(rows, out / INDEX_NAME)
    seconds = time.perf_counter() - started
    values, metrics = _summary(rows, seconds)
    print(
        f"encode: {values['clips']} clips ({values['with_text']} with text, "
        f"{values['images']} images) in {len(shards)} shard(s), {seconds:.1f}s = "
        f"{metrics['clips_per_s']:.2f} clips/s, {metrics['frames_per_s']:.1f} frames/s"
    )
    return StepResult(
        files={"latents": LATENTS_DIR, "index": f"{LATENTS_DIR}/{INDEX_NAME}"},
        values={**values, "shards": len(shards)},
        metrics=metrics,
    )


def read_index(latents: str) -> Any:
    """The index of an encode output (``latents/`` URI) as a DataFrame sorted by ``clip_id``."""
    uri = storage.join(latents, INDEX_NAME)
    if not storage.exists(uri):
        raise FileNotFoundError(
            f"{uri} does not exist; expected the output of the encode step "
            "(index.parquet + safetensors shards)"
        )
    index = pq.read_table(io.BytesIO(storage.read_bytes(uri))).to_pandas()
    missing = [c for c in ("clip_id", "shard", "split") if c not in index.columns]
    if missing:
        raise ValueError(f"{uri} lacks column(s) {missing}; expected {INDEX_SCHEMA.names}")
    return index.sort_values("clip_id", kind="stable").reset_index(drop=True)


__all__ = [
    "INDEX_SCHEMA",
    "ClipEncoder",
    "encode_shard",
    "merge",
    "plan_shards",
    "read_index",
    "run",
    "shard_name",
    "shard_step",
]
