"""The captioner's training step: its data (tasks by rate, clips at the working size, pairs), and
real DeepSpeed runs on the tiny corpus (committed outputs, a loadable captioner, the held-out
report, resume)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from components.core import artifacts, trainer
from components.core.config import DemoDataConfig, load_config
from components.core.demo_corpus import ClipSpec, describe, parse_caption
from components.core.trainer import launch
from components.steps import train_captioner
from components.steps.demo_data import plan_corpus
from components.steps.train_captioner import data, worker
from model.captioner import Captioner
from tests.testing_utils.data import make_corpus
from tests.testing_utils.step_tester import StepTesterMixin

torch.set_num_threads(1)

TINY = (  # a handful of steps of the tiny captioner
    "train_captioner.size=captioner-tiny",
    "train_captioner.short_side=16",
    "train_captioner.frames=2",
    "train_captioner.max_tokens=48",
    "train_captioner.eval_every=4",
    "train_captioner.num_beams=2",
    "train_captioner.train.steps=6",
    "train_captioner.train.micro_batch=4",
    "train_captioner.train.warmup_steps=2",
    "train_captioner.train.checkpoint_every=3",
    "train_captioner.train.log_every=2",
)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


# --------------------------------------------------------------------------- data


def test_training_clips_are_the_captioned_train_split(manifest):
    tc = load_config("tiny", list(TINY)).train_captioner
    picked = data.select(data.read_items(manifest), tc)
    assert picked["train"] and all(i.trainable and i.clip.split == "train" for i in picked["train"])
    assert all(not i.caption for i in picked["uncaptioned"])
    assert picked["val_source"] in ("val", "train") and len(picked["val"]) >= 2
    pairs = data.pairs(picked["train"])
    assert pairs and all(p["short"] and p["long"] for p in pairs)


def test_samples_follow_the_task_rates_and_positions(manifest):
    tc = load_config(
        "tiny", [*TINY, "train_captioner.short_rate=0.3", "train_captioner.expand_rate=0.3"]
    ).train_captioner
    items = data.select(data.read_items(manifest), tc)["train"]
    ds = data.CaptionDataset(items, tc, seed=0)
    samples = [ds.sample(p, p % len(items)) for p in range(60)]
    tasks = [s["task"] for s in samples]
    assert {"descriptive", "short", "expand"} == set(tasks)
    for s in samples:
        if s["task"] == "expand":
            assert s["video"] is None and s["prompt"]
        else:
            _, f, h, w = s["video"].shape
            assert min(h, w) == tc.short_side and f in (1, tc.frames)
    assert [s["task"] for s in (ds.sample(p, p % len(items)) for p in range(60))] == tasks
    batch = data.Collate(ds_tokenizer(), tc.max_tokens)(samples[:8])
    assert batch["inputs"].shape == batch["targets"].shape and batch["inputs"].shape[0] == 8
    assert (
        len(batch["videos"]) + (0 if batch["prompt_ids"] is None else len(batch["prompt_ids"])) == 8
    )


def mirrored(spec: ClipSpec) -> ClipSpec:
    """The spec of ``spec``'s clip mirrored left-right."""
    sides = {"slide_left": "slide_right", "slide_right": "slide_left"}
    sides |= {"pan_left": "pan_right", "pan_right": "pan_left"}
    horizontal = spec.background == "gradient" and spec.gradient_axis == "horizontal"
    return dataclasses.replace(
        spec,
        objects=tuple(
            dataclasses.replace(o, x=1 - o.x, motion=sides.get(o.motion, o.motion))
            for o in spec.objects
        ),
        background_colors=spec.background_colors[::-1] if horizontal else spec.background_colors,
        camera=sides.get(spec.camera, spec.camera),
    )


def test_a_mirrored_caption_describes_the_mirrored_clip():
    specs = plan_corpus(DemoDataConfig(num_clips=40, num_images=60, seed=3))
    changed = 0
    for spec in specs:
        long, short = describe(spec)
        want_long, want_short = describe(mirrored(spec))
        assert parse_caption(data.mirror_caption(long)) == parse_caption(want_long), long
        assert data.mirror_caption(short) == want_short
        changed += data.mirror_caption(long) != long
    assert changed > len(specs) // 2  # most captions name a side
    assert data.mirror_caption("Left of it, the ring turns clockwise; right.") == (
        "Right of it, the ring turns counterclockwise; left."
    )
    assert data.mirror_caption("a bright lightbulb, upright") == "a bright lightbulb, upright"


def test_augment_mirrors_with_the_captions_and_shifts_the_frames():
    video = torch.arange(3 * 2 * 4 * 6, dtype=torch.float32).view(3, 2, 4, 6)  # (C, F, H, W)
    texts = ("A ball slides from left to right.", "ball sliding right")
    gen = torch.Generator().manual_seed(0)
    flip = load_config("tiny", ["train_captioner.hflip=1", "train_captioner.shift=0"])
    out, found = data.augment(video, texts, flip.train_captioner, gen)
    assert torch.equal(out, video.flip(-1))
    assert found == ("A ball slides from right to left.", "ball sliding left")
    none = load_config("tiny", ["train_captioner.hflip=0", "train_captioner.shift=0"])
    assert data.augment(video, texts, none.train_captioner, gen) == (video, texts)
    moved = data.shift(video, 1, -2)  # one row down, two columns left
    assert moved.shape == video.shape
    assert torch.equal(moved[..., 1:, :-2], video[..., :-1, 2:])
    assert torch.equal(moved[..., 0, :], moved[..., 1, :])  # the edge repeated into the gap
    assert torch.equal(moved[..., -1], moved[..., -3]) and torch.equal(
        moved[..., -2], moved[..., -3]
    )
    some = load_config("tiny", ["train_captioner.hflip=0", "train_captioner.shift=0.25"])
    shifted = [data.augment(video, texts, some.train_captioner, gen)[0] for _ in range(20)]
    assert any(not torch.equal(v, video) for v in shifted)  # 0.25 of 4 rows: up to 1 px
    assert all(
        any(torch.equal(v, data.shift(video, dy, dx)) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
        for v in shifted
    )


def test_augmented_samples_are_a_function_of_seed_and_position(manifest):
    tc = load_config(
        "tiny", [*TINY, "train_captioner.expand_rate=0", "train_captioner.shift=0"]
    ).train_captioner
    items = data.select(data.read_items(manifest), tc)["train"]
    ds = data.CaptionDataset(items, tc, seed=0)
    first = [ds.sample(p, p % len(items)) for p in range(40)]
    again = [ds.sample(p, p % len(items)) for p in range(40)]
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a["video"], b["video"]) and a["text"] == b["text"]
    flips = []
    for p, s in enumerate(first):
        item = items[p % len(items)]
        text = item.short_caption if s["task"] == "short" else item.caption
        clip = ds.clips(item.clip)
        plain, flipped = torch.equal(s["video"], clip), torch.equal(s["video"], clip.flip(-1))
        assert plain or flipped
        if plain != flipped:  # (a mirror-symmetric clip can't tell)
            assert s["text"] == (data.mirror_caption(text) if flipped else text)
            flips.append(flipped)
    assert 0 < sum(flips) < len(flips)
    with pytest.raises(ValueError, match="train_captioner.hflip must be in"):
        load_config("tiny", ["train_captioner.hflip=1.5"])


def ds_tokenizer():
    from model.captioner import load_caption_tokenizer

    return load_caption_tokenizer()


def test_config_errors_name_the_setting():
    with pytest.raises(ValueError, match="unknown captioner size 'captioner-huge'"):
        train_captioner.check(load_config("tiny", ["train_captioner.size=captioner-huge"]))


# --------------------------------------------------------------------------- real runs


@pytest.mark.slow
class TestTrainCaptionerStep(StepTesterMixin):
    """The tiny captioner for a handful of steps, then the held-out report."""

    step = train_captioner.STEP
    overrides = TINY
    bad_config = ("train_captioner.size=captioner-huge",)
    bad_config_error = "unknown captioner size 'captioner-huge'"

    @pytest.fixture(scope="class")
    def step_inputs(self, manifest):
        factors = Path(manifest).parents[1] / "raw" / "factors.parquet"
        return {"manifest": manifest, "factors": str(factors)}

    def test_the_saved_captioner_loads_and_captions(self, step_run):
        out = step_run.outputs
        model, tokenizer = artifacts.load_captioner(out["captioner"])
        assert isinstance(model, Captioner) and not model.training
        assert model.config.short_side == 16 and len(model.config.vocab) == out["vocab"]
        from model.captioner import caption_videos, expand_prompts

        (found,) = caption_videos(model, tokenizer, [torch.zeros(3, 3, 20, 30)], num_beams=2)
        assert isinstance(found[0], str) and found[1] <= 0
        (samples,) = expand_prompts(model, tokenizer, ["red ball"], seed=0, num_return=2)
        assert len(samples) == 2

    def test_writes_pairs_and_the_report(self, step_run):
        out = step_run.outputs
        pairs = json.loads(Path(out["pairs"]).read_text())
        assert pairs and set(pairs[0]) == {"short", "long"} and out["pairs_count"] == len(pairs)
        report = json.loads(Path(out["report"]).read_text())
        assert report["val_source"] == out["val_source"] and report["num_beams"] == 2
        assert set(report["styles"]) == {"short", "descriptive"}
        for entry in report["styles"].values():
            assert {"bleu4", "rouge_l", "confidence", "examples"} <= set(entry)
        scores = report["attributes"]["scores"]
        assert set(scores) == {"colour", "shape", "motion", "background"}
        assert out["steps"] == 6

    def test_logs_training_and_report(self, step_run):
        import mlflow

        from components.core import tracking

        client = mlflow.MlflowClient(tracking_uri=tracking.tracking_uri())
        run_id = step_run.outputs["mlflow_run_id"]
        assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [2, 4, 6]
        assert client.get_metric_history(run_id, "val_loss")
        metrics = client.get_run(run_id).data.metrics
        assert {"bleu4_descriptive", "rouge_l_short", "accuracy_colour"} <= set(metrics)


@pytest.mark.slow
def test_resume_continues_steps_and_data(manifest, tmp_path):
    cfg = load_config("tiny", list(TINY))
    body = trainer.build_payload(
        cfg, tmp_path, tmp_path / "ckpt", worker.RESULT_NAME, manifest=manifest
    )
    entry = "components.steps.train_captioner.worker:worker"
    launch(entry, {**body, "stop_at": 3}, 1, tmp_path / "train.log")  # pre-empted after step 3
    first = json.loads((tmp_path / worker.HISTORY_NAME).read_text())
    assert [h["step"] for h in first] == [1, 2, 3] and not (tmp_path / worker.RESULT_NAME).exists()
    launch(entry, body, 1, tmp_path / "train.log")  # resumes from the step-3 checkpoint
    second = json.loads((tmp_path / worker.HISTORY_NAME).read_text())
    assert [h["step"] for h in second] == [4, 5, 6]
    batch = cfg.train_captioner.train.micro_batch
    positions = [p for h in first + second for p in h["positions"]]
    assert positions == list(range(6 * batch))  # the data stream continues where it stopped
    result = json.loads((tmp_path / worker.RESULT_NAME).read_text())
    assert result["steps"] == 6
    assert (tmp_path / worker.CAPTIONER_DIR / "model.safetensors").exists()


def test_the_contrastive_loss_trains_only_and_pairs_clips_with_captions(manifest):
    cfg = load_config("tiny")
    tc = cfg.train_captioner
    tokenizer = worker.load_caption_tokenizer()
    items = data.select(data.read_items(manifest), tc)["train"]
    texts = [t for i in items for t in (i.caption, i.short_caption) if t]
    embeds = worker.caption_embeddings(artifacts.load_text_encoder(cfg), texts)
    assert set(embeds) == set(texts) and {e.shape for e in embeds.values()} == {(384,)}
    torch.manual_seed(0)
    objective = worker.CaptionObjective(worker.model_config(tc, tokenizer, texts))
    dataset = data.CaptionDataset(items, tc, seed=0)
    samples = [dataset.sample(k, k % len(items)) for k in range(6)]
    samples = [s for s in samples if s["video"] is not None][:4]
    batch = data.Collate(tokenizer, tc.max_tokens, embeds)(samples)
    assert torch.equal(batch["text_embeds"], torch.stack([embeds[s["text"]] for s in samples]))
    args = {k: batch[k] for k in ("videos", "prompt_ids", "prompt_mask", "inputs", "targets")}
    objective.train()
    trained = objective(**args, text_embeds=batch["text_embeds"])
    trained.backward()
    assert objective.video_proj.weight.grad.abs().sum() > 0  # the contrastive term is in
    assert objective.text_proj.weight.grad.abs().sum() > 0
    objective.zero_grad()
    captions_only = objective(**args)  # no embeddings: no contrastive term
    captions_only.backward()
    assert objective.video_proj.weight.grad is None or not objective.video_proj.weight.grad.any()
    objective.eval()
    with torch.no_grad():
        memory, mask = objective.captioner.encode_videos(batch["videos"])
        contrastive = objective.contrastive(
            memory, mask, batch["text_embeds"], batch["targets"][: len(samples)]
        )
        eval_loss = objective(**args, text_embeds=batch["text_embeds"])
        assert torch.isclose(eval_loss, trained.detach() - contrastive, atol=1e-5)
    assert contrastive.item() > 0
