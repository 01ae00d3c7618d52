"""The evaluator's training step: its data, its checks, and real DeepSpeed runs on the tiny
corpus (committed outputs, a loadable scorer, the held-out report, resume, refusal)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from components.core import artifacts, trainer
from components.core.config import ConfigError, load_config
from components.core.trainer import launch
from components.steps import train_evaluator
from components.steps.train_evaluator import data, validation, worker
from model.evaluator import VideoTextModel
from tests.testing_utils.data import make_corpus
from tests.testing_utils.models import TinyText
from tests.testing_utils.step_tester import StepTesterMixin

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


# --------------------------------------------------------------------------- data


def test_training_clips_are_the_captioned_train_split(manifest):
    items = data.read_items(manifest)
    te = load_config("tiny").train_evaluator
    picked = data.select(items, te)
    assert picked["train"] and all(i.captioned and i.clip.split == "train" for i in picked["train"])
    assert not any(i.clip.name.startswith("real_") for i in picked["train"])  # uncaptioned
    assert picked["val_source"] == "train"  # the tiny corpus has no captioned val clips
    balanced = trainer.balance_kinds(picked["train"], 0.8, lambda i: i.clip.kind)
    assert sum(i.clip.kind == "video" for i in balanced) / len(balanced) >= 0.8


def test_views_are_native_aspect_crops_keyed_by_position(manifest):
    te = load_config("tiny", ["train_evaluator.crop_scale=0.8"]).train_evaluator
    items = data.select(data.read_items(manifest), te)["train"]
    states = {t: torch.randn(4) for t in data.texts_of(items)}
    ds = data.ViewDataset(items, states, te, seed=0)
    for index, item in enumerate(items):
        view = ds.view(position=index, index=index)
        _, t, h, w = view["video"].shape
        assert t == (1 if item.clip.kind == "image" else min(te.frames, item.clip.num_frames))
        aspect = item.clip.width / item.clip.height
        assert abs(w / h - aspect) < 0.15 * aspect  # cropped, never squashed
        assert min(h, w) >= te.short_side * 0.8 - 1  # at least crop_scale of the short side
    again = data.ViewDataset(items, states, te, seed=0)
    assert torch.equal(again.view(5, 0)["video"], ds.view(5, 0)["video"])
    batch = data.collate([ds.view(p, p % len(items)) for p in range(3)])
    assert batch["tokens"].shape == (3, 1, 4) and batch["mask"].all()


def test_caption_states_are_mean_pooled_and_cached(tmp_path):
    encoder = TinyText(max_length=12)
    texts = ["a red ball", "a blue square on black", "a red ball slides left quickly"]
    pooled = data.pooled_states(encoder, texts)
    states, mask = encoder.encode(texts)
    w = mask.float()[..., None]
    assert torch.allclose(pooled, (states * w).sum(1) / w.sum(1), atol=1e-6)
    key = data.states_key(encoder, texts)
    data.save_states(tmp_path / "s.safetensors", texts, pooled, key)
    loaded = data.load_states(tmp_path / "s.safetensors", key)
    assert torch.equal(loaded[texts[1]], pooled[1])
    assert data.load_states(tmp_path / "s.safetensors", "stale") is None


@pytest.mark.slow
def test_bucketed_minilm_states_equal_full_length_ones():
    encoder = artifacts.load_text_encoder(load_config("tiny"))
    texts = ["red star", "A wide 16:9 landscape still image of one object on plain navy. " * 3]
    pooled = data.pooled_states(encoder, texts)  # encoded at 16 and 64 tokens
    states, mask = encoder.encode(texts)  # at max_length (128)
    w = mask.float()[..., None]
    assert torch.allclose(pooled, (states * w).sum(1) / w.sum(1), atol=1e-4)


# --------------------------------------------------------------------------- checks


def test_retrieval_and_clip_score_against_chance():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((20, 8))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    perfect = validation.retrieval(v, v)
    assert perfect["r1"] == 1 and perfect["chance_r1"] == 0.05 and perfect["validated"]
    assert perfect["p_r1"] == pytest.approx(0.05**20)
    noise = rng.standard_normal((20, 8))
    blind = validation.retrieval(v, noise / np.linalg.norm(noise, axis=1, keepdims=True))
    assert not blind["validated"]
    score = validation.clip_score(v, v, seed=0)
    assert score["matching"] == pytest.approx(1.0) and score["margin"] > 0.5 and score["validated"]
    order = validation.derangement(7, seed=3)
    assert sorted(order) == list(range(7)) and all(order != np.arange(7))
    assert validation.binomial_tail(10, 0.5, 0) == 1.0
    assert validation.binomial_tail(3, 0.5, 3) == pytest.approx(0.125)


def test_halves_are_disjoint_and_stratified():
    videos = [np.zeros((1 if i % 3 else 5, 2, 2, 3), np.uint8) for i in range(11)]
    a, b = validation.halves(videos, seed=0)
    assert sorted(a + b) == list(range(11)) and not set(a) & set(b) and abs(len(a) - len(b)) <= 1
    stills = [i for i in range(11) if i % 3]
    assert abs(len(set(a) & set(stills)) - len(set(b) & set(stills))) <= 1
    assert validation.monotonic([0, 1, 2]) and not validation.monotonic([0, 2, 2])


def test_config_errors_name_the_setting():
    with pytest.raises(ConfigError, match="strengths must be increasing"):
        load_config("tiny", ["train_evaluator.strengths=[1.0, 0.5]"])
    with pytest.raises(ConfigError, match="micro_batch must be >= 2"):
        load_config("tiny", ["train_evaluator.train.micro_batch=1"])
    with pytest.raises(ValueError, match="unknown evaluator size 'evaluator-huge'"):
        train_evaluator.check(load_config("tiny", ["train_evaluator.size=evaluator-huge"]))


# --------------------------------------------------------------------------- real runs


@pytest.mark.slow
class TestTrainEvaluatorStep(StepTesterMixin):
    """The tiny profile: seconds of training, then every check on the (train-sourced) clips."""

    step = train_evaluator.STEP
    bad_config = ("train_evaluator.size=evaluator-huge",)
    bad_config_error = "unknown evaluator size 'evaluator-huge'"

    @pytest.fixture(scope="class")
    def step_inputs(self, manifest):
        return {"manifest": manifest}

    def test_the_saved_evaluator_loads_as_the_evaluate_step_loads_it(self, step_run):
        out = step_run.outputs
        scorer = artifacts.load_evaluator(out["evaluator"], step_run.cfg)
        assert scorer.sha256 == out["sha256"] and scorer.name == "domain"
        assert scorer.model.feature_scale.tolist() == pytest.approx(out["feature_scales"])
        video = np.random.default_rng(0).integers(0, 256, (5, 30, 40, 3), dtype=np.uint8)
        assert scorer.features([video]).shape == (1, scorer.model.config.fvd_dim)
        assert scorer.embed_text(["a red ball"]).shape == (1, scorer.embed_dim)
        assert VideoTextModel.from_pretrained(out["evaluator"]).config.short_side == 16

    def test_the_report_has_every_check(self, step_run):
        out = step_run.outputs
        report = json.loads(Path(out["validation"]).read_text())
        assert report["val_source"] == "train" == out["val_source"]
        assert set(report["checks"]) == {
            "retrieval",
            "clip_score",
            "fvd_self",
            "fvd_noise",
            "fvd_blur",
            "fvd_shuffle",
        }
        assert report["validated"] == all(report["checks"][k] for k in validation.REQUIRED)
        assert out["validated"] == report["validated"]
        fvd = report["fvd"]
        assert fvd["deterministic"] and fvd["self"] == 0
        assert set(report["fvd_by_layer"]) == {"features", "semantic", "embedding"}
        for kind in validation.KINDS:
            assert [r["strength"] for r in fvd[kind]["strengths"]] == [0.5, 1.0]
            assert len(out[f"fvd_{kind}"]) == 2
        assert 0 <= out["r1"] <= 1 and out["chance_r1"] == 1 / report["retrieval"]["n"]
        assert out["steps"] == step_run.cfg.train_evaluator.train.steps

    def test_logs_training_and_checks(self, step_run):
        import mlflow

        from components.core import tracking

        client = mlflow.MlflowClient(tracking_uri=tracking.tracking_uri())
        run_id = step_run.outputs["mlflow_run_id"]
        losses = client.get_metric_history(run_id, "train/loss")
        assert [m.step for m in losses] == [2, 4, 6, 8]
        assert client.get_metric_history(run_id, "val_r1")
        metrics = client.get_run(run_id).data.metrics
        assert {"fvd_domain_noise_1", "fvd_domain_halves", "clip_score_domain_margin"} <= set(
            metrics
        )
        artifacts_logged = {a.path for a in client.list_artifacts(run_id)}
        assert train_evaluator.VALIDATION_NAME in artifacts_logged


def _launch(cfg, manifest: str, out: Path, states: Path, **payload) -> dict:
    body = trainer.build_payload(
        cfg, out, out / "ckpt", worker.RESULT_NAME, manifest=manifest, text_states=str(states)
    )
    launch(
        "components.steps.train_evaluator.worker:worker",
        {**body, **payload},
        1,
        out / "train.log",
    )
    result = out / worker.RESULT_NAME
    return {
        "history": json.loads((out / worker.HISTORY_NAME).read_text()),
        "result": json.loads(result.read_text()) if result.exists() else None,
    }


@pytest.mark.slow
def test_resume_continues_steps_and_data(manifest, tmp_path):
    cfg = load_config(
        "tiny",
        ["train_evaluator.train.steps=6", "train_evaluator.train.checkpoint_every=2"],
    )
    picked = data.select(data.read_items(manifest), cfg.train_evaluator)
    texts = data.texts_of([*picked["train"], *picked["val"]])
    encoder = TinyText()
    states = tmp_path / "states.safetensors"
    data.save_states(states, texts, data.pooled_states(encoder, texts), "k")
    first = _launch(cfg, manifest, tmp_path, states, stop_at=3)  # pre-empted after step 3
    assert [h["step"] for h in first["history"]] == [1, 2, 3] and first["result"] is None
    second = _launch(cfg, manifest, tmp_path, states)  # resumes from the step-3 checkpoint
    assert [h["step"] for h in second["history"]] == [4, 5, 6]
    batch = cfg.train_evaluator.train.micro_batch
    positions = [p for h in first["history"] + second["history"] for p in h["positions"]]
    assert positions == list(range(6 * batch))  # the data stream continues where it stopped
    result = second["result"]
    assert result["steps"] == 6 and len(result["feature_scales"]) == 3
    assert (tmp_path / worker.EVALUATOR_DIR / "model.safetensors").exists()


@pytest.mark.slow
def test_require_validated_refuses_an_evaluator_that_fails(manifest, tmp_path, monkeypatch):
    from components.core import runner

    monkeypatch.setenv("TESSERA_HOME", str(tmp_path))
    monkeypatch.setattr(artifacts, "load_text_encoder", lambda cfg: TinyText())
    cfg = load_config(
        "tiny",
        [
            "train_evaluator.require_validated=true",
            "train_evaluator.train.steps=2",
            # a 0.01 blur is below a tenth of a pixel: an unchanged copy, so the blur check fails
            "train_evaluator.strengths=[0.01]",
        ],
    )
    ctx = runner.RunContext.new("cli", track=False)
    with pytest.raises(train_evaluator.EvaluatorNotValidated, match="failed its held-out checks"):
        runner.run_in_process(train_evaluator.STEP, cfg, ctx, manifest=manifest)
    assert not runner.committed_outputs(runner.step_uri(cfg, ctx.run_id, "train_evaluator"))
