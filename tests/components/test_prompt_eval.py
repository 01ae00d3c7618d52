import json

import pytest
import torch
from PIL import Image

from components import demo_data, prompt_eval
from components import generate as generate_step
from components.config import load_config
from components.demo_data import MIN_CONTRAST, PALETTE, background_range
from evaluation.prompt_following import contrasting
from model.diffusion import FlowConfig
from model.generate import save_flow_config
from tests.model.test_generate import TinyText, tiny_dit, tiny_vae

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
    demo_data.generate(cfg, workdir)
    return workdir


def test_recolour_caption_changes_only_the_colour_word():
    spec = next(
        s
        for s in demo_data.plan_corpus(load_config("tiny", CORPUS).demo_data)
        if len(s.objects) == 1
    )
    caption, _ = demo_data.describe(spec)
    obj = json.loads(demo_data._factor_row(spec)["objects"])[0]
    other = next(c for c in PALETTE if c != spec.primary.color)
    recoloured = demo_data.recolour_caption(caption, obj, other)
    assert recoloured != caption and f" {other} " in recoloured
    assert recoloured.replace(f" {other} ", f" {spec.primary.color} ", 1) == caption
    with pytest.raises(ValueError, match="unknown object colour"):
        demo_data.recolour_caption(caption, obj, "mauve")
    with pytest.raises(ValueError, match="does not describe the object"):
        demo_data.recolour_caption("A plain black frame.", obj, other)


def test_select_bases_keeps_captioned_single_object_files_spread_out():
    rows = [{"path": f"f{i:02d}", "num_objects": 1 + (i % 3 == 0)} for i in range(40)]
    captions = {r["path"]: "text" for r in rows if r["path"] != "f01"}
    eligible = [r["path"] for r in rows if r["num_objects"] == 1 and r["path"] != "f01"]
    picked = [r["path"] for r in prompt_eval.select_bases(rows, captions, 4)]
    assert len(picked) == 4 and set(picked) <= set(eligible)
    assert picked[0] == eligible[0] and picked[-1] in eligible[len(eligible) // 2 :]
    assert len(prompt_eval.select_bases(rows, captions, 100)) == len(eligible)


def test_run_scores_every_recoloured_variant(corpus, tmp_path, monkeypatch):
    cfg = load_config(
        "tiny",
        [
            *CORPUS,
            "prompt_eval.max_bases=2",
            "prompt_eval.frames=5",
            "generate.steps=2",
            "generate.max_pixels=4096",
        ],
    )
    model = tmp_path / "model"
    tiny_vae().save_pretrained(model / "vae")
    tiny_dit().save_pretrained(model / "dit")
    save_flow_config(FlowConfig(), model / "dit")
    monkeypatch.setattr(generate_step, "load_text_encoder", lambda cfg: TinyText())
    workdir = tmp_path / "work"
    workdir.mkdir()
    result = prompt_eval.run(
        cfg,
        workdir,
        str(model),
        str(corpus / "clips"),
        str(corpus / "captions.parquet"),
        str(corpus / "factors.parquet"),
    )
    summary = json.loads((workdir / "prompt_eval.json").read_text())
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
                    rows[c["path"]]["background"], rows[c["path"]]["background_colors"].split(",")
                ),
                MIN_CONTRAST,
            )
        )
        for c in checks
    )
    trials = summary["trials"]
    assert len(trials) == expected == result.values["trials"]
    assert {t["seed"] for t in trials} == {cfg.generate.seed, cfg.generate.seed + 1}
    assert all(t["asked"] in t["prompt"] for t in trials)
    assert 0.0 <= result.values["colour_accuracy"] <= 1.0
    assert result.metrics["colour_classifier_accuracy"] == 1.0
    grid = Image.open(workdir / "prompt_eval.png")
    assert grid.height > 0 and grid.width > 0


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
