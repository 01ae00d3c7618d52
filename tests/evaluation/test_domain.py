"""The in-domain evaluator as a metric sees it: both protocols (FVD features, video-text
scorer), any clip size and length, input order kept, and the loader (local and S3)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from components.core import artifacts, storage
from components.core.config import load_config
from evaluation import clip_score, fvd
from evaluation.domain import DomainScorer, to_tensor
from model.evaluator import EVALUATOR_SIZES, VideoTextModel
from tests.testing_utils.models import TEXT_DIM, TinyText

torch.set_num_threads(1)


def _model(seed: int = 0) -> VideoTextModel:
    torch.manual_seed(seed)
    return VideoTextModel(EVALUATOR_SIZES.config("evaluator-tiny", text_dim=TEXT_DIM)).eval()


def _video(frames: int, height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


@pytest.fixture
def scorer() -> DomainScorer:
    return DomainScorer(_model(), TinyText(), "ab" * 32, max_frames=6, batch_size=2)


def test_it_satisfies_both_protocols(scorer):
    assert isinstance(scorer, fvd.VideoFeatureExtractor)
    assert isinstance(scorer, clip_score.VideoTextScorer)
    assert scorer.name == "domain" and scorer.num_frames == 0 and scorer.sha256 == "ab" * 32


def test_features_of_any_size_in_input_order(scorer):
    videos = [
        _video(1, 36, 64, 0),  # 16:9 still
        _video(9, 64, 36, 1),  # 9:16 video, cut to max_frames=6
        _video(4, 30, 30, 2),
        _video(1, 36, 64, 3),  # batched with the first
        _video(12, 20, 90, 4),
    ]
    feats = scorer.features(videos)
    assert feats.shape == (5, scorer.dim) and feats.dtype == np.float64
    assert scorer.dim == scorer.model.config.fvd_dim
    one_by_one = np.concatenate([scorer.features([v]) for v in videos])
    np.testing.assert_allclose(feats, one_by_one, atol=1e-5)
    assert np.array_equal(scorer.features(videos), feats)  # deterministic
    cut = scorer.features([videos[1][:6]])
    np.testing.assert_allclose(feats[1:2], cut, atol=1e-6)  # only the first max_frames count
    for layer, dim in (("semantic", 32), ("embedding", 16)):
        other = DomainScorer(scorer.model, scorer.text_encoder, "x", feature_layer=layer)
        assert other.features(videos).shape == (5, dim) == (5, other.dim)


def test_embeddings_are_normalised_and_match_the_model(scorer):
    video = _video(5, 24, 40, 7)
    emb = scorer.embed_video(video)
    assert emb.shape == (1, scorer.embed_dim) and emb.dtype == np.float32
    assert np.linalg.norm(emb, axis=1) == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():
        direct = scorer.model.encode_video(to_tensor(video)[None]).numpy()
    np.testing.assert_allclose(emb, direct, atol=1e-5)
    texts = scorer.embed_text(["a red ball", "a blue square", "a red ball"])
    assert texts.shape == (3, scorer.embed_dim)
    assert np.linalg.norm(texts, axis=1) == pytest.approx(1.0, abs=1e-5)
    assert np.allclose(texts[0], texts[2]) and not np.allclose(texts[0], texts[1])
    sims = scorer.similarity(video, ["a red ball", "a blue square"])
    np.testing.assert_allclose(sims, (texts[:2] @ emb.T)[:, 0], atol=1e-5)
    assert scorer.embed_text([]).shape == (0, scorer.embed_dim)


def test_bad_inputs_are_refused(scorer):
    with pytest.raises(ValueError, match="uint8"):
        scorer.features([np.zeros((2, 8, 8, 3), np.float32)])
    with pytest.raises(ValueError, match="no videos"):
        scorer.features([])
    with pytest.raises(TypeError, match="list of texts"):
        scorer.embed_text("a red ball")
    with pytest.raises(ValueError, match="16-wide tokens but the evaluator's text tower takes 8"):
        model = VideoTextModel(EVALUATOR_SIZES.config("evaluator-tiny", text_dim=8))
        DomainScorer(model, TinyText(), "x")
    with pytest.raises(ValueError, match="feature_layer"):
        DomainScorer(_model(), TinyText(), "x", feature_layer="logits")


@pytest.fixture
def tiny_text(monkeypatch):
    seen = []

    def load(cfg):
        seen.append((cfg.text.encoder, cfg.text.max_length))
        return TinyText()

    monkeypatch.setattr(artifacts, "load_text_encoder", load)
    return seen


def test_load_evaluator_from_a_step_directory(tmp_path, tiny_text):
    model = _model(seed=1)
    model.save_pretrained(tmp_path / "evaluator")
    cfg = load_config("tiny")
    for uri in (str(tmp_path), str(tmp_path / "evaluator")):  # the step dir or the model dir
        scorer = artifacts.load_evaluator(uri, cfg)
        digest = hashlib.sha256((tmp_path / "evaluator" / "model.safetensors").read_bytes())
        assert scorer.sha256 == digest.hexdigest()
        assert scorer.sha256 == clip_score.weights_sha256(tmp_path / "evaluator")
        assert scorer.max_frames == cfg.train_evaluator.max_frames
        video = _video(3, 20, 30, 0)
        np.testing.assert_array_equal(
            scorer.features([video]), DomainScorer(model, TinyText(), "x").features([video])
        )
    # the text encoder it was trained with, whatever cfg.text says now
    assert tiny_text[-1] == (model.config.text_encoder, model.config.text_max_length)
    with pytest.raises(FileNotFoundError, match="no evaluator"):
        artifacts.load_evaluator(str(tmp_path / "nowhere"), cfg)


def test_load_evaluator_from_s3(tmp_path, s3_env, tiny_text):
    model = _model(seed=2)
    model.save_pretrained(tmp_path / "evaluator")
    prefix = f"s3://{s3_env}/runs/r1/train_evaluator"
    for path in (tmp_path / "evaluator").iterdir():
        storage.upload_file(path, storage.join(prefix, "evaluator", path.name))
    scorer = artifacts.load_evaluator(prefix, load_config("tiny"), max_frames=3)
    assert scorer.sha256 == clip_score.weights_sha256(tmp_path / "evaluator")
    assert scorer.max_frames == 3
    assert torch.equal(scorer.model.feature_scale, model.feature_scale)
