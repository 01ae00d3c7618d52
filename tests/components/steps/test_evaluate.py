import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from components.core import demo_corpus, media
from components.core.config import load_config
from components.core.demo_corpus import MIN_CONTRAST, PALETTE, background_range
from components.steps import demo_data, evaluate, ingest
from components.steps.evaluate import colour, prompts
from evaluation import framing
from evaluation.prompt_following import contrasting
from tests.testing_utils.models import TEXT_DIM
from tests.testing_utils.step_tester import StepTesterMixin

torch.set_num_threads(1)
ARTIFACTS = Path(__file__).resolve().parents[3] / "var" / "test-artifacts" / "browser"

CORPUS = [
    "demo_data.num_clips=24",
    "demo_data.num_images=6",
    "demo_data.base_pixels=2304",
    "demo_data.min_frames=5",
    "demo_data.max_frames=9",
    "demo_data.include_real_clips=false",
    "demo_data.broken_files=false",
    "ingest.val_fraction=0.4",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    cfg = load_config("tiny", CORPUS)
    root = tmp_path_factory.mktemp("corpus")
    (root / "raw").mkdir()
    (root / "ingest").mkdir()
    demo_data.run(cfg, root / "raw")
    ingest.run(
        cfg,
        root / "ingest",
        str(root / "raw" / "clips"),
        captions=str(root / "raw" / "captions.parquet"),
        previous="",
    )
    return root


@pytest.fixture(scope="module")
def tiny_evaluator(tmp_path_factory):
    from model.evaluator import build_evaluator

    torch.manual_seed(0)
    model = build_evaluator("evaluator-tiny", text_dim=TEXT_DIM)
    path = tmp_path_factory.mktemp("evaluator") / "evaluator"
    model.save_pretrained(path)
    return str(path)


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
    picked = [r["path"] for r in colour.select_bases(rows, captions, 4)]
    assert len(picked) == 4 and set(picked) <= set(eligible)
    assert picked[0] == eligible[0] and picked[-1] in eligible[len(eligible) // 2 :]
    assert len(colour.select_bases(rows, captions, 100)) == len(eligible)


def test_framing_classifier_agrees_with_the_renderer_on_corpus_files(corpus):
    """The ground truth comes from the renderer's geometry; the classifier reads the encoded
    files. Both cut and uncut clips must occur, or the check proves nothing."""
    rows = _factors(corpus)
    predicted, truth = [], []
    for row in rows:
        frames = media.to_uint8(media.load_video(corpus / "raw" / "clips" / row["path"]))
        background = background_range(row["background"], row["background_colors"].split(","))
        predicted.append(
            framing.main_object_cut(frames, PALETTE, background, row["primary_color"]).cut
        )
        truth.append(row["primary_cut"])
    assert 0 < sum(truth) < len(truth)
    check = framing.ClassifierCheck.of(predicted, truth)
    assert check.accuracy >= 0.9, check


def test_framing_classifier_on_drawn_frames():
    frames = np.full((3, 20, 30, 3), 12, np.uint8)  # black backdrop
    frames[:, 8:12, 10:14] = PALETTE["red"]  # inside
    black = ((12.0, 12.0, 12.0), (12.0, 12.0, 12.0))
    assert not framing.main_object_cut(frames, PALETTE, black, "red").cut
    frames[2, 0:3, 0:4] = PALETTE["red"]  # touches the corner in the last frame
    vote = framing.main_object_cut(frames, PALETTE, black, "red")
    assert vote.cut and vote.frames_cut == 1
    frames[:, 0:3, 20:24] = PALETTE["blue"]  # another colour on the border does not count
    assert framing.main_object_cut(frames, PALETTE, black, "red").frames_cut == 1
    with pytest.raises(ValueError, match="unknown object colour"):
        framing.main_object_cut(frames, PALETTE, black, "mauve")


def test_wilson_interval():
    low, high = framing.wilson_interval(30, 100)
    assert 0.21 < low < 0.22 and 0.39 < high < 0.40
    assert framing.wilson_interval(0, 10)[0] == pytest.approx(0.0, abs=1e-12)
    assert all(math.isnan(v) for v in framing.wilson_interval(0, 0))


def test_domain_prompts_follow_the_corpus_grammar_per_aspect():
    class Sizes:
        def video_size(self, aspect, frames):
            return {"16:9": (9, 36, 64), "9:16": (9, 64, 36), "1:1": (9, 48, 48)}.get(
                aspect, (1, 48, 48)
            )

    items = prompts.load("domain", demo=True).items(Sizes(), ("16:9", "9:16", "image"), 9, 0)
    first = [i for i in items if i.prompt_id == "d0"]
    assert [i.aspect for i in first] == ["16:9", "9:16", "image"]
    assert "wide 16:9 landscape video" in first[0].prompt
    assert "tall 9:16 portrait video" in first[1].prompt
    assert "still image" in first[2].prompt and first[2].request["frames"] == 1
    assert all(i.request["seed"] == 0 for i in first)
    assert all(PALETTE[i.factors["color"]] for i in items)
    general = prompts.load("auto", demo=False)
    assert general.name == "general" and not general.domain and len(general.entries) >= 8
    with pytest.raises(FileNotFoundError, match="evaluate.prompts"):
        prompts.load("nonexistent.txt", demo=False)


class TestEvaluateStep(StepTesterMixin):
    step = evaluate.STEP
    overrides = (
        *CORPUS,
        "evaluate.max_bases=2",
        "evaluate.colour_frames=5",
        "evaluate.frames=5",
        "evaluate.max_real=4",
        "evaluate.recon_clips=2",
        "evaluate.resamples=20",
        "evaluate.framing_checks=8",
        "evaluate.aspects=['16:9',image]",
        "generate.steps=2",
        "generate.max_pixels=1024",
    )
    bad_config = ("evaluate.aspects=[sideways]",)
    bad_config_error = "unknown aspect 'sideways'"

    @pytest.fixture(scope="class")
    def step_inputs(self, corpus, tiny_model_class, tiny_evaluator):
        return {
            "manifest": str(corpus / "ingest" / "manifest.parquet"),
            "model": tiny_model_class,
            "evaluator": tiny_evaluator,
            "clips": str(corpus / "raw" / "clips"),
            "captions": str(corpus / "raw" / "captions.parquet"),
            "factors": str(corpus / "raw" / "factors.parquet"),
        }

    def test_every_metric_carries_its_extractor_and_an_interval(self, step_run):
        summary = json.loads(Path(step_run.outputs["result"]).read_text())
        m = summary["metrics"]
        for name in ("fvd_domain", "clip_score_domain", "clip_score_domain_real", "recon_psnr"):
            assert math.isfinite(m[name]), name
            assert m[f"{name}_low"] <= m[f"{name}_high"], name
        assert m["fvd_domain_n_real"] == m["fvd_domain_n_fake"] == 4
        assert (
            set(summary["extractors"]) == {"domain"} and len(summary["extractors"]["domain"]) == 64
        )
        assert not any(k.startswith(("fvd_i3d", "clip_score_hfclip")) for k in m)
        assert any("fewer than the protocol's 2048" in n for n in summary["notes"])

    def test_colour_following_scores_every_recoloured_variant(self, step_run, corpus):
        out, cfg = step_run.outputs, step_run.cfg
        summary = json.loads(Path(out["result"]).read_text())["colour_following"]
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
        assert len(trials) == expected == out["colour_trials"]
        assert {t["seed"] for t in trials} == {cfg.generate.seed, cfg.generate.seed + 1}
        assert all(t["asked"] in t["prompt"] for t in trials)
        assert summary["accuracy_low"] <= summary["accuracy"] <= summary["accuracy_high"]
        assert Image.open(out["colour_grid"]).width > 0

    def test_framing_and_prompt_table(self, step_run):
        summary = json.loads(Path(step_run.outputs["result"]).read_text())
        f = summary["framing"]
        assert f["framing_clips"] == 16  # 8 domain prompts x 2 aspects
        assert 0 <= f["framing_cut_share"] <= 1 and f["framing_classifier_n"] == 8
        rows = summary["prompts"]
        assert len(rows) == 16 and {r["aspect"] for r in rows} == {"16:9", "image"}
        assert all("clip_score_domain" in r and "cut_by_frame" in r for r in rows)
        step_dir = Path(step_run.outputs["report"]).parent
        assert all((step_dir / r["file"]).exists() for r in rows)

    def test_report_is_self_contained(self, step_run):
        page = Path(step_run.outputs["report"]).read_text()
        assert 'id="metrics"' in page and "fvd_domain" in page and "colour_accuracy" in page
        assert page.count("data:video/webm;base64,") >= 8 and "data:image/png;base64," in page
        assert "http://" not in page and "https://" not in page  # nothing to fetch
        assert "dataset rev" in page or "git sha" in page

    @pytest.mark.slow
    def test_report_seen_in_a_browser(self, step_run):
        """Headless Chromium, offline: no console error, every image and video plays, the metric
        table is there. The screenshot is kept in var/test-artifacts/browser/."""
        from tests.testing_utils import browser

        shot = ARTIFACTS / "evaluate_report.png"
        with browser.open_page(Path(step_run.outputs["report"]), screenshot=shot) as page:
            assert page.ok, page.problems()
            assert page.videos.total >= 8 and page.videos.all_loaded, page.problems()
            assert page.images.total >= 2 and page.images.all_loaded, page.problems()
            names = page.js(
                "return [...document.querySelectorAll('#metrics tbody tr td:first-child')]"
                ".map(td => td.textContent)"
            )
            assert {"fvd_domain", "clip_score_domain", "colour_accuracy"} <= set(names), names
        assert shot.stat().st_size > 0

    def test_the_run_logs_metrics_and_tables(self, step_run):
        import mlflow

        from components.core import tracking

        client = mlflow.MlflowClient(tracking_uri=tracking.tracking_uri())
        run_id = step_run.outputs["mlflow_run_id"]
        metrics = client.get_run(run_id).data.metrics
        assert metrics["colour_classifier_accuracy"] == 1.0
        assert "fvd_domain" in metrics and "clip_score_domain" in metrics
        logged = {a.path for a in client.list_artifacts(run_id, "tables")}
        assert {"tables/prompts.json", "tables/colour_trials.json"} <= logged


def _factors(corpus):
    import pyarrow.parquet as pq

    return pq.read_table(corpus / "raw" / "factors.parquet").to_pylist()


def test_run_says_when_the_sidecar_is_not_a_corpus(corpus, tiny_evaluator, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bogus = tmp_path / "factors.parquet"
    pq.write_table(pa.table({"path": ["a.mp4"]}), bogus)
    with pytest.raises(ValueError, match="not a demo-corpus factor sidecar"):
        evaluate.run(
            load_config("tiny", CORPUS),
            tmp_path,
            manifest=str(corpus / "ingest" / "manifest.parquet"),
            videos=str(corpus / "raw" / "clips"),
            evaluator=tiny_evaluator,
            factors=str(bogus),
        )


def test_run_needs_an_extractor_and_one_source(corpus, tmp_path):
    manifest = str(corpus / "ingest" / "manifest.parquet")
    with pytest.raises(ValueError, match="exactly one of model"):
        evaluate.run(load_config("tiny", CORPUS), tmp_path, manifest=manifest)
    with pytest.raises(ValueError, match="no video feature extractor"):
        evaluate.run(load_config("tiny", CORPUS), tmp_path, manifest=manifest, videos=str(tmp_path))


def test_colour_prompts_can_be_typed_short_or_expanded():
    """The ablation's prompts: the recoloured caption, the recoloured short caption, or that
    short prompt expanded (seeded, keeping the colour the user asked for)."""
    import dataclasses

    from components.steps.evaluate import colour
    from tests.components.core.test_expansion import ScriptedBackend

    base = {
        "path": "v.mp4",
        "objects": json.dumps(
            [
                {
                    "shape": "circle",
                    "color": "red",
                    "size": "small",
                    "texture": "solid",
                    "motion": "bounce",
                }
            ]
        ),
    }
    caption = "A square 1:1 video of one object on plain black. A small solid red ball bounces."
    cfg = load_config("tiny")
    long, meta = colour.colour_prompt(cfg, base, "blue", caption, "red ball bouncing", 0)
    assert "small solid blue ball" in long and meta is None
    short_cfg = dataclasses.replace(
        cfg, evaluate=dataclasses.replace(cfg.evaluate, colour_prompts="short")
    )
    short, _ = colour.colour_prompt(short_cfg, base, "blue", caption, "red ball bouncing", 0)
    assert short == "blue ball bouncing"
    expanded_cfg = dataclasses.replace(
        cfg, evaluate=dataclasses.replace(cfg.evaluate, colour_prompts="expanded")
    )
    backend = ScriptedBackend(lambda seed, n: [f"A blue ball bouncing, take {seed}."] * n)
    text, meta = colour.colour_prompt(
        expanded_cfg, base, "blue", caption, "red ball bouncing", 4, (backend, [])
    )
    assert text == "A blue ball bouncing, take 4." and meta["short_prompt"] == "blue ball bouncing"
    with pytest.raises(ValueError, match="needs the short caption of v.mp4 to name its colour"):
        colour.colour_prompt(short_cfg, base, "blue", caption, None, 0)
