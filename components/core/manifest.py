"""Manifest and quarantine tables (DESIGN §2): schemas, reading and writing, lineage.

The manifest has one row per accepted clip, the quarantine one row per rejected input with a
machine-readable ``reason`` and a human ``message``. Columns of DESIGN §2 are never renamed;
the extra ones after them may grow.

**Lineage.** The version step writes the manifest that training reads: its ``uri`` column points
at the clips' content-addressed copies in the DVC remote, ``source_uri`` at where they came from,
and the Parquet metadata carries the dataset revision (:class:`Lineage`). Every table derived
from it (the latents index) copies that metadata, so any training run can name, tag and
reproduce the exact dataset it read (``tessera dataset checkout REV``).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from components.core import storage

CAPTION_SOURCES = ("given", "synthetic", "recaptioned")
SPLITS = ("train", "val")

MANIFEST_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),  # sha256 of the file's bytes
        ("uri", pa.string()),
        ("bytes", pa.int64()),
        ("container", pa.string()),
        ("codec", pa.string()),
        ("width", pa.int32()),  # after rotation metadata
        ("height", pa.int32()),
        ("fps", pa.float64()),  # average frame rate; 0 for still images
        ("num_frames", pa.int32()),
        ("duration_s", pa.float64()),
        ("split", pa.string()),
        ("caption", pa.string()),
        ("caption_source", pa.string()),
        ("short_caption", pa.string()),
        # extras
        ("kind", pa.string()),  # "video" | "image"
        ("has_audio", pa.bool_()),
        ("rotation", pa.int32()),  # degrees from the stream's display matrix
        ("frames_counted", pa.bool_()),  # True when num_frames came from decoding, not headers
        ("source_version", pa.string()),  # size:mtime_ns or size:etag, for incremental re-runs
        ("source_uri", pa.string()),  # where the clip was ingested from; set by the version step
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("reason", pa.string()),  # machine code, e.g. "truncated", "duplicate"
        ("message", pa.string()),  # what is wrong and what to do
        ("bytes", pa.int64()),
        ("sha256", pa.string()),
        ("step", pa.string()),  # "ingest" | "validate"
        ("source_version", pa.string()),
    ]
)

# Quarantine reasons, shared by ingest and validate.
REASONS = {
    "zero_bytes": "the file is empty",
    "unreadable": "the file cannot be read (permissions or I/O error)",
    "missing": "the file was listed but does not exist (or vanished before it was read)",
    "not_media": "the file is not a video or image container",
    "corrupt": "the container is truncated or corrupt",
    "no_video_stream": "the container has no video stream (audio only?)",
    "undecodable": "the first frame cannot be decoded",
    "unsupported_codec": "the codec has no decoder in this build of FFmpeg",
    "probe_timeout": "probing it did not finish within ingest.file_timeout_s (a decoder hang?)",
    "probe_crashed": "probing it killed the worker process (FFmpeg crashed on it)",
    "too_short": "fewer frames or seconds than the profile allows",
    "too_long": "more frames or seconds than the profile allows",
    "resolution_out_of_bounds": "width, height or aspect ratio outside the profile's bounds",
    "duplicate": "same bytes (sha256) as a clip already in the manifest",
}


def empty_table(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()


def table_from_rows(rows: Iterable[dict], schema: pa.Schema) -> pa.Table:
    rows = list(rows)
    return pa.Table.from_pylist(rows, schema=schema) if rows else schema.empty_table()


def write_table(
    table: pa.Table, uri: str, row_group_size: int = 1024, lineage: Lineage | None = None
) -> None:
    """Write a table as Parquet to any store URI (deterministic bytes for the same rows),
    with ``lineage`` in its metadata when given."""
    if lineage is not None:
        table = with_lineage(table, lineage)
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size, compression="zstd")
    storage.write_bytes(uri, buf.getvalue())


def read_table(uri: str) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(uri)))


# --------------------------------------------------------------------------- lineage

LINEAGE_KEY = b"tessera.lineage"


@dataclass(frozen=True)
class Lineage:
    """The versioned dataset a table was read from."""

    manifest: str  # URI of the versioned manifest
    dataset_rev: str  # git sha of the dataset repository (the DVC revision)
    dataset_md5: str  # DVC's md5 of the data directory


def with_lineage(table: pa.Table, lineage: Lineage) -> pa.Table:
    metadata = {**(table.schema.metadata or {}), LINEAGE_KEY: json.dumps(asdict(lineage))}
    return table.replace_schema_metadata(metadata)


def lineage_of(table: pa.Table) -> Lineage | None:
    """The lineage recorded in ``table``'s metadata, or None (an unversioned manifest)."""
    raw = (table.schema.metadata or {}).get(LINEAGE_KEY)
    return Lineage(**json.loads(raw)) if raw else None


def read_lineage(uri: str) -> Lineage | None:
    """The lineage of the Parquet table at ``uri`` (its metadata only)."""
    schema = pq.read_schema(io.BytesIO(storage.read_bytes(uri)))
    raw = (schema.metadata or {}).get(LINEAGE_KEY)
    return Lineage(**json.loads(raw)) if raw else None


# --------------------------------------------------------------------------- clips


@dataclass(frozen=True)
class Clip:
    """The manifest columns the training steps read."""

    clip_id: str
    uri: str  # where to read the bytes (the DVC remote's copy in a versioned manifest)
    kind: str
    split: str
    width: int
    height: int
    num_frames: int
    fps: float
    rotation: int = 0
    source_uri: str = ""  # where it was ingested from ("" = ``uri``)

    @property
    def name(self) -> str:
        """The file name it was ingested under, without suffix (``real_bikes``)."""
        return Path((self.source_uri or self.uri).rstrip("/")).stem


def read_clips(manifest: str) -> list[Clip]:
    """Every manifest row as a :class:`Clip`, in manifest order."""
    return [
        Clip(
            clip_id=r["clip_id"],
            uri=r["uri"],
            kind=r.get("kind") or "video",
            split=r["split"],
            width=int(r["width"]),
            height=int(r["height"]),
            num_frames=max(1, int(r["num_frames"])),
            fps=float(r.get("fps") or 0.0),
            rotation=int(r.get("rotation") or 0),
            source_uri=r.get("source_uri") or r["uri"],
        )
        for r in read_table(manifest).to_pylist()
    ]


def shard_clips(manifest: str, shard: dict[str, Any]) -> list[Clip]:
    """The clips of a planned shard (``{"index", "clip_ids"}``), in the shard's order; ids the
    manifest does not hold raise, naming the shard (it was planned from another manifest)."""
    by_id = {c.clip_id: c for c in read_clips(manifest)}
    missing = [i for i in shard["clip_ids"] if i not in by_id]
    if missing:
        raise ValueError(
            f"shard {shard['index']}: {len(missing)} clip id(s) are not in {manifest} "
            f"(e.g. {missing[0]}); re-plan the shards from this manifest"
        )
    return [by_id[i] for i in shard["clip_ids"]]
