import json

import pytest
import torch

from components import generate as step
from components import storage
from components.config import load_config
from components.runner import RunContext, run_step
from model.diffusion import FlowConfig
from model.generate import load_video, save_flow_config, save_video
from tests.model.test_generate import TinyText, smooth_video, tiny_dit, tiny_vae

torch.set_num_threads(1)


@pytest.fixture
def cfg():
    return load_config(
        "tiny",
        [
            "generate.steps=2",
            "generate.max_pixels=4096",
            "generate.max_frames=9",
            "generate.seed=3",
        ],
    )


@pytest.fixture
def model_uri(tmp_path, monkeypatch):
    """A tiny trained-model directory (vae/ + dit/ + flow.json); the text encoder stubbed."""
    root = tmp_path / "model"
    tiny_vae().save_pretrained(root / "vae")
    tiny_dit().save_pretrained(root / "dit")
    save_flow_config(FlowConfig(), root / "dit")
    monkeypatch.setattr(step, "load_text_encoder", lambda cfg: TinyText())
    return str(root)


def test_generate_writes_every_prompt_at_every_aspect(cfg, model_uri, tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    result = step.generate(
        cfg, workdir, model_uri, ["a red ball", "a blue cube"], ["16:9", "9:16", "image"], frames=4
    )
    assert result.values == {"num_samples": 6}
    assert result.files == {"samples": "samples", "samples_json": "samples.json"}
    entries = json.loads((workdir / "samples.json").read_text())
    assert [(e["index"], e["aspect"]) for e in entries] == [
        (i, a) for i in (0, 1) for a in ("16:9", "9:16", "image")
    ]
    by_name = {e["path"]: e for e in entries}
    assert set(by_name) == {
        "samples/0_16x9.mp4",
        "samples/0_9x16.mp4",
        "samples/0_image.png",
        "samples/1_16x9.mp4",
        "samples/1_9x16.mp4",
        "samples/1_image.png",
    }
    assert by_name["samples/0_16x9.mp4"]["size"] == [5, 48, 80]  # 4 frames round up to 5
    assert by_name["samples/1_image.png"]["size"] == [1, 64, 64]
    assert by_name["samples/1_image.png"]["seed"] == 4  # generate.seed + prompt index
    for entry in entries:
        assert load_video(workdir / entry["path"]).shape[1:] == tuple(entry["size"])


def test_generate_rejects_bad_inputs_before_loading(cfg, tmp_path):
    with pytest.raises(ValueError, match="unknown aspect"):
        step.generate(cfg, tmp_path, str(tmp_path / "none"), ["x"], ["5:4:3"], frames=5)
    with pytest.raises(ValueError, match="non-empty prompt"):
        step.generate(cfg, tmp_path, str(tmp_path / "none"), [], ["1:1"], frames=5)
    with pytest.raises(FileNotFoundError, match="does not exist.*train_vae"):
        step.generate(cfg, tmp_path, str(tmp_path / "none"), ["x"], ["1:1"], frames=5)


def test_generate_from_s3_model_through_the_runner(cfg, model_uri, s3_env, tessera_home):
    uri = f"s3://{s3_env}/models/t2v"
    for part in ("vae", "dit"):
        for path in sorted((storage.local_path(model_uri) / part).iterdir()):
            storage.upload_file(path, storage.join(uri, part, path.name))
    outputs = run_step(
        "generate",
        step.generate,
        cfg,
        RunContext.new("test", track=False),
        model=uri,
        prompts=["a red ball"],
        aspects=["1:1"],
        frames=1,
    )
    assert outputs["num_samples"] == 1
    entries = json.loads(storage.read_text(outputs["samples_json"]))
    assert entries[0]["path"] == "samples/0_1x1.png"
    missing = step.model_dir(f"s3://{s3_env}/models/missing")
    with pytest.raises(storage.StorageNotFound, match="no model files"), missing:
        pass


def test_edit_keeps_size_and_frame_rate(cfg, model_uri, tmp_path):
    source = save_video(smooth_video(5, 36, 44), tmp_path / "in.mp4", fps=8)
    workdir = tmp_path / "work"
    workdir.mkdir()
    result = step.edit(cfg, workdir, model_uri, str(source), "a green ball", strength=0.5)
    assert result.files == {"video": "edited.mp4", "edit_json": "edit.json"}
    record = json.loads((workdir / "edit.json").read_text())
    assert record["size"] == [5, 36, 44] and record["fps"] == 8 and record["seed"] == 3
    assert load_video(workdir / "edited.mp4").shape == (3, 5, 36, 44)


def test_edit_strength_zero_reconstructs_a_still(cfg, model_uri, tmp_path):
    source = save_video(smooth_video(1, 36, 44), tmp_path / "in.png")
    workdir = tmp_path / "work"
    workdir.mkdir()
    step.edit(cfg, workdir, model_uri, str(source), "a green ball", strength=0.0)
    edited = load_video(workdir / "edited.png")
    generator = step.load_generator(cfg, storage.local_path(model_uri), device="cpu")
    expected = generator.reconstruct(load_video(source))
    assert (edited - expected).abs().max() <= 1 / 127.5 + 1e-6  # PNG: uint8 rounding only


def test_edit_downscales_large_inputs_and_stills(cfg, model_uri, tmp_path):
    still = save_video(smooth_video(1, 96, 128), tmp_path / "big.png")
    workdir = tmp_path / "work"
    workdir.mkdir()
    result = step.edit(cfg, workdir, model_uri, still.as_uri(), "a green ball", strength=0.5)
    assert result.files["video"] == "edited.png"
    record = json.loads((workdir / "edit.json").read_text())
    assert record["input_size"] == [1, 96, 128] and record["size"] == [1, 55, 73]
    assert 55 * 73 <= cfg.generate.max_pixels
    with pytest.raises(ValueError, match="strength must be in"):
        step.edit(cfg, workdir, model_uri, str(still), "x", strength=-0.1)


@pytest.mark.slow
def test_generate_with_the_real_text_encoder(cfg, tmp_path):
    """End to end with model.text's bundled MiniLM (D=384), as the CLI runs it."""
    from model.dit import DiT, DiTConfig

    root = tmp_path / "model"
    tiny_vae().save_pretrained(root / "vae")
    DiT(
        DiTConfig(hidden_size=32, depth=1, num_heads=2, in_channels=4, text_dim=384)
    ).save_pretrained(root / "dit")
    save_flow_config(FlowConfig(), root / "dit")
    result = step.generate(cfg, tmp_path / "work", str(root), ["a red ball"], ["1:1"], frames=1)
    assert result.values == {"num_samples": 1}
    assert load_video(tmp_path / "work" / "samples" / "0_1x1.png").shape == (3, 1, 64, 64)
