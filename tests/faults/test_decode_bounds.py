"""Decode work is bounded per file: a file whose probing hangs or crashes FFmpeg is quarantined
with its reason, the other files are ingested as usual, and every file is accounted for."""

from __future__ import annotations

import time

import pyarrow.parquet as pq
import pytest

from tests.components.steps.test_ingest import encode_video, ingest_into, make_cfg

pytestmark = pytest.mark.slow  # spawned probe workers: ~10-20 s


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
