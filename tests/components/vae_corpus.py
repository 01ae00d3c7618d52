"""The tiny demo corpus, ingested, for the train_vae and encode tests."""

from __future__ import annotations

from pathlib import Path

from components import demo_data, ingest
from components import manifest as mf
from components.config import load_config


def make_corpus(root: Path) -> str:
    """Render the ``tiny`` profile's corpus under ``root`` and ingest it; returns the manifest."""
    cfg = load_config("tiny")
    raw, ingested = root / "raw", root / "ingest"
    raw.mkdir(parents=True)
    ingested.mkdir()
    demo_data.generate(cfg, raw)
    ingest.run(
        cfg, ingested, str(raw / "clips"), captions=str(raw / "captions.parquet"), previous=""
    )
    return str(ingested / "manifest.parquet")


def subset(manifest: str, names: list[str], dest: Path) -> str:
    """A manifest with only the rows whose URI contains one of ``names``."""
    table = mf.read_table(manifest)
    keep = [
        i
        for i, uri in enumerate(table.column("uri").to_pylist())
        if any(name in uri for name in names)
    ]
    mf.write_table(table.take(keep), str(dest))
    return str(dest)
