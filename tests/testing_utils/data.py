"""Test data written once: the tiny demo corpus ingested, and fabricated latent shards.

:func:`write_fake_latents` fabricates an encode-step output (index.parquet + safetensors shards)
without a VAE: random normalised latents at several grids — stills (t = 1), 16:9, 9:16 and 1:1
videos of various lengths — with random text states for captioned clips and none for the rest,
in the format of :mod:`components.core.latents`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from components.core import manifest as mf
from components.core.config import load_config
from components.steps import demo_data, ingest

# (kind, latent t, h, w); with (1, 2, 2) patches these are 16..80 tokens
GRIDS = (
    ("image", 1, 8, 8),  # 1:1 still
    ("video", 3, 6, 10),  # ~16:9
    ("video", 2, 10, 6),  # ~9:16
    ("image", 1, 6, 10),  # ~16:9 still
    ("video", 5, 8, 8),  # 1:1
    ("video", 4, 4, 8),  # 2:1
)


def write_fake_latents(
    root: Path,
    *,
    num_clips: int = 12,
    num_val: int = 2,
    channels: int = 4,
    text_dim: int = 16,
    text_len: int = 6,
    uncaptioned_every: int = 4,
    clips_per_shard: int = 5,
    seed: int = 0,
) -> str:
    """Write ``num_clips`` train + ``num_val`` val clips under ``root``; returns its path.

    Clip ``i`` has grid ``GRIDS[i % len(GRIDS)]``; every ``uncaptioned_every``-th clip has no text.
    """
    import pandas as pd
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    rows, shard, tensors = [], 0, {}

    def flush() -> None:
        nonlocal shard, tensors
        if tensors:
            save_file(tensors, str(root / f"shard-{shard:05d}.safetensors"))
            shard, tensors = shard + 1, {}

    for i in range(num_clips + num_val):
        kind, t, h, w = GRIDS[i % len(GRIDS)]
        clip_id = f"clip{i:04d}"
        tensors[f"{clip_id}/latent"] = torch.randn(channels, t, h, w, generator=gen)
        captioned = uncaptioned_every < 1 or i % uncaptioned_every != uncaptioned_every - 1
        caption = f"a {kind} number {i} of shapes moving" if captioned else ""
        if captioned:
            real = int(torch.randint(2, text_len + 1, (1,), generator=gen))
            tensors[f"{clip_id}/text"] = torch.randn(text_len, text_dim, generator=gen)
            tensors[f"{clip_id}/text"][real:] = 0.0
            mask = torch.zeros(text_len, dtype=torch.uint8)
            mask[:real] = 1
            tensors[f"{clip_id}/text_mask"] = mask
        rows.append(
            {
                "clip_id": clip_id,
                "shard": str(root / f"shard-{shard:05d}.safetensors"),
                "split": "train" if i < num_clips else "val",
                "kind": kind,
                "caption": caption or None,
                "short_caption": caption[:20] or None,
                "caption_source": "given" if captioned else None,
                "width": 8 * w,
                "height": 8 * h,
                "num_frames": 1 + 4 * (t - 1),
                "latent_c": channels,
                "latent_t": t,
                "latent_h": h,
                "latent_w": w,
                "uri": f"file:///raw/{clip_id}.mp4",
            }
        )
        if len(tensors) and sum(k.endswith("/latent") for k in tensors) >= clips_per_shard:
            flush()
    flush()
    pd.DataFrame(rows).sample(frac=1.0, random_state=seed).to_parquet(root / "index.parquet")
    return str(root)


def make_corpus(root: Path) -> str:
    """Render the ``tiny`` profile's corpus under ``root`` and ingest it; returns the manifest."""
    cfg = load_config("tiny")
    raw, ingested = root / "raw", root / "ingest"
    raw.mkdir(parents=True)
    ingested.mkdir()
    demo_data.run(cfg, raw)
    ingest.run(
        cfg, ingested, str(raw / "clips"), captions=str(raw / "captions.parquet"), previous=""
    )
    return str(ingested / "manifest.parquet")


def subset(manifest: str, names: list[str], dest: Path) -> str:
    """A manifest with only the rows whose URI contains one of ``names``."""
    table = mf.read_table(manifest)
    keep = [
        i for i, uri in enumerate(table.column("uri").to_pylist()) if any(n in uri for n in names)
    ]
    mf.write_table(table.take(keep), str(dest))
    return str(dest)
