import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from components.core import demo_corpus
from components.core.config import load_config
from components.core.demo_corpus import MIN_CONTRAST, PALETTE, background_range
from components.steps import demo_data, prompt_eval
from evaluation.prompt_following import contrasting
from tests.testing_utils.step_tester import StepTesterMixin

torch.set_num_threads(1)

CORPUS = [
    "demo_data.num_clips=24",
    "demo_data.num_images=6",
    "demo_data.base_pixels=2304",
    "demo_data.min_frames=5",
    "demo_data.max_frames=5",
    "demo_data.include_real_clips=false",
    "demo_data.broken_files=false",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    cfg = load_config("tiny", CORPUS)
    workdir = tmp_path_factory.mktemp("corpus")
    demo_data.run(cfg, workdir)
    return workdir


def test_recolour_caption_changes_only_the_colour_word():
    spec = next(
        s
        for s in demo_data.plan_corpus(load_config("tiny", CORPUS).demo_data)
        if len(s.objects) == 1
    )
    caption, _ = demo_corpus.describe(spec)
    obj = json.loads(demo_data._factor_row(spec)["objects"])[0]
    other = next(c for c in PALETTE if c != spec.primary.color)
    recoloured = demo_corpus.recolour_caption(caption, obj, other)
    assert recoloured != caption and f" {other} " in recoloured
    assert recoloured.replace(f" {other} ", f" {spec.primary.color} ", 1) == caption
    with pytest.raises(ValueError, match="unknown object colour"):
        demo_corpus.recolour_caption(caption, obj, "mauve")
    with pytest.raises(ValueError, match="does not describe the object"):
        demo_corpus.recolour_caption("A plain black frame.", obj, other)


def test_select_bases_keeps_captioned_single_object_files_spread_out():
    rows = [{"path": f"f{i:02d}", "num_objects": 1 + (i % 3 == 0)} for i in range(40)]
    captions = {r["path"]: "text" for r in rows if r["path"] != "f01"}
    eligible = [r["path"] for r in rows if r["num_objects"] == 1 and r["path"] != "f01"]
    picked = [r["path"] for r in prompt_eval.select_bases(rows, captions, 4)]
    assert len(picked) == 4 and set(picked) <= set(eligible)
    assert picked[0] == eligible[0] and picked[-1] in eligible[len(eligible) // 2 :]
    assert len(prompt_eval.select_bases(rows, captions, 100)) == len(eligible)


class TestPromptEvalStep(StepTesterMixin):
    step = prompt_eval.STEP
    overrides = (
        *CORPUS,
        "prompt_eval.max_bases=2",
        "prompt_eval.frames=5",
        "generate.steps=2",
        "generate.max_pixels=4096",
    )
    bad_config = ("prompt_eval.max_bases=0",)
    bad_config_error = "prompt_eval needs max_bases >= 1"

    @pytest.fixture(scope="class")
    def step_inputs(self, corpus, tiny_model_class):
        return {
            "model": tiny_model_class,
            "clips": str(corpus / "clips"),
            "captions": str(corpus / "captions.parquet"),
            "factors": str(corpus / "factors.parquet"),
        }

    def test_scores_every_recoloured_variant(self, step_run, corpus):
        out, cfg = step_run.outputs, step_run.cfg
        summary = json.loads(Path(out["result"]).read_text())
        checks = summary["classifier_checks"]
        assert len(checks) == 2 and summary["bases"] == 2
        # the classifier reads the encoded corpus files right: the metric's ceiling is 1
        assert summary["classifier_accuracy_on_corpus"] == 1.0, checks
        rows = {r["path"]: r for r in _factors(corpus)}
        expected = sum(
            len(
                contrasting(
                    PALETTE,
                    background_range(
                        rows[c["path"]]["background"],
                        rows[c["path"]]["background_colors"].split(","),
                    ),
                    MIN_CONTRAST,
                )
            )
            for c in checks
        )
        trials = summary["trials"]
        assert len(trials) == expected == out["trials"]
        assert {t["seed"] for t in trials} == {cfg.generate.seed, cfg.generate.seed + 1}
        assert all(t["asked"] in t["prompt"] for t in trials)
        assert 0.0 <= out["colour_accuracy"] <= 1.0
        grid = Image.open(out["grid"])
        assert grid.height > 0 and grid.width > 0

    def test_the_run_logs_the_classifier_ceiling(self, step_run):
        import mlflow

        from components.core import tracking

        client = mlflow.MlflowClient(tracking_uri=tracking.tracking_uri())
        metrics = client.get_run(step_run.outputs["mlflow_run_id"]).data.metrics
        assert metrics["colour_classifier_accuracy"] == 1.0


def _factors(corpus):
    import pyarrow.parquet as pq

    return pq.read_table(corpus / "factors.parquet").to_pylist()


def test_run_says_when_the_sidecar_is_not_a_corpus(corpus, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bogus = tmp_path / "factors.parquet"
    pq.write_table(pa.table({"path": ["a.mp4"]}), bogus)
    with pytest.raises(ValueError, match="not a demo-corpus factor sidecar"):
        prompt_eval.run(
            load_config("tiny"),
            tmp_path,
            str(tmp_path),
            str(corpus / "clips"),
            str(corpus / "captions.parquet"),
            str(bogus),
        )
