"""Ingest step on real files made here with PyAV: good clips pass, each kind of bad file lands in
quarantine with its reason, nothing is lost, re-runs are byte-identical and reuse probes."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components.core import manifest as mf
from components.core import storage
from components.core.config import IngestConfig, TesseraConfig
from components.core.runner import RunContext, run_step
from components.steps import ingest
from components.steps.ingest import listing, probe
from tests.testing_utils.step_tester import StepTesterMixin

# --------------------------------------------------------------------------- real media files


def encode_video(
    path: Path,
    width: int,
    height: int,
    frames: int = 6,
    *,
    codec: str = "libx264",
    fps: int = 8,
    rotation: float | None = None,
    audio: bool = False,
    faststart: bool = False,
    seed: int = 0,
) -> Path:
    """A few frames of uniform noise as an MP4 (optionally rotated, with audio, moov first)."""
    rng = np.random.default_rng(seed)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", format="mp4", options=options) as container:
        video = container.add_stream(codec, rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        if rotation is not None:
            video.set_display_rotation(rotation)
        sound = container.add_stream("aac", rate=16000, layout="mono") if audio else None
        for i in range(frames):
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            container.mux(video.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
            if sound is not None:
                container.mux(sound.encode(_silence(i * 2000)))
        container.mux(video.encode())
        if sound is not None:
            container.mux(sound.encode())
    return path


def _silence(pts: int, samples: int = 2000) -> av.AudioFrame:
    frame = av.AudioFrame.from_ndarray(
        np.zeros((1, samples), np.float32), format="fltp", layout="mono"
    )
    frame.sample_rate, frame.pts, frame.time_base = 16000, pts, Fraction(1, 16000)
    return frame


def encode_audio_only(path: Path) -> Path:
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000, layout="mono")
        for i in range(4):
            container.mux(stream.encode(_silence(i * 2000)))
        container.mux(stream.encode())
    return path


def encode_png(path: Path, width: int, height: int) -> Path:
    pixels = np.random.default_rng(7).integers(0, 256, (height, width, 3), dtype=np.uint8)
    with av.open(str(path), "w", format="image2") as container:
        stream = container.add_stream("png", rate=1)
        stream.width, stream.height, stream.pix_fmt = width, height, "rgb24"
        container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return path


def zero_mdat_payload(data: bytes) -> bytes:
    """Keep the (faststart) headers, zero every coded frame: opens fine, decodes nothing."""
    start = data.index(b"mdat") + 4
    return data[:start] + bytes(len(data) - start)


GOOD = {  # file -> (width, height) in the manifest
    "a_landscape.mp4": (64, 36),
    "b_portrait.mp4": (36, 64),
    "c_square_audio.mp4": (48, 48),
    "d_still.png": (40, 30),
    "e_one_frame.mp4": (32, 32),
    "g_phone.mp4": (36, 64),  # coded 64x36, display matrix rotates by 90 degrees
    "sub/z_nested.mp4": (32, 48),
}
BAD = {
    "a_landscape_copy.mp4": "duplicate",
    "f_wide.mp4": "resolution_out_of_bounds",
    "h_cut.mp4": "corrupt",
    "h_cut_faststart.mp4": "corrupt",
    "i_empty.mp4": "zero_bytes",
    "j_flipped_header.mp4": "corrupt",
    "k_notes.mp4": "not_media",
    "l_voice.m4a": "no_video_stream",
    "m_blank_frames.mp4": "undecodable",
    "n_alien_codec.mp4": "unsupported_codec",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Every good and bad kind of input, one file each (~20 KB in all but the wide clip)."""
    src = tmp_path_factory.mktemp("raw")
    (src / "sub").mkdir()
    scratch = tmp_path_factory.mktemp("scratch")

    good = encode_video(src / "a_landscape.mp4", 64, 36, seed=1).read_bytes()
    encode_video(src / "b_portrait.mp4", 36, 64, seed=2)
    encode_video(src / "c_square_audio.mp4", 48, 48, codec="mpeg4", audio=True, seed=3)
    encode_png(src / "d_still.png", 40, 30)
    encode_video(src / "e_one_frame.mp4", 32, 32, frames=1, seed=5)
    encode_video(src / "g_phone.mp4", 64, 36, rotation=90, seed=6)
    encode_video(src / "sub" / "z_nested.mp4", 32, 48, seed=7)

    (src / "a_landscape_copy.mp4").write_bytes(good)
    encode_video(src / "f_wide.mp4", 10000, 10, frames=1, seed=8)
    (src / "h_cut.mp4").write_bytes(good[: len(good) // 2])  # moov (at the end) is gone
    fast = encode_video(scratch / "fast.mp4", 64, 36, faststart=True, seed=9).read_bytes()
    (src / "h_cut_faststart.mp4").write_bytes(fast[: len(fast) * 3 // 4])  # index past EOF
    (src / "i_empty.mp4").write_bytes(b"")
    (src / "j_flipped_header.mp4").write_bytes(bytes(b ^ 0xFF for b in good[:32]) + good[32:])
    (src / "k_notes.mp4").write_text("shot list: beach at dusk, 3 takes\n" * 20)
    encode_audio_only(src / "l_voice.m4a")
    blank = encode_video(scratch / "blank.mp4", 64, 36, faststart=True, seed=10).read_bytes()
    (src / "m_blank_frames.mp4").write_bytes(zero_mdat_payload(blank))
    alien = encode_video(scratch / "alien.mp4", 64, 36, seed=11).read_bytes()
    (src / "n_alien_codec.mp4").write_bytes(alien.replace(b"avc1", b"zzzz"))  # unknown fourcc
    return src


def make_cfg(tmp_path: Path, **ingest_overrides) -> TesseraConfig:
    """Defaults, in-process probing, and a store of its own (no latest ingest to reuse)."""
    bounds = dataclasses.replace(IngestConfig(workers=1, file_timeout_s=0), **ingest_overrides)
    return TesseraConfig(profile="test", store=str(tmp_path / "store"), ingest=bounds)


def ingest_into(cfg: TesseraConfig, out: Path, src, **kwargs):
    out.mkdir(parents=True, exist_ok=True)
    return ingest.run(cfg, out, src=str(src), **kwargs)


def names(table: pa.Table, root: Path) -> list[str]:
    return [Path(uri).relative_to(root).as_posix() for uri in table.column("uri").to_pylist()]


def reasons(out: Path, root: Path) -> dict[str, str]:
    table = pq.read_table(out / "quarantine.parquet")
    return dict(zip(names(table, root), table.column("reason").to_pylist(), strict=True))


@pytest.fixture(scope="module")
def first_run(corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ingest")
    result = ingest_into(make_cfg(tmp), tmp / "out", corpus)
    return result, tmp / "out"


class TestIngestStep(StepTesterMixin):
    step = ingest.STEP
    bad_config = ("ingest.max_aspect=wide",)
    bad_config_error = "ingest.max_aspect: expected a number"

    @pytest.fixture(scope="class")
    def step_inputs(self, corpus):
        return {"src": str(corpus)}

    def test_every_file_is_accounted_for(self, step_run):
        out = step_run.outputs
        assert out["seen"] == out["ingested"] + out["quarantined"] == len(GOOD) + len(BAD)


# --------------------------------------------------------------------------- reasons


@pytest.mark.parametrize(("name", "reason"), sorted(BAD.items()))
@pytest.mark.fault("bad input: media")
def test_bad_file_is_quarantined_with_its_reason(first_run, corpus, name, reason):
    _, out = first_run
    assert reasons(out, corpus).get(name) == reason


def test_good_files_pass_and_nothing_is_lost(first_run, corpus):
    result, out = first_run
    manifest = pq.read_table(out / "manifest.parquet")
    assert names(manifest, corpus) == sorted(GOOD)
    assert result.values["seen"] == len(GOOD) + len(BAD)
    assert result.values["seen"] == result.values["ingested"] + result.values["quarantined"]
    assert result.values["ingested"] == len(GOOD)
    assert result.values["duplicates"] == 1
    assert result.values["reused"] == 0
    assert result.files == {"manifest": "manifest.parquet", "quarantine": "quarantine.parquet"}
    assert result.artifacts == ["quarantine.parquet"]
    for key in ("seen", "ingested", "quarantined", "probe_s", "hash_s", "mb_per_s", "clips_per_s"):
        assert result.metrics[key] >= 0


def test_manifest_columns_describe_each_clip(first_run, corpus):
    _, out = first_run
    table = pq.read_table(out / "manifest.parquet")
    assert table.schema.equals(mf.MANIFEST_SCHEMA)
    rows = {name: row for name, row in zip(names(table, corpus), table.to_pylist(), strict=True)}
    for name, (width, height) in GOOD.items():
        row = rows[name]
        path = corpus / name
        assert (row["width"], row["height"]) == (width, height), name
        assert row["clip_id"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert row["bytes"] == path.stat().st_size
        assert row["source_version"] == f"{path.stat().st_size}:{path.stat().st_mtime_ns}"
        assert row["split"] in mf.SPLITS
        assert row["caption"] is None and row["caption_source"] is None
        assert not row["frames_counted"]
    assert rows["g_phone.mp4"]["rotation"] == 90
    assert rows["a_landscape.mp4"]["rotation"] == 0
    landscape = rows["a_landscape.mp4"]
    assert (landscape["container"], landscape["codec"]) == ("mp4", "h264")
    assert landscape["kind"] == "video"
    assert (landscape["num_frames"], landscape["fps"]) == (6, 8.0)
    assert landscape["duration_s"] == pytest.approx(0.75)
    assert not landscape["has_audio"]
    audio = rows["c_square_audio.mp4"]
    assert (audio["codec"], audio["has_audio"]) == ("mpeg4", True)
    still = rows["d_still.png"]
    assert (still["kind"], still["container"], still["codec"]) == ("image", "png", "png")
    assert (still["num_frames"], still["fps"], still["duration_s"]) == (1, 0.0, 0.0)
    assert rows["e_one_frame.mp4"]["num_frames"] == 1


def test_quarantine_rows_say_what_is_wrong_and_what_to_do(first_run, corpus):
    _, out = first_run
    table = pq.read_table(out / "quarantine.parquet")
    assert table.schema.equals(mf.QUARANTINE_SCHEMA)
    for row in table.to_pylist():
        assert row["step"] == "ingest"
        assert row["message"].startswith(row["uri"] + ": "), row["message"]
        assert probe.ADVICE[row["reason"]] in row["message"]
    by_name = dict(zip(names(table, corpus), table.to_pylist(), strict=True))
    copy = by_name["a_landscape_copy.mp4"]
    assert copy["sha256"] == hashlib.sha256((corpus / "a_landscape.mp4").read_bytes()).hexdigest()
    assert str(corpus / "a_landscape.mp4") in copy["message"]
    assert "10000x10" in by_name["f_wide.mp4"]["message"]
    assert "index points to byte" in by_name["h_cut_faststart.mp4"]["message"]
    assert "text file" in by_name["k_notes.mp4"]["message"]


@pytest.mark.fault("bad input: media")
def test_frame_bounds_quarantine_short_and_long_clips_but_not_stills(corpus, tmp_path):
    cfg = make_cfg(tmp_path, min_frames=2, max_frames=5)
    result = ingest_into(cfg, tmp_path / "out", corpus)
    got = reasons(tmp_path / "out", corpus)
    assert got["e_one_frame.mp4"] == "too_short"
    assert got["a_landscape.mp4"] == "too_long"
    assert got["a_landscape_copy.mp4"] == "too_long"  # duplicates count against accepted clips
    assert "d_still.png" in names(pq.read_table(tmp_path / "out" / "manifest.parquet"), corpus)
    assert result.values["seen"] == result.values["ingested"] + result.values["quarantined"]


# --------------------------------------------------------------------------- determinism, reuse


def test_rerun_writes_byte_identical_tables(first_run, corpus, tmp_path):
    _, out = first_run
    ingest_into(make_cfg(tmp_path), tmp_path / "again", corpus)
    for name in ("manifest.parquet", "quarantine.parquet"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes(), name


def test_previous_manifest_skips_probing_unchanged_files(first_run, corpus, tmp_path, monkeypatch):
    _, out = first_run
    probed = []
    real_probe = probe.probe_file
    monkeypatch.setattr(probe, "probe_file", lambda path: probed.append(path) or real_probe(path))
    result = ingest_into(
        make_cfg(tmp_path), tmp_path / "out", corpus, previous=str(out / "manifest.parquet")
    )
    # zero_bytes needs no probe; bounds-based and codec reasons are probed again on purpose
    assert sorted(Path(p).name for p in probed) == ["f_wide.mp4", "n_alien_codec.mp4"]
    assert result.values["reused"] == len(GOOD) + len(BAD) - 3
    for name in ("manifest.parquet", "quarantine.parquet"):
        assert (tmp_path / "out" / name).read_bytes() == (out / name).read_bytes(), name


def test_default_previous_is_the_latest_ingest_and_changed_files_are_probed(corpus, tmp_path):
    src = tmp_path / "raw"
    shutil.copytree(corpus, src)  # copy2 keeps mtimes: source versions are stable
    cfg = make_cfg(tmp_path)
    first = run_step(ingest.STEP, cfg, RunContext("r1", track=False), src=str(src))
    assert first["reused"] == 0
    encode_video(src / "b_portrait.mp4", 36, 72, seed=99)  # new content, new size
    second = run_step(ingest.STEP, cfg, RunContext("r2", track=False), src=str(src))
    assert second["reused"] == len(GOOD) + len(BAD) - 3 - 1
    rows = pq.read_table(storage.local_path(second["manifest"])).to_pylist()
    portrait = next(r for r in rows if r["uri"].endswith("b_portrait.mp4"))
    assert (portrait["width"], portrait["height"]) == (36, 72)


def test_process_pool_writes_the_same_tables(first_run, corpus, tmp_path):
    _, out = first_run
    result = ingest_into(make_cfg(tmp_path, workers=2), tmp_path / "pool", corpus)
    assert result.values["seen"] == len(GOOD) + len(BAD)
    for name in ("manifest.parquet", "quarantine.parquet"):
        assert (tmp_path / "pool" / name).read_bytes() == (out / name).read_bytes(), name


# --------------------------------------------------------------------------- captions, sources


def test_captions_are_merged_by_uri_relative_path_or_name(corpus, tmp_path):
    captions = pa.Table.from_pylist(
        [
            {
                "path": "a_landscape.mp4",
                "caption": "noise, landscape",
                "short_caption": "noise",
                "caption_source": "given",
            },
            {
                "path": "sub/z_nested.mp4",
                "caption": "nested noise",
                "short_caption": None,
                "caption_source": None,
            },
            {
                "path": str(corpus / "b_portrait.mp4"),
                "caption": "tall noise",
                "short_caption": "tall",
                "caption_source": "recaptioned",
            },
            {
                "path": "not_there.mp4",
                "caption": "orphan",
                "short_caption": None,
                "caption_source": "given",
            },
        ]
    )
    pq.write_table(captions, tmp_path / "captions.parquet")
    ingest_into(
        make_cfg(tmp_path), tmp_path / "out", corpus, captions=str(tmp_path / "captions.parquet")
    )
    table = pq.read_table(tmp_path / "out" / "manifest.parquet")
    got = {
        name: (row["caption"], row["short_caption"], row["caption_source"])
        for name, row in zip(names(table, corpus), table.to_pylist(), strict=True)
    }
    assert got["a_landscape.mp4"] == ("noise, landscape", "noise", "given")
    assert got["sub/z_nested.mp4"] == ("nested noise", None, "given")
    assert got["b_portrait.mp4"] == ("tall noise", "tall", "recaptioned")
    assert got["g_phone.mp4"] == (None, None, None)


def test_captions_with_an_unknown_source_are_refused(corpus, tmp_path):
    bad = pa.Table.from_pylist([{"path": "a.mp4", "caption": "x", "caption_source": "made-up"}])
    pq.write_table(bad, tmp_path / "captions.parquet")
    with pytest.raises(ValueError, match="caption_source 'made-up'"):
        ingest_into(
            make_cfg(tmp_path),
            tmp_path / "out",
            corpus,
            captions=str(tmp_path / "captions.parquet"),
        )


def test_list_file_accounts_for_missing_entries_and_directories(corpus, tmp_path):
    (tmp_path / "x.mp4").mkdir()  # a folder named like a clip: unreadable even as root
    listing = tmp_path / "clips.txt"
    listing.write_text(
        "# clips for this run\n"
        f"{os.path.relpath(corpus / 'a_landscape.mp4', tmp_path)}\n"
        f"{corpus / 'b_portrait.mp4'}\n\n"
        f"{corpus / 'b_portrait.mp4'}\n"  # listed twice: still one file
        "x.mp4\n"
        "gone.mp4\n"
    )
    for src in (f"@{listing}", str(listing)):
        out = tmp_path / f"out{len(src)}"
        result = ingest_into(make_cfg(tmp_path), out, src)
        assert result.values == {
            "seen": 4,
            "ingested": 2,
            "quarantined": 2,
            "duplicates": 0,
            "reused": 0,
            "reasons": {"missing": 1, "unreadable": 1},
        }
        assert reasons(out, tmp_path) == {"gone.mp4": "missing", "x.mp4": "unreadable"}


def test_glob_takes_only_matching_files(corpus, tmp_path):
    result = ingest_into(make_cfg(tmp_path), tmp_path / "out", corpus / "*.mp4")
    assert result.values["seen"] == sum(n.endswith(".mp4") and "/" not in n for n in GOOD | BAD)
    assert "d_still.png" not in reasons(tmp_path / "out", corpus)


def test_local_walk_is_in_uri_order(tmp_path):
    for rel in ("b.mp4", "b/x.mp4", "b0.mp4", "a/c/d.mp4", "a.mp4", "B.mp4"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    root, entries = listing.list_source(str(tmp_path))
    uris = [e.uri for e in entries]
    assert root == str(tmp_path)
    assert uris == sorted(uris) and len(uris) == 6


def test_file_and_folder_without_read_permission_are_unreadable(corpus, tmp_path):
    src = tmp_path / "raw"
    (src / "locked_dir").mkdir(parents=True)
    shutil.copy(corpus / "a_landscape.mp4", src / "locked.mp4")
    shutil.copy(corpus / "b_portrait.mp4", src / "locked_dir" / "inner.mp4")
    (src / "locked.mp4").chmod(0)
    (src / "locked_dir").chmod(0)
    try:
        if os.access(src / "locked.mp4", os.R_OK):
            pytest.skip(
                "running as root with CAP_DAC_OVERRIDE: mode 000 does not stop reads "
                "(a folder named x.mp4 covers unreadable in the list-file test)"
            )
        ingest_into(make_cfg(tmp_path), tmp_path / "out", src)
    finally:
        (src / "locked.mp4").chmod(0o644)
        (src / "locked_dir").chmod(0o755)
    expected = {"locked.mp4": "unreadable", "locked_dir": "unreadable"}
    assert reasons(tmp_path / "out", src) == expected


def test_empty_source_writes_empty_tables_and_missing_source_raises(tmp_path):
    (tmp_path / "empty").mkdir()
    result = ingest_into(make_cfg(tmp_path), tmp_path / "out", tmp_path / "empty")
    assert result.values["seen"] == 0
    assert pq.read_table(tmp_path / "out" / "manifest.parquet").schema.equals(mf.MANIFEST_SCHEMA)
    with pytest.raises(storage.StorageNotFound, match="does not exist; pass a directory"):
        ingest_into(make_cfg(tmp_path), tmp_path / "out2", tmp_path / "nowhere")


def test_s3_prefix_is_listed_downloaded_and_probed(corpus, tmp_path, s3_env):
    client, bucket = storage.s3_client(), s3_env
    for name in ("a_landscape.mp4", "k_notes.mp4"):
        client.upload_file(str(corpus / name), bucket, f"raw/{name}")
    client.upload_file(str(corpus / "b_portrait.mp4"), bucket, "elsewhere/b_portrait.mp4")
    result = ingest_into(make_cfg(tmp_path), tmp_path / "out", f"s3://{bucket}/raw")
    assert (result.values["seen"], result.values["ingested"]) == (2, 1)
    row = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()[0]
    assert row["uri"] == f"s3://{bucket}/raw/a_landscape.mp4"
    assert (row["width"], row["height"], row["num_frames"]) == (64, 36, 6)
    etag = client.head_object(Bucket=bucket, Key="raw/a_landscape.mp4")["ETag"].strip('"')
    assert row["source_version"] == f"{row['bytes']}:{etag}"
    bad = pq.read_table(tmp_path / "out" / "quarantine.parquet").to_pylist()[0]
    assert (bad["uri"], bad["reason"]) == (f"s3://{bucket}/raw/k_notes.mp4", "not_media")
    assert tempfile.gettempdir() not in bad["message"]  # no local temp paths in the tables


# --------------------------------------------------------------------------- reusable pieces


def test_probe_file_and_sha256_file_work_on_their_own(corpus):
    found = probe.probe_file(corpus / "g_phone.mp4")
    assert set(found) == set(probe.PROBE_FIELDS)
    assert (found["width"], found["height"], found["rotation"]) == (36, 64, 90)
    data = (corpus / "g_phone.mp4").read_bytes()
    assert probe.sha256_file(corpus / "g_phone.mp4") == hashlib.sha256(data).hexdigest()
    with pytest.raises(probe.Rejected) as info:
        probe.probe_file(corpus / "l_voice.m4a")
    assert info.value.reason == "no_video_stream" and "audio aac" in info.value.detail


MAIN_THAT_MUST_NOT_RERUN = """
import sys
if __name__ != "__main__":  # a spawned worker re-running this script: Airflow's case
    raise SystemExit("the parent's main script was re-run in a probe worker")
from pathlib import Path
from tests.components.steps.test_ingest import encode_video, ingest_into, make_cfg
tmp = Path(sys.argv[1])
(tmp / "raw").mkdir()
for i in range(3):
    encode_video(tmp / "raw" / f"{i}.mp4", 32, 24, seed=i)
result = ingest_into(make_cfg(tmp, workers=2, file_timeout_s=60), tmp / "out", tmp / "raw")
print("ingested", result.values["ingested"])
"""


@pytest.mark.slow  # spawned workers: ~10 s
def test_probe_workers_do_not_rerun_the_parents_main_script(tmp_path):
    """Under Airflow's task runner the main script is ``airflow``, which cannot be imported in a
    child (its database URL is blanked): workers must start without it."""
    import subprocess
    import sys

    script = tmp_path / "main.py"
    script.write_text(MAIN_THAT_MUST_NOT_RERUN)
    repo = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": str(repo), "TESSERA_HOME": str(tmp_path / "home")}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ingested 3" in done.stdout
