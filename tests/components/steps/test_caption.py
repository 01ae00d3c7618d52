"""Caption step on the tiny corpus with a tiny random captioner: every clip captioned once in both
styles, per-shard idempotent parts, the real-footage table, and clear errors for a bad captioner."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from components.core import manifest as mf
from components.core import runner
from components.core.config import load_config
from components.core.manifest import read_clips
from components.core.runner import RunContext
from components.steps import caption
from model.captioner import CAPTIONER_SIZES, Captioner
from tests.testing_utils.data import make_corpus
from tests.testing_utils.step_tester import StepTesterMixin

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, str]:
    """The tiny manifest and an untrained tiny captioner saved as train_captioner saves it."""
    root = tmp_path_factory.mktemp("caption")
    manifest = make_corpus(root)
    torch.manual_seed(0)
    Captioner(CAPTIONER_SIZES.config("captioner-tiny")).save_pretrained(root / "captioner")
    return {"manifest": manifest, "captioner": str(root / "captioner")}


class TestCaptionStep(StepTesterMixin):
    step = caption.STEP
    bad_config = ("caption.shard_size=0",)
    bad_config_error = "caption.shard_size, num_beams and max_new_tokens must be >= 1"

    @pytest.fixture(scope="class")
    def step_inputs(self, corpus):
        return {"manifest": corpus["manifest"], "captioner": corpus["captioner"]}

    @pytest.fixture(scope="class")
    def captions(self, step_run):
        return mf.read_table(step_run.outputs["captions"]).to_pylist()

    def test_every_clip_is_captioned_once_in_both_styles(self, corpus, step_run, captions):
        clips = read_clips(corpus["manifest"])
        assert [r["clip_id"] for r in captions] == [c.clip_id for c in clips]
        assert list(captions[0]) == caption.CAPTIONS_SCHEMA.names
        for row in captions:
            assert row["caption_source"] == "recaptioned"
            assert row["caption"] and row["short_caption"]
            assert row["confidence"] < 0 and row["short_confidence"] < 0
        out = step_run.outputs
        assert out["clips"] == len(clips) and out["recaptioned"] == len(clips)
        assert out["shards"] == -(-len(clips) // 6)  # tiny: 6 clips a shard

    def test_captioner_version_is_size_and_weights_hash(self, corpus, step_run, captions):
        weights = Path(corpus["captioner"]) / "model.safetensors"
        sha = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
        assert step_run.outputs["captioner_version"] == f"captioner-tiny-{sha}"
        assert {r["captioner_version"] for r in captions} == {f"captioner-tiny-{sha}"}

    def test_originals_come_from_the_manifest(self, corpus, captions):
        manifest = {r["clip_id"]: r for r in mf.read_table(corpus["manifest"]).to_pylist()}
        with_original = 0
        for row in captions:
            own = manifest[row["clip_id"]]
            assert row["original_caption"] == (own["caption"] or None)
            assert row["original_short_caption"] == (own["short_caption"] or None)
            if own["caption"]:
                with_original += 1
                assert row["original_source"] == own["caption_source"]
            else:
                assert row["original_source"] is None
        assert 0 < with_original < len(captions)  # real footage and some synthetic have none

    def test_real_footage_table_shows_frames_and_captions(self, step_run, captions):
        table = Path(step_run.outputs["real_captions"]).read_text()
        sheets = sorted(Path(step_run.outputs["frames"]).glob("*.png"))
        assert [p.stem for p in sheets] == ["real_bigbuckbunny", "real_bikes"]  # table_clips: 2
        real = {Path(r["uri"]).stem: r for r in captions if "real_" in r["uri"]}
        for sheet in sheets:
            assert f"]({caption.FRAMES_DIR}/{sheet.name})" in table
            assert real[sheet.stem]["short_caption"].replace("|", "\\|") in table
        from PIL import Image

        with Image.open(sheets[0]) as image:
            assert image.height == caption.SHEET_HEIGHT and image.width > image.height

    def test_shards_are_idempotent_parts_and_merge_like_the_step(
        self, corpus, step_run, captions, tessera_home
    ):
        cfg = load_config("tiny")
        ctx = RunContext("caption-test", "test", track=False)
        inputs = {"manifest": corpus["manifest"], "captioner": corpus["captioner"]}
        shards = runner.plan_parts(caption.STEP, cfg, **inputs)
        outputs = [runner.run_part(caption.STEP, cfg, ctx, s, **inputs) for s in shards]
        assert outputs[1]["step_uri"].endswith("/caption-parts/00001")

        def boom(*args, **kwargs):
            raise AssertionError("a committed shard was captioned again")

        spec = dataclasses.replace(caption.STEP, part=boom)
        assert [runner.run_part(spec, cfg, ctx, s, **inputs) for s in shards] == outputs
        merged = runner.run_step(caption.STEP, cfg, ctx, parts=outputs)
        assert mf.read_table(merged["captions"]).to_pylist() == captions  # deterministic

    def test_merge_refuses_shards_that_miss_or_repeat_clips(self, corpus, step_run, tmp_path):
        cfg = load_config("tiny")
        ctx = RunContext("caption-gaps", "test", track=False)
        inputs = {"manifest": corpus["manifest"], "captioner": corpus["captioner"]}
        shards = runner.plan_parts(caption.STEP, cfg, **inputs)
        first = runner.run_part(caption.STEP, cfg, ctx, shards[0], **inputs)
        with pytest.raises(ValueError, match=r"missing \[") as raised:
            caption.run(cfg, tmp_path / "a", [first])
        assert shards[1]["clip_ids"][0] in str(raised.value)
        with pytest.raises(ValueError, match="clip\\(s\\) twice") as raised:
            caption.run(cfg, tmp_path / "b", [first, {**first, "index": 1}])
        assert shards[0]["clip_ids"][0] in str(raised.value)


def test_check_coverage_names_the_clips():
    with pytest.raises(ValueError, match=r"1 clip\(s\) twice \['a'\], 1 missing \['c'\]"):
        caption.check_coverage(["a", "a", "b"], ["a", "b", "c"], "m.parquet")
    caption.check_coverage(["b", "a"], ["a", "b"], "m.parquet")


def test_missing_captioner_names_the_path_and_the_fix(corpus, tmp_path):
    missing = str(tmp_path / "nowhere" / "captioner")
    with pytest.raises(FileNotFoundError, match="train-captioner") as raised:
        runner.plan_parts(
            caption.STEP, load_config("tiny"), manifest=corpus["manifest"], captioner=missing
        )
    assert missing in str(raised.value) and "config.json" in str(raised.value)
    weightless = tmp_path / "weightless"
    shutil.copytree(corpus["captioner"], weightless)
    (weightless / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors.*train-captioner"):
        caption.load_captioner(str(weightless))


def test_a_directory_holding_captioner_is_found(corpus, tmp_path):
    shutil.copytree(corpus["captioner"], tmp_path / "captioner")
    assert caption.find_captioner(str(tmp_path)) == str(tmp_path / "captioner")


def test_corrupt_weights_name_the_path_and_the_fix(corpus, tmp_path):
    broken = tmp_path / "captioner"
    shutil.copytree(corpus["captioner"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a cut-off upload
    with pytest.raises(ValueError, match="corrupt") as raised:
        caption.load_captioner(str(broken))
    assert str(broken) in str(raised.value) and "train_captioner" in str(raised.value)


def test_pixels_are_what_the_captioner_makes_of_full_frames(corpus):
    from components.core import media
    from model.evaluator import fit_short_side

    clip = next(c for c in read_clips(corpus["manifest"]) if "real_carphone" in c.uri)
    full = media.load_video(clip.uri)  # (3, T, H, W)
    mine = caption.read_pixels(clip, 16)
    torch.testing.assert_close(mine, fit_short_side(full[None], 16)[0])
    assert caption.read_pixels(clip, 16, max_frames=3).shape[1] == 3


def test_size_name_reads_the_architecture():
    cfg = CAPTIONER_SIZES.config("captioner-xs", short_side=32, frames=2, max_tokens=48)
    assert caption.size_name(cfg) == "captioner-xs"
    assert caption.size_name(CAPTIONER_SIZES.config("captioner-xs", dim=96)) == "captioner-custom"


@pytest.mark.slow  # transformers' vision models import in seconds
def test_a_pretrained_transformers_captioner_captions_a_shard(corpus, tmp_path):
    """caption.pretrained: a team's own vision-language model (a save_pretrained directory)
    captions instead of the trained captioner, with its own version."""
    from tests.model.test_pretrained_captioner import save_tiny_vision_captioner

    vlm = save_tiny_vision_captioner(tmp_path / "vlm")
    cfg = load_config("tiny", [f"caption.pretrained={vlm}", "caption.max_new_tokens=8"])
    (shard,) = runner.plan_parts(caption.STEP, cfg, manifest=corpus["manifest"], captioner="")[:1]
    work = tmp_path / "work"
    work.mkdir()
    result = caption.caption_shard(cfg, work, shard, corpus["manifest"], captioner="")
    assert result.values["captioner_version"].startswith("hf-vision-encoder-decoder-")
    rows = mf.read_table(str(work / caption.CAPTIONS_NAME)).to_pylist()
    assert [r["clip_id"] for r in rows] == shard["clip_ids"]
    assert all(isinstance(r["caption"], str) and r["confidence"] <= 0 for r in rows)
    missing = load_config("tiny", [f"caption.pretrained={tmp_path / 'none'}"])
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        runner.plan_parts(caption.STEP, missing, manifest=corpus["manifest"], captioner="")
