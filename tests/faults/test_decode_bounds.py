"""Decode work is bounded per file: a file whose probing hangs or crashes FFmpeg is quarantined
with its reason, the other files are ingested as usual, and every file is accounted for; and
decode memory is bounded wherever a video is read after ingest (crops, evaluation)."""

from __future__ import annotations

import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tests.components.steps.test_ingest import encode_video, ingest_into, make_cfg

pytestmark = [
    pytest.mark.slow,
    pytest.mark.fault("bad input: media"),
]  # spawned probe workers: ~10-20 s


@pytest.fixture
def source(tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    for i, name in enumerate(["a.mp4", "b_hangs.mp4", "c_crashes.mp4", "d.mp4", "e.mp4"]):
        encode_video(src / name, 32, 24, seed=i)
    return src


@pytest.mark.parametrize("workers", [1, 2])
def test_a_hanging_and_a_crashing_file_are_quarantined_and_the_rest_ingested(
    source, tmp_path, monkeypatch, workers
):
    monkeypatch.setenv("TESSERA_HOME", str(tmp_path / "home"))
    # persistent faults (99 times): probing the file alone again hangs or crashes again
    monkeypatch.setenv("TESSERA_FAULTS", "ingest.hang.b_hangs.mp4:99,ingest.crash.c_crashes.mp4:99")
    cfg = make_cfg(tmp_path, workers=workers, file_timeout_s=4)
    started = time.monotonic()
    result = ingest_into(cfg, tmp_path / "out", source)
    elapsed = time.monotonic() - started
    manifest = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    quarantine = pq.read_table(tmp_path / "out" / "quarantine.parquet").to_pylist()
    assert sorted(r["uri"].rsplit("/", 1)[1] for r in manifest) == ["a.mp4", "d.mp4", "e.mp4"]
    reasons = {r["uri"].rsplit("/", 1)[1]: (r["reason"], r["message"]) for r in quarantine}
    assert sorted(reasons) == ["b_hangs.mp4", "c_crashes.mp4"]
    assert reasons["b_hangs.mp4"][0] == "probe_timeout"
    assert "not done after 4 s (ingest.file_timeout_s)" in reasons["b_hangs.mp4"][1]
    assert reasons["c_crashes.mp4"][0] == "probe_crashed"
    assert "worker process died" in reasons["c_crashes.mp4"][1]
    assert result.values["seen"] == 5 == len(manifest) + len(quarantine)  # nothing lost
    assert elapsed < 120  # bounded: a hang costs about two timeouts, not forever


def test_a_transient_crash_is_probed_again_alone_and_ingested(source, tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TESSERA_FAULTS", "ingest.crash.c_crashes.mp4:1")  # crashes once only
    cfg = make_cfg(tmp_path, workers=2, file_timeout_s=30)
    result = ingest_into(cfg, tmp_path / "out", source)
    assert result.values["ingested"] == 5 and result.values["quarantined"] == 0


def test_reading_a_video_is_bounded_by_bytes_and_downscaled_as_it_decodes(tmp_path):
    from components.core import media

    clip = encode_video(tmp_path / "wide.mp4", 320, 180, frames=8)
    small = media.read_frames(clip, max_pixels=80 * 45)
    assert small.shape == (8, 45, 80, 3)  # aspect kept, never held at 320x180
    frame = 320 * 180 * 3
    with pytest.raises(ValueError, match=r"decoding more than .* MiB of frames \(3 of 320x180"):
        media.read_frames(clip, max_bytes=3 * frame + 1)
    assert len(media.read_frames(clip, count=3, max_bytes=3 * frame)) == 3


def test_a_crop_is_cut_as_frames_decode_so_memory_follows_the_crop(tmp_path):
    """The VAE trains on native-size crops: a crop of a big clip holds one full frame at a time
    (numpy's allocations, traced), and equals the same crop of the whole decode, rotated too."""
    import tracemalloc

    from components.core import media

    clip = encode_video(tmp_path / "big.mp4", 1280, 720, frames=8)
    full = media.read_frames(clip, rotation=90)  # (8, 1280, 720, 3) as displayed
    box, frame = (700, 100, 48, 64), 1280 * 720 * 3

    def peak_of(**crop) -> tuple[np.ndarray, int]:
        tracemalloc.start()
        try:
            return media.read_frames(clip, start=2, count=5, rotation=90, **crop), (
                tracemalloc.get_traced_memory()[1]
            )
        finally:
            tracemalloc.stop()

    crop, peak = peak_of(crop=box)
    np.testing.assert_array_equal(crop, full[2:7, 700:748, 100:164])
    assert peak < 2.5 * frame, peak  # one decoded frame at a time, not five
    assert peak_of()[1] > 5 * frame  # what the same read holds uncropped (the probe works)


def test_vae_crops_of_an_uncacheable_clip_are_read_as_crops_and_match_the_cached_ones(tmp_path):
    """A clip bigger than the crop cache, or one that decodes more frames than the manifest
    counts, is read window by window as crops; the crops are those of the cached clip."""
    from components.core.manifest import Clip
    from components.steps.train_vae.data import CropDataset

    path = encode_video(tmp_path / "wide.mp4", 640, 360, frames=12)
    clip = Clip("c0", str(path), "video", "train", 640, 360, 12, 8.0)
    under = Clip("c1", str(path), "video", "train", 640, 360, 9, 8.0)  # header said 9 of 12
    cached = CropDataset([clip], 5, (32, 48), seed=3, cache_mb=16)
    windowed = CropDataset([clip], 5, (32, 48), seed=3, cache_mb=1)
    budget = CropDataset([under], 5, (32, 48), seed=3, cache_mb=640 * 360 * 3 * 10 // 2**20 + 1)
    for position in range(4):
        a, b = cached.crop(position, 0), windowed.crop(position, 0)
        assert torch.equal(a["video"], b["video"]) and a["valid"].tolist() == [5, 32, 48]
        assert budget.crop(position, 0)["video"].shape == (3, 5, 32, 48)
    assert cached._cached_bytes == 640 * 360 * 3 * 12 and windowed._cached_bytes == 0
    assert budget._cache[str(path)].shape[0] == 9  # the manifest's frames, no more


def test_evaluating_a_folder_of_big_videos_reads_them_at_the_generators_budget(tmp_path):
    """`tessera evaluate --videos FOLDER` on a user's uploads: each is read as the real side is
    (its first evaluate.frames frames, at most generate.max_pixels), never at native size."""
    from components.steps.evaluate import _folder_videos

    folder = tmp_path / "fakes"
    folder.mkdir()
    for i in range(2):
        encode_video(folder / f"v{i}.mp4", 1280, 720, frames=30, seed=i)
    videos, prompts = _folder_videos(str(folder), max_frames=17, max_pixels=64 * 64)
    assert [v.shape for v in videos] == [(17, 48, 85, 3)] * 2  # 16:9 kept, 4080 <= 4096 pixels
    assert prompts == [None, None]
