"""Edit step (SDEdit): size, frame rate, strength 0 = the VAE round trip, large inputs."""

import json

import pytest
import torch

from components.core import artifacts, storage
from components.core.config import load_config
from components.core.media import load_video, save_video
from components.steps import edit
from tests.testing_utils.models import GENERATE, gradient_video
from tests.testing_utils.step_tester import StepTesterMixin

torch.set_num_threads(1)


@pytest.fixture
def cfg():
    return load_config("tiny", list(GENERATE))


class TestEditStep(StepTesterMixin):
    step = edit.STEP
    overrides = GENERATE
    bad_config = ("generate.steps=many",)
    bad_config_error = "generate.steps: expected an integer"

    @pytest.fixture(scope="class")
    def step_inputs(self, tiny_model_class, tmp_path_factory):
        source = save_video(gradient_video(5, 36, 44), tmp_path_factory.mktemp("edit") / "in.mp4")
        return {
            "model": tiny_model_class,
            "input": str(source),
            "prompt": "a ball",
            "strength": 0.5,
        }


def test_edit_keeps_size_and_frame_rate(cfg, tiny_model, tmp_path):
    source = save_video(gradient_video(5, 36, 44), tmp_path / "in.mp4", fps=8)
    workdir = tmp_path / "work"
    workdir.mkdir()
    result = edit.run(cfg, workdir, tiny_model, str(source), "a green ball", strength=0.5)
    assert result.files == {"video": "edited.mp4", "edit_json": "edit.json"}
    record = json.loads((workdir / "edit.json").read_text())
    assert record["size"] == [5, 36, 44] and record["fps"] == 8 and record["seed"] == 3
    assert load_video(workdir / "edited.mp4").shape == (3, 5, 36, 44)


def test_edit_strength_zero_reconstructs_a_still(cfg, tiny_model, tmp_path):
    source = save_video(gradient_video(1, 36, 44), tmp_path / "in.png")
    workdir = tmp_path / "work"
    workdir.mkdir()
    edit.run(cfg, workdir, tiny_model, str(source), "a green ball", strength=0.0)
    edited = load_video(workdir / "edited.png")
    generator = artifacts.load_generator(cfg, storage.local_path(tiny_model), device="cpu")
    expected = generator.reconstruct(load_video(source))
    assert (edited - expected).abs().max() <= 1 / 127.5 + 1e-6  # PNG: uint8 rounding only


def test_edit_downscales_large_inputs_and_stills(cfg, tiny_model, tmp_path):
    still = save_video(gradient_video(1, 96, 128), tmp_path / "big.png")
    workdir = tmp_path / "work"
    workdir.mkdir()
    result = edit.run(cfg, workdir, tiny_model, still.as_uri(), "a green ball", strength=0.5)
    assert result.files["video"] == "edited.png"
    record = json.loads((workdir / "edit.json").read_text())
    assert record["input_size"] == [1, 96, 128] and record["size"] == [1, 55, 73]
    assert 55 * 73 <= cfg.generate.max_pixels
    with pytest.raises(ValueError, match="strength must be in"):
        edit.run(cfg, workdir, tiny_model, str(still), "x", strength=-0.1)
