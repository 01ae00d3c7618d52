"""Manifest and quarantine tables (DESIGN §2): schemas, reading and writing.

The manifest has one row per accepted clip, the quarantine one row per rejected input with a
machine-readable ``reason`` and a human ``message``. Columns of DESIGN §2 are never renamed;
the extra ones after them may grow.
"""

from __future__ import annotations

import io
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from components import storage

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


def write_table(table: pa.Table, uri: str, row_group_size: int = 1024) -> None:
    """Write a table as Parquet to any store URI (deterministic bytes for the same rows)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size, compression="zstd")
    storage.write_bytes(uri, buf.getvalue())


def read_table(uri: str) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(uri)))
