"""Video and image files: mp4 / PNG round trips, odd sizes, clear errors, side-by-side previews."""

import av
import pytest
import torch

from components.core.media import fit_size, load_video, save_video, usable_frames, write_comparison
from tests.testing_utils.models import gradient_video


def test_save_load_mp4_round_trip(tmp_path):
    video = gradient_video(5, 48, 80)
    path = save_video(video, tmp_path / "clip.mp4", fps=8)
    assert path == tmp_path / "clip.mp4" and path.stat().st_size > 0
    loaded = load_video(path)
    assert loaded.shape == video.shape
    assert (loaded - video).abs().mean() < 0.03
    assert load_video(path, max_frames=2).shape == (3, 2, 48, 80)


def test_save_load_png_and_odd_sizes(tmp_path):
    image = gradient_video(1, 21, 30)
    path = save_video(image, tmp_path / "still.mp4")
    assert path.suffix == ".png"  # one frame is written as a lossless PNG
    loaded = load_video(path)
    assert loaded.shape == image.shape
    assert (loaded - image).abs().max() <= 1 / 127.5 + 1e-6  # uint8 quantisation only
    odd = save_video(gradient_video(3, 21, 31), tmp_path / "odd")
    assert load_video(odd).shape == (3, 3, 22, 32)  # yuv420p: padded to even sides


def test_load_video_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_video(tmp_path / "nope.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    with pytest.raises(ValueError, match="not a readable video"):
        load_video(bad)
    with pytest.raises(ValueError, match=r"\(3, T, H, W\)"):
        save_video(torch.zeros(1, 3, 1, 8, 8), tmp_path / "x.png")


def test_comparison_video_has_three_panels(tmp_path):
    video = torch.rand(3, 5, 18, 22) * 2 - 1
    path = write_comparison(tmp_path / "cmp.mp4", video, video * 0.5, fps=8)
    with av.open(str(path)) as box:
        decoded = list(box.decode(video=0))
    assert len(decoded) == 5 and (decoded[0].width, decoded[0].height) == (66, 18)


def test_geometry_keeps_aspect_and_never_upscales():
    assert fit_size(64, 36, 4096, 8) == ((64, 36), (64, 32))  # native, rows cropped
    assert fit_size(1280, 720, 256 * 256, 8) == ((341, 192), (336, 192))
    assert fit_size(720, 1280, 256 * 256, 8) == ((192, 341), (192, 336))
    assert fit_size(6, 40, 4096, 8) == ((6, 40), (6, 40))  # a side below the factor: kept
    assert [usable_frames(n, 9, 4) for n in (1, 4, 5, 8, 9, 30)] == [1, 1, 5, 5, 9, 9]
    assert usable_frames(30, 0, 4) == 29  # 0: no limit
