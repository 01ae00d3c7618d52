import json

import pytest
import torch

from components.core import artifacts, storage
from components.core.config import load_config
from components.core.media import load_video
from components.core.runner import RunContext, run_step
from components.steps import generate as step
from model.diffusion import FlowConfig
from model.generate import FLOW_CONFIG_NAME
from tests.testing_utils.models import GENERATE, tiny_vae
from tests.testing_utils.step_tester import StepTesterMixin

torch.set_num_threads(1)


@pytest.fixture
def cfg():
    return load_config("tiny", list(GENERATE))


class TestGenerateStep(StepTesterMixin):
    step = step.STEP
    overrides = GENERATE
    bad_config = ("generate.sampler=ddim",)
    bad_config_error = "generate.sampler: 'ddim' is not one of"

    @pytest.fixture(scope="class")
    def step_inputs(self, tiny_model_class):
        return {"model": tiny_model_class, "prompts": ["a red ball"], "aspects": ["16:9", "image"]}

    def test_the_pipeline_samples_by_default(self, step_run):
        entries = json.loads(storage.read_text(step_run.outputs["samples_json"]))
        assert [e["aspect"] for e in entries] == ["16:9", "image"]
        assert entries[0]["size"][0] == step_run.cfg.generate.sample_frames == 5
        assert step.SAMPLE_ASPECTS == ("16:9", "9:16", "1:1", "image")


def test_generate_writes_every_prompt_at_every_aspect(cfg, tiny_model, tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    result = step.run(
        cfg, workdir, tiny_model, ["a red ball", "a blue cube"], ["16:9", "9:16", "image"], frames=4
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
        step.run(cfg, tmp_path, str(tmp_path / "none"), ["x"], ["5:4:3"], frames=5)
    with pytest.raises(ValueError, match="non-empty prompt"):
        step.run(cfg, tmp_path, str(tmp_path / "none"), [], ["1:1"], frames=5)
    with pytest.raises(FileNotFoundError, match="does not exist.*train_vae"):
        step.run(cfg, tmp_path, str(tmp_path / "none"), ["x"], ["1:1"], frames=5)


def test_generate_from_s3_model_through_the_runner(cfg, tiny_model, s3_env, tessera_home):
    uri = f"s3://{s3_env}/models/t2v"
    for part in ("vae", "dit"):
        for path in sorted((storage.local_path(tiny_model) / part).iterdir()):
            storage.upload_file(path, storage.join(uri, part, path.name))
    outputs = run_step(
        step.STEP,
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
    missing = artifacts.model_dir(f"s3://{s3_env}/models/missing")
    with pytest.raises(storage.StorageNotFound, match="no model files"), missing:
        pass


@pytest.mark.slow
def test_generate_with_the_real_text_encoder(cfg, tmp_path):
    """End to end with model.text's bundled MiniLM (D=384), as the CLI runs it."""
    from model.dit import DiT
    from tests.testing_utils.models import tiny_dit_config

    root = tmp_path / "model"
    tiny_vae().save_pretrained(root / "vae")
    DiT(tiny_dit_config(depth=1, text_dim=384)).save_pretrained(root / "dit")
    FlowConfig().to_json(root / "dit" / FLOW_CONFIG_NAME)
    result = step.run(cfg, tmp_path / "work", str(root), ["a red ball"], ["1:1"], frames=1)
    assert result.values == {"num_samples": 1}
    assert load_video(tmp_path / "work" / "samples" / "0_1x1.png").shape == (3, 1, 64, 64)


def test_generate_expands_prompts_and_records_the_expansion(cfg, tiny_model, tmp_path):
    """generate.expand through a real chat endpoint on loopback: the clip is conditioned on the
    expansion, samples.json keeps the typed prompt, the expansion and its metadata."""
    import dataclasses

    from tests.testing_utils.chat_server import ChatServer

    with ChatServer() as server:
        expand = dataclasses.replace(
            cfg.expand, backend="chat", base_url=server.base_url, model_name="tiny"
        )
        expanding = dataclasses.replace(cfg, expand=expand)
        workdir = tmp_path / "work"
        workdir.mkdir()
        step.run(expanding, workdir, tiny_model, ["a red ball"], ["image"], expand=True)
        asked = [m["content"] for m in server.requests[0]["body"]["messages"]]
    (entry,) = json.loads((workdir / "samples.json").read_text())
    assert entry["prompt"] == "a red ball" and asked[-1] == "a red ball"
    assert entry["expanded"].startswith("A wide shot of a red ball")
    assert entry["expansion"]["backend"] == "chat" and entry["expansion"]["kept"]
    assert entry["expansion"]["seed"] == cfg.generate.seed
