"""Re-caption every clip with the trained captioner: the ``caption`` step (``tessera caption``).

DALL-E 3 and Sora train on captions written by a captioner rather than on whatever text came
with the data: every clip gets a descriptive caption (and a short one) in one consistent style,
and clips that came with none (real footage, the uncaptioned share of the demo corpus) get one.
The captioner is the train_captioner step's ``captioner`` directory; each clip is decoded (its
first ``MAX_FRAMES`` frames, resized as the captioner resizes) and captioned in both styles by
beam search (``caption.num_beams``, ``caption.max_new_tokens``).

**Output**: ``captions.parquet``, one row per manifest clip (``CAPTIONS_SCHEMA``): the new
captions with ``caption_source = "recaptioned"``, ``captioner_version`` (size name + the first 12
hex digits of the weights' sha256), each caption's mean token log-prob (``confidence``), and the
clip's original caption, short caption and source. Encode blends them with the originals
(``caption.original_share``). ``real_captions.md`` with ``frames/*.png`` shows up to
``caption.table_clips`` real-footage clips (those no factor or caption describes) with a few of
their frames and what the captioner wrote: the only check of captions where no ground truth
exists. Both are logged to the step's MLflow run.

**In parts.** :func:`plan_shards` splits the manifest into ``caption.shard_size``-clip shards;
each shard is one committed part (:func:`caption_shard`; Airflow maps it, a committed shard is
not captioned again), and :func:`run` merges them, checking every manifest clip is captioned
exactly once.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from components.core import artifacts, media, storage, tracking
from components.core import manifest as mf
from components.core.config import TesseraConfig
from components.core.manifest import Clip, read_clips
from components.core.runner import StepResult, StepSpec

if TYPE_CHECKING:
    from model.captioner import Captioner, CaptionTokenizer

CAPTIONS_NAME = "captions.parquet"  # a shard's table and the merged one
TABLE_NAME = "real_captions.md"
FRAMES_DIR = "frames"
MAX_FRAMES = 128  # frames decoded per clip: the captioner samples its few from these
BATCH = 8  # clips captioned together (beam search memory grows with it)
SHEET_FRAMES, SHEET_HEIGHT = 4, 96  # frames per contact sheet, and their height in pixels
PRODUCER = "the train_captioner step's 'captioner' output (run `tessera train-captioner`)"
# the architecture fields that name a size (train_captioner overrides the others)
SIZE_FIELDS = (
    "widths",
    "grid",
    "dim",
    "heads",
    "mlp_ratio",
    "encoder_layers",
    "prompt_layers",
    "decoder_layers",
)

CAPTIONS_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("uri", pa.string()),
        ("kind", pa.string()),
        ("caption", pa.string()),  # re-captioned, descriptive style
        ("short_caption", pa.string()),  # re-captioned, short style
        ("caption_source", pa.string()),  # "recaptioned"
        ("captioner_version", pa.string()),  # "captioner-xs-0123456789ab"
        ("confidence", pa.float64()),  # mean token log-prob of ``caption``
        ("short_confidence", pa.float64()),
        ("original_caption", pa.string()),  # the manifest's (None where the clip had none)
        ("original_short_caption", pa.string()),
        ("original_source", pa.string()),  # given | synthetic | None
    ]
)


# --------------------------------------------------------------------------- the captioner


def _sha256(uri: str) -> str:
    digest = hashlib.sha256()
    with storage.open_read(uri) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def size_name(config: Any) -> str:
    """The ``CAPTIONER_SIZES`` name whose architecture ``config`` has, or ``captioner-custom``."""
    from model.captioner import CAPTIONER_SIZES

    for name, base in CAPTIONER_SIZES.items():
        if all(getattr(config, f) == getattr(base, f) for f in SIZE_FIELDS):
            return name
    return "captioner-custom"


def find_captioner(uri: str) -> str:
    """The captioner directory (``config.json`` + ``model.safetensors``): ``uri`` itself or
    ``uri/captioner``; raises naming what is missing and where it comes from."""
    from model.config import CONFIG_NAME, WEIGHTS_NAME

    for candidate in (uri, storage.join(uri, artifacts.CAPTIONER_DIR)):
        if storage.exists(storage.join(candidate, CONFIG_NAME)):
            if not storage.exists(storage.join(candidate, WEIGHTS_NAME)):
                raise FileNotFoundError(
                    f"the captioner in {candidate} has no {WEIGHTS_NAME}; pass {PRODUCER}"
                )
            return candidate
    raise FileNotFoundError(
        f"no captioner ({CONFIG_NAME} + {WEIGHTS_NAME}) in {uri} or "
        f"{storage.join(uri, artifacts.CAPTIONER_DIR)}; pass {PRODUCER}"
    )


def load_captioner(uri: str, device: Any = "cpu") -> tuple[Captioner, CaptionTokenizer, str]:
    """The captioner in ``uri`` (see :func:`find_captioner`; local, ``file://`` or ``s3://``) in
    eval mode, its tokenizer, and its version: ``{size}-{sha256(model.safetensors)[:12]}``."""
    from model.config import WEIGHTS_NAME

    found = find_captioner(uri)
    try:
        model, tokenizer = artifacts.load_captioner(found, device=device)
    except Exception as exc:  # safetensors' and torch's errors share no base class
        raise ValueError(
            f"the captioner in {found} cannot be loaded ({type(exc).__name__}: {exc}); if its "
            f"{WEIGHTS_NAME} is corrupt or does not match its config, re-run train_captioner "
            f"and pass {PRODUCER}"
        ) from exc
    version = f"{size_name(model.config)}-{_sha256(storage.join(found, WEIGHTS_NAME))[:12]}"
    return model.requires_grad_(False), tokenizer, version


def load_pretrained(cfg: TesseraConfig, device: Any = "cpu") -> tuple[Any, None, str]:
    """The transformers captioner ``caption.pretrained`` names (local or ``s3://``), no
    tokenizer of ours, and its version: ``hf-{model_type}-{sha256(model.safetensors)[:12]}``."""
    from model.pretrained_captioner import PretrainedCaptioner

    uri = cfg.caption.pretrained
    with artifacts.local_tree(uri) as path:
        model = PretrainedCaptioner.from_dir(path, cfg.caption.descriptive_prompt, device)
        weights = Path(path) / "model.safetensors"
        digest = _sha256(str(weights))[:12] if weights.is_file() else "unhashed"
    return model, None, f"hf-{model.config.model_type}-{digest}"


# --------------------------------------------------------------------------- pixels


def read_pixels(clip: Clip, short_side: int, max_frames: int = MAX_FRAMES) -> torch.Tensor:
    """The clip's first ``max_frames`` frames -> (3, T, h, w) in [-1, 1], short side
    ``short_side``: exactly what the captioner would make of the full-size frames (its own
    resize), converted a few frames at a time so a large clip never sits in memory as floats."""
    from model.evaluator import fit_short_side

    frames = media.read_frames(clip.uri, count=max_frames, rotation=clip.rotation)  # (T, H, W, 3)
    chunks = [
        fit_short_side(media.to_video(frames[i : i + 16])[None], short_side)[0]
        for i in range(0, len(frames), 16)
    ]
    return torch.cat(chunks, dim=1)  # (3, T, h, w)


# --------------------------------------------------------------------------- planning


def plan_shards(
    cfg: TesseraConfig, manifest: str, captioner: str | None = None, **_: Any
) -> list[dict[str, Any]]:
    """Split the manifest's clips, in manifest order, into ``caption.shard_size``-clip shards:
    ``[{"clip_ids": [...]}, ...]``. A missing captioner fails here, before any shard runs."""
    if cfg.caption.pretrained:
        if not storage.exists(storage.join(cfg.caption.pretrained, "config.json")):
            raise FileNotFoundError(
                f"caption.pretrained={cfg.caption.pretrained!r} holds no config.json: give the "
                "directory a transformers captioner was saved to (save_pretrained)"
            )
    elif captioner:
        find_captioner(captioner)
    size = cfg.caption.shard_size
    ids = [c.clip_id for c in read_clips(manifest)]
    return [{"clip_ids": ids[start : start + size]} for start in range(0, len(ids), size)]


def _originals(manifest: str) -> dict[str, dict[str, Any]]:
    """clip_id -> the manifest's caption, short caption and caption source."""
    table = mf.read_table(manifest)
    columns = [c for c in ("caption", "short_caption", "caption_source") if c in table.column_names]
    rows = table.select(["clip_id", *columns]).to_pylist()
    return {
        r["clip_id"]: {
            "original_caption": r.get("caption") or None,
            "original_short_caption": r.get("short_caption") or None,
            "original_source": (r.get("caption_source") if r.get("caption") else None),
        }
        for r in rows
    }


# --------------------------------------------------------------------------- captioning


@torch.inference_mode()
def caption_clips(
    cfg: TesseraConfig,
    model: Captioner,
    tokenizer: CaptionTokenizer,
    clips: Sequence[Clip],
    desc: str = "caption",
) -> list[dict[str, Any]]:
    """Both styles of caption for each clip: ``{clip_id, caption, confidence, short_caption,
    short_confidence}`` in clip order."""
    from tqdm.auto import tqdm

    from model.captioner import caption_videos

    cc = cfg.caption
    out: list[dict[str, Any]] = []
    with tqdm(total=len(clips), desc=desc, unit="clip", disable=None) as bar:
        for start in range(0, len(clips), BATCH):
            batch = clips[start : start + BATCH]
            videos = [read_pixels(c, model.config.short_side) for c in batch]
            run = model.caption if tokenizer is None else partial(caption_videos, model, tokenizer)
            found = {
                style: run(
                    videos, style=style, num_beams=cc.num_beams, max_new_tokens=cc.max_new_tokens
                )
                for style in ("descriptive", "short")
            }
            for clip, (text, logp), (short, short_logp) in zip(
                batch, found["descriptive"], found["short"], strict=True
            ):
                out.append(
                    {
                        "clip_id": clip.clip_id,
                        "caption": text,
                        "confidence": float(logp),
                        "short_caption": short,
                        "short_confidence": float(short_logp),
                    }
                )
            bar.update(len(batch))
    return out


def caption_shard(
    cfg: TesseraConfig,
    workdir: Path,
    shard: dict[str, Any],
    manifest: str,
    captioner: str,
) -> StepResult:
    """Caption one planned shard (one part of the step) in both styles.

    Args:
        shard: one item of :func:`plan_shards`, numbered (``index``).
        manifest: URI of the (versioned) manifest the shards were planned from.
        captioner: the train_captioner step's ``captioner`` output (a captioner directory URI,
            or a directory holding ``captioner/``).

    Returns:
        ``files={"captions": "captions.parquet"}`` (``CAPTIONS_SCHEMA`` rows of the shard's
        clips), ``index``, ``manifest``, ``captioner_version``, ``clips``.
    """
    workdir = Path(workdir)
    started = time.perf_counter()
    clips = mf.shard_clips(manifest, shard)
    if cfg.caption.pretrained:
        model, tokenizer, version = load_pretrained(cfg, artifacts.default_device())
    else:
        model, tokenizer, version = load_captioner(captioner, artifacts.default_device())
    found = caption_clips(cfg, model, tokenizer, clips, desc=f"caption shard {shard['index']}")
    originals = _originals(manifest)
    rows = [
        {
            **row,
            "uri": clip.uri,
            "kind": clip.kind,
            "caption_source": "recaptioned",
            "captioner_version": version,
            **originals.get(clip.clip_id, {}),
        }
        for clip, row in zip(clips, found, strict=True)
    ]
    mf.write_table(
        mf.table_from_rows(rows, CAPTIONS_SCHEMA),
        str(workdir / CAPTIONS_NAME),
        lineage=mf.read_lineage(manifest),
    )
    seconds = time.perf_counter() - started
    return StepResult(
        files={"captions": CAPTIONS_NAME},
        values={
            "index": int(shard["index"]),
            "manifest": manifest,
            "captioner_version": version,
            "clips": len(rows),
        },
        metrics={
            "clips": float(len(rows)),
            "caption_seconds": seconds,
            "clips_per_s": len(rows) / seconds if seconds > 0 else 0.0,
        },
    )


# --------------------------------------------------------------------------- the real-footage table


def _table_clips(clips: Sequence[Clip], rows: dict[str, dict[str, Any]], n: int) -> list[Clip]:
    """Up to ``n`` clips no factor describes: real footage (``real_*``) first, then any clip
    that came without a caption."""
    real = [c for c in clips if c.name.startswith("real_")]
    bare = [c for c in clips if c not in real and not rows[c.clip_id]["original_caption"]]
    return (real + bare)[:n]


def contact_sheet(clip: Clip, path: Path) -> None:
    """A few of the clip's frames side by side, ``SHEET_HEIGHT`` pixels high, as a PNG."""
    from PIL import Image

    frames = media.read_frames(clip.uri, count=MAX_FRAMES, rotation=clip.rotation)
    picks = np.unique(np.linspace(0, len(frames) - 1, SHEET_FRAMES).round().astype(int))
    tiles = []
    for i in picks:
        image = Image.fromarray(frames[i])
        width = max(1, round(image.width * SHEET_HEIGHT / image.height))
        tiles.append(image.resize((width, SHEET_HEIGHT), Image.Resampling.BILINEAR))
    sheet = Image.new("RGB", (sum(t.width for t in tiles) + 2 * (len(tiles) - 1), SHEET_HEIGHT))
    x = 0
    for tile in tiles:
        sheet.paste(tile, (x, 0))
        x += tile.width + 2
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def _cell(text: str | None) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")


def write_table_md(
    clips: Sequence[Clip], rows: dict[str, dict[str, Any]], workdir: Path
) -> list[dict[str, Any]]:
    """``real_captions.md`` with a contact sheet per clip under ``frames/``; returns its rows."""
    lines = [
        "# Re-captioned real footage",
        "",
        "Clips no factor or caption describes, a few of their frames, and what the captioner "
        "wrote (confidence: mean token log-prob).",
        "",
        "| clip | frames | caption | short caption | confidence |",
        "|---|---|---|---|---|",
    ]
    table = []
    for clip in clips:
        row = rows[clip.clip_id]
        sheet = f"{FRAMES_DIR}/{clip.name}.png"
        contact_sheet(clip, workdir / sheet)
        lines.append(
            f"| {_cell(clip.name)} | ![{_cell(clip.name)}]({sheet}) | {_cell(row['caption'])} "
            f"| {_cell(row['short_caption'])} | {row['confidence']:.2f} |"
        )
        table.append(
            {
                "clip": clip.name,
                "frames": sheet,
                "caption": row["caption"],
                "short_caption": row["short_caption"],
                "confidence": row["confidence"],
            }
        )
    (workdir / TABLE_NAME).write_text("\n".join(lines) + "\n")
    return table


def _log_table(table: list[dict[str, Any]]) -> None:
    import mlflow

    if table and mlflow.active_run() is not None:
        mlflow.log_table({k: [r[k] for r in table] for k in table[0]}, "tables/real_captions.json")


# --------------------------------------------------------------------------- the step


def _merge(parts: list[dict[str, Any]]) -> tuple[pa.Table, str]:
    """The parts' tables in shard order, and the one manifest they were planned from."""
    if not parts:
        raise ValueError("caption: no shards to merge; plan them with plan_shards first")
    manifests = sorted({str(p["manifest"]) for p in parts})
    if len(manifests) != 1:
        raise ValueError(f"caption: the shards come from different manifests: {manifests}")
    ordered = sorted(parts, key=lambda p: int(p["index"]))
    tables = [mf.read_table(p["captions"]).select(CAPTIONS_SCHEMA.names) for p in ordered]
    return pa.concat_tables([t.cast(CAPTIONS_SCHEMA) for t in tables]), manifests[0]


def check_coverage(ids: Sequence[str], expected: Sequence[str], manifest: str) -> None:
    """Raise unless ``ids`` holds every clip of ``expected`` exactly once, and nothing else."""
    seen: dict[str, int] = {}
    for i in ids:
        seen[i] = seen.get(i, 0) + 1
    twice = sorted(i for i, n in seen.items() if n > 1)
    missing = sorted(set(expected) - set(seen))
    extra = sorted(set(seen) - set(expected))
    if twice or missing or extra:
        raise ValueError(
            f"caption: the shards do not cover {manifest} once: {len(twice)} clip(s) twice "
            f"{twice[:5]}, {len(missing)} missing {missing[:5]}, {len(extra)} not in it "
            f"{extra[:5]}; re-plan the shards from this manifest and caption every one"
        )


def run(cfg: TesseraConfig, workdir: Path, parts: list[dict[str, Any]]) -> StepResult:
    """Merge the committed shards into one ``captions.parquet`` and the real-footage table.

    Args:
        parts: the outputs of the :func:`caption_shard` parts (``captions``, ``index``,
            ``manifest``).
    """
    workdir = Path(workdir)
    table, manifest = _merge(parts)
    clips = read_clips(manifest)
    check_coverage(table.column("clip_id").to_pylist(), [c.clip_id for c in clips], manifest)
    versions = sorted(set(table.column("captioner_version").to_pylist()))
    if len(versions) != 1:
        raise ValueError(f"caption: the shards were captioned by different captioners {versions}")
    lineage = mf.read_lineage(manifest)
    mf.write_table(table, str(workdir / CAPTIONS_NAME), lineage=lineage)
    if lineage is not None:
        tracking.log_lineage(lineage)

    rows = {r["clip_id"]: r for r in table.to_pylist()}
    shown = write_table_md(_table_clips(clips, rows, cfg.caption.table_clips), rows, workdir)
    _log_table(shown)
    files = {"captions": CAPTIONS_NAME, "real_captions": TABLE_NAME}
    if shown:
        files["frames"] = FRAMES_DIR

    confidence = float(np.mean([r["confidence"] for r in rows.values()]))
    short_confidence = float(np.mean([r["short_confidence"] for r in rows.values()]))
    seconds = sum(float(p.get("metrics", {}).get("caption_seconds", 0.0)) for p in parts)
    values = {
        "clips": len(rows),
        "shards": len(parts),
        "recaptioned": sum(r["caption_source"] == "recaptioned" for r in rows.values()),
        "with_original": sum(bool(r["original_caption"]) for r in rows.values()),
        "real_shown": len(shown),
        "mean_confidence": round(confidence, 6),
        "mean_short_confidence": round(short_confidence, 6),
        "captioner_version": versions[0],
    }
    print(
        f"caption: {values['clips']} clips in {len(parts)} shard(s) by {versions[0]} "
        f"({values['with_original']} had a caption), mean log-prob {confidence:.3f} "
        f"(short {short_confidence:.3f}), {seconds:.1f}s of captioning"
    )
    return StepResult(
        files=files,
        values=values,
        metrics={
            "clips": float(len(rows)),
            "mean_confidence": confidence,
            "mean_short_confidence": short_confidence,
            "caption_seconds": seconds,
            "clips_per_s": len(rows) / seconds if seconds > 0 else 0.0,
        },
        artifacts=[CAPTIONS_NAME, TABLE_NAME, *([FRAMES_DIR] if shown else [])],
    )


STEP = StepSpec("caption", run, plan=plan_shards, part=caption_shard)
