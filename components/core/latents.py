"""The latent-shard format: what the encode step writes and the DiT trainer reads.

::

    latents/index.parquet                   one row per clip, INDEX_SCHEMA (+ the manifest's lineage)
    latents/shards/shard-00000.safetensors  "{clip_id}/latent"    (C, t, h, w) float32, normalised
                                            "{clip_id}/text"      (L, D) float32   } captioned
                                            "{clip_id}/text_mask" (L,) uint8       } clips only
                                            "{clip_id}/short_text", "…/short_text_mask"  the
                                            short caption's, where the clip has one
                                            "{clip_id}/original_text", "…/original_text_mask"
                                            the original caption's, where the clip trains
                                            on a re-captioned one but had its own
                                            (L = the caption's real tokens, <= text.max_length)

``caption`` is the caption a clip trains with: with re-captioning (the caption step) the
captioner's descriptive caption, except for an ``encode.original_share`` of the clips that keep
their own; ``caption_source`` says which (``recaptioned`` or the original's ``given`` /
``synthetic``), ``captioner_version`` which captioner wrote it, ``original_caption`` what the
clip came with.

The index's ``shard`` column is the shard's path relative to ``latents/`` (or absolute).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from components.core import storage
from components.core.manifest import Lineage, lineage_of, with_lineage

LATENTS_DIR = "latents"
SHARDS_DIR = "shards"
INDEX_NAME = "index.parquet"
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
        ("source_uri", pa.string()),
        ("captioner_version", pa.string()),  # of a recaptioned caption (None otherwise)
        ("original_caption", pa.string()),  # the clip's own caption, where it has one
        ("original_source", pa.string()),
    ]
)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def key(clip_id: str, tensor: str) -> str:
    """The safetensors key of one clip's tensor: ``latent``, ``text``, ``text_mask``, ..."""
    return f"{clip_id}/{tensor}"


def write_rows(rows: list[dict[str, Any]], path: Path, lineage: Lineage | None = None) -> None:
    """Index rows -> Parquet at a local ``path`` (with the dataset's lineage, when known)."""
    table = pa.Table.from_pylist(rows, schema=INDEX_SCHEMA) if rows else INDEX_SCHEMA.empty_table()
    if lineage is not None:
        table = with_lineage(table, lineage)
    pq.write_table(table, path, compression="zstd")


def read_rows(uri: str) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(uri)))


def read_index(latents: str) -> Any:
    """The index of an encode output (``latents/`` URI) as a DataFrame sorted by ``clip_id``."""
    table = _index_table(latents)
    index = table.to_pandas()
    missing = [c for c in ("clip_id", "shard", "split") if c not in index.columns]
    if missing:
        raise ValueError(
            f"{storage.join(latents, INDEX_NAME)} lacks column(s) {missing}; expected "
            f"{INDEX_SCHEMA.names}"
        )
    return index.sort_values("clip_id", kind="stable").reset_index(drop=True)


def index_lineage(latents: str) -> Lineage | None:
    """The versioned dataset the latents were encoded from, or None."""
    return lineage_of(_index_table(latents))


def shard_uri(latents: str, shard: str) -> str:
    """Where an index row's ``shard`` lives (relative to ``latents``, or absolute)."""
    return (
        shard if storage.is_s3(shard) or Path(shard).is_absolute() else storage.join(latents, shard)
    )


def _index_table(latents: str) -> pa.Table:
    uri = storage.join(latents, INDEX_NAME)
    if not storage.exists(uri):
        raise FileNotFoundError(
            f"{uri} does not exist; expected the output of the encode step "
            "(index.parquet + safetensors shards)"
        )
    return read_rows(uri)
