"""Headers are not trusted: a cut upload keeps headers that promise frames its data no longer
holds; the manifest records what the file holds, or the file is quarantined as truncated."""

from __future__ import annotations

import av
import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.components.steps.test_ingest import ingest_into, make_cfg

pytestmark = pytest.mark.fault("bad input: media")


def encode_avi(path, frames: int = 30):
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for _ in range(frames):
            pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return path


def test_a_cut_avi_whose_header_overcounts_is_quarantined_as_truncated(tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    whole = encode_avi(src / "whole.avi").read_bytes()
    (src / "cut.avi").write_bytes(whole[: len(whole) // 2])  # the header still says 30 frames
    with av.open(str(src / "cut.avi")) as container:
        assert container.streams.video[0].frames == 30  # what the header promises
    result = ingest_into(make_cfg(tmp_path), tmp_path / "out", src)
    (row,) = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    assert row["uri"].endswith("whole.avi") and row["num_frames"] == 30
    assert row["frames_counted"] is False  # the header was right
    (bad,) = pq.read_table(tmp_path / "out" / "quarantine.parquet").to_pylist()
    assert bad["uri"].endswith("cut.avi") and bad["reason"] == "corrupt"
    assert "the headers promise 30 frames but the file holds" in bad["message"]
    assert result.values["seen"] == 2
