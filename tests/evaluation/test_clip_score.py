"""CLIP score: the conventions by hand, the HF and open_clip loading paths on tiny random models
saved to disk, and torchmetrics' CLIPScore on identical inputs."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation.clip_score import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ClipScoreResult,
    HFClipScorer,
    OpenClipScorer,
    Preprocess,
    VideoTextScorer,
    clip_score,
    weights_sha256,
)
from tests.testing_utils import no_torchvision
from tests.testing_utils.clip import IMAGE_SIZE, save_tiny_hf_clip, save_tiny_open_clip

REPO = Path(__file__).resolve().parents[2]
# All shorter than the tiny CLIP's 32-token context (one token per character, plus 2).
PROMPTS = ["a red ball", "a blue cube on a table", "dog", "a cat", "waves at dusk", "a red ball"]


# --------------------------------------------------------------------------- a test double


class CosineStub:
    """A scorer whose frame t of a video has cosine ``video[t, 0, 0, 0] / 100 - 1`` with every
    prompt: text (1, 0), frame (c, sqrt(1 - c^2)). Only for checking the arithmetic."""

    name = "stub"
    sha256 = "0" * 64

    def embed_video(self, video):
        c = video[:, 0, 0, 0].astype(np.float64) / 100 - 1
        return np.stack([c, np.sqrt(1 - c**2)], axis=1)

    def embed_text(self, texts):
        return np.tile([1.0, 0.0], (len(texts), 1))


def video_of(*cosines: float, size: int = 2) -> np.ndarray:
    """A (T, size, size, 3) uint8 video the stub scores with these per-frame cosines."""
    values = np.round((np.asarray(cosines) + 1) * 100).astype(np.uint8)
    return np.broadcast_to(values[:, None, None, None], (len(cosines), size, size, 3)).copy()


def test_frame_weighted_mean_over_videos_of_different_lengths():
    result = clip_score(CosineStub(), [video_of(0.5), video_of(0.1, 0.2, 0.3)], ["a", "b"])
    # every frame counts once: (0.5 + 0.1 + 0.2 + 0.3) / 4, not (0.5 + 0.2) / 2 = 0.35
    assert result.cosine == pytest.approx(0.275)
    assert result.per_sample == pytest.approx((0.5, 0.2))
    assert result.frames == (1, 3) and result.n_frames == 4 and result.n_samples == 2
    assert result.hessel == pytest.approx((2.5 * 0.5 + 2.5 * 0.2) / 2)  # over samples
    assert result.torchmetrics == pytest.approx(27.5)


def test_hessel_clamps_each_sample_and_torchmetrics_clamps_the_mean():
    result = clip_score(CosineStub(), [video_of(-0.4), video_of(0.3, 0.3)], ["a", "b"])
    assert result.cosine == pytest.approx((-0.4 + 0.6) / 3)
    # Hessel: mean(2.5 * max(-0.4, 0), 2.5 * max(0.3, 0)) = 0.375 (unclamped it would be -0.125)
    assert result.hessel == pytest.approx(0.375)
    assert result.per_sample_hessel == pytest.approx((0.0, 0.75))
    # torchmetrics: max(100 * mean over pairs, 0) = 6.67 (clamping each pair would give 20)
    assert result.torchmetrics == pytest.approx(100 * 0.2 / 3)
    negative = clip_score(CosineStub(), [video_of(-0.3), video_of(-0.1, 0.2)], ["a", "b"])
    assert negative.cosine == pytest.approx(-0.2 / 3)
    assert negative.torchmetrics == 0.0 and negative.hessel == pytest.approx(2.5 * 0.05 / 2)


def test_metrics_carry_the_scorer_name_and_the_headline_is_the_raw_cosine():
    result = clip_score(CosineStub(), [video_of(0.2, 0.4), video_of(0.3)], ["a", "b"])
    metrics = result.as_metrics()
    assert set(metrics) == {
        "clip_score_stub",
        "clip_score_stub_low",
        "clip_score_stub_high",
        "clip_score_stub_hessel",
        "clip_score_stub_torchmetrics",
        "clip_score_stub_n_samples",
        "clip_score_stub_n_frames",
    }
    assert metrics["clip_score_stub"] == pytest.approx(0.3) == result.cosine
    assert metrics["clip_score_stub_n_frames"] == 3.0
    assert result.as_tags() == {"clip_score_stub_sha256": "0" * 64}
    assert result.scorer == "stub" and result.sha256 == "0" * 64


def test_bootstrap_is_seeded_over_videos():
    rng = np.random.default_rng(1)
    videos = [video_of(*rng.uniform(-0.2, 0.6, rng.integers(1, 5))) for _ in range(30)]
    prompts = ["p"] * 30
    a = clip_score(CosineStub(), videos, prompts, seed=3)
    b = clip_score(CosineStub(), videos, prompts, seed=3)
    c = clip_score(CosineStub(), videos, prompts, seed=4)
    assert (a.low, a.high) == (b.low, b.high)
    assert (a.low, a.high) != (c.low, c.high)
    assert a.low < a.cosine < a.high and a.resamples == 200 and a.confidence == 0.95
    wide = clip_score(CosineStub(), videos, prompts, seed=3, confidence=0.99)
    assert wide.low <= a.low and wide.high >= a.high
    none = clip_score(CosineStub(), videos, prompts, resamples=0)
    assert none.low == none.high == none.cosine
    # the same cosine in every video: every resample gives it back
    same = clip_score(CosineStub(), [video_of(0.25)] * 5 + [video_of(0.25, 0.25)], ["p"] * 6)
    assert same.low == pytest.approx(0.25) and same.high == pytest.approx(0.25)
    # two videos, a (1 frame at 0) and b (3 at 0.6): a resample is (a, a) -> 0, (b, b) -> 0.6
    # or mixed -> 1.8 / 4 = 0.45 (frame-weighted), each pure one with probability 1/4 > 2.5 %
    two = clip_score(CosineStub(), [video_of(0.0), video_of(0.6, 0.6, 0.6)], ["p", "q"])
    assert two.cosine == pytest.approx(0.45)
    assert two.low == pytest.approx(0.0) and two.high == pytest.approx(0.6)
    mid = clip_score(
        CosineStub(), [video_of(0.0), video_of(0.6, 0.6, 0.6)], ["p", "q"], confidence=0.2
    )
    assert mid.low == pytest.approx(0.45) == mid.high  # the middle 20 %: mixed draws (~50 %)


def test_errors():
    stub = CosineStub()
    with pytest.raises(ValueError, match="2 videos but 1 prompts"):
        clip_score(stub, [video_of(0.1), video_of(0.2)], ["a"])
    with pytest.raises(ValueError, match="no videos"):
        clip_score(stub, [], [])
    with pytest.raises(TypeError, match="not one string"):
        clip_score(stub, [video_of(0.1)], "a")
    with pytest.raises(TypeError, match="uint8"):
        clip_score(stub, [video_of(0.1).astype(np.float32)], ["a"])
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        clip_score(stub, [video_of(0.1)[0]], ["a"])
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        clip_score(stub, [video_of(0.1)[:0]], ["a"])
    with pytest.raises(TypeError, match="strings"):
        clip_score(stub, [video_of(0.1)], [3])
    with pytest.raises(ValueError, match="confidence"):
        clip_score(stub, [video_of(0.1)], ["a"], confidence=1.0)

    class Unnormalised(CosineStub):
        def embed_video(self, video):
            return 3 * super().embed_video(video)

    with pytest.raises(ValueError, match="'stub'.*not L2-normalised"):
        clip_score(Unnormalised(), [video_of(0.1)], ["a"])

    class WrongDim(CosineStub):
        def embed_text(self, texts):
            return np.tile([1.0, 0.0, 0.0], (len(texts), 1))

    with pytest.raises(ValueError, match="dimension 2, text embeddings 3"):
        clip_score(WrongDim(), [video_of(0.1)], ["a"])


def test_each_distinct_prompt_is_embedded_once():
    seen = []

    class Counting(CosineStub):
        def embed_text(self, texts):
            seen.append(list(texts))
            return super().embed_text(texts)

    clip_score(Counting(), [video_of(0.1)] * 4, ["a", "b", "a", "b"])
    assert seen == [["a", "b"]]


# --------------------------------------------------------------------------- preprocessing


def pil_processor(size: int = IMAGE_SIZE):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )


@pytest.mark.parametrize("shape", [(48, 64), (71, 45), (20, 27), (300, 400), (32, 33)])
def test_preprocessing_reproduces_the_hf_pil_pipeline(shape):
    """Resize (PIL bicubic, in torch), floor-offset centre crop, normalise: within one uint8
    level of transformers' PIL image processor on random noise, nearly everywhere equal."""
    frames = np.random.default_rng(0).integers(0, 256, (2, *shape, 3), dtype=np.uint8)
    ours = Preprocess(IMAGE_SIZE)(frames)
    ref = pil_processor()(images=list(frames), return_tensors="pt")["pixel_values"]
    assert ours.shape == ref.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    levels = (ours - ref).abs() * torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1) * 255
    assert levels.max() <= 1.0 + 1e-3
    assert levels.mean() < 0.01


def test_preprocessing_details():
    frames = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    x = Preprocess(32)(frames)  # at the size: no resampling, just the normalisation
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))
    expected = (torch.from_numpy(frames).permute(0, 3, 1, 2) / 255 - mean) / std
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)
    assert Preprocess(32).resized_shape(48, 64) == (32, 42)  # int(32 * 64 / 48) = 42
    assert Preprocess(32, resize_mode="squash").resized_shape(48, 64) == (32, 32)
    # a 35-wide frame: margin 3, HF floors the left offset to 1, torchvision rounds it to 2
    wide = np.zeros((1, 32, 35, 3), np.uint8)
    wide[0, :, 1] = 255
    assert Preprocess(32, crop_offset="floor")(wide)[0, 0, 0, 0] > 1
    assert Preprocess(32, crop_offset="round")(wide)[0, 0, 0, 0] < 0
    with pytest.raises(ValueError, match="interpolation"):
        Preprocess(32, interpolation="nearest")


# --------------------------------------------------------------------------- the HF path


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    return save_tiny_hf_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def hf_scorer(tiny_clip_dir) -> HFClipScorer:
    return HFClipScorer.from_dir(tiny_clip_dir, batch_size=3)


def random_videos(lengths, size=IMAGE_SIZE, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (t, size, size, 3), dtype=np.uint8) for t in lengths]


def test_hf_scorer_loads_the_saved_model(tiny_clip_dir, hf_scorer):
    from transformers import AutoTokenizer, CLIPModel

    assert isinstance(hf_scorer, VideoTextScorer) and hf_scorer.name == "hfclip"
    assert hf_scorer.preprocess == Preprocess(IMAGE_SIZE)  # from preprocessor_config.json
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_clip_dir)
    (video,) = random_videos([5])
    frames = torch.from_numpy(video).permute(0, 3, 1, 2) / 255
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))
    with torch.no_grad():
        image = model.get_image_features(pixel_values=(frames - mean) / std).pooler_output
        text = model.get_text_features(**tokenizer(PROMPTS, padding=True, return_tensors="pt"))
    emb = hf_scorer.embed_video(video)  # in batches of 3
    assert emb.shape == (5, 16) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb, torch.nn.functional.normalize(image, dim=-1), atol=1e-5)
    np.testing.assert_allclose(
        hf_scorer.embed_text(PROMPTS),
        torch.nn.functional.normalize(text.pooler_output, dim=-1),
        atol=1e-5,
    )
    # the weights' identity: the one weights file's sha256
    digest = hashlib.sha256((tiny_clip_dir / "model.safetensors").read_bytes()).hexdigest()
    assert hf_scorer.sha256 == digest == weights_sha256(tiny_clip_dir)


def text_tower(path: Path, ids: list[int]) -> np.ndarray:
    """The saved CLIP's normalised text embedding of these token ids, run directly."""
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(path).eval()
    with torch.no_grad():
        out = model.get_text_features(input_ids=torch.tensor([ids])).pooler_output
    return torch.nn.functional.normalize(out, dim=-1).numpy()


LONG = "a red ball on a table in the garden at noon"  # 35 tokens: past the context of 32


def test_hf_text_is_truncated_to_the_context_with_its_end_token(tiny_clip_dir, hf_scorer):
    ids = hf_scorer.tokenizer(LONG)["input_ids"]
    assert len(ids) > 32 and ids[-1] == hf_scorer.tokenizer.eos_token_id
    kept = [*ids[:31], ids[-1]]  # start + 30 tokens + end
    np.testing.assert_allclose(
        hf_scorer.embed_text([LONG]), text_tower(tiny_clip_dir, kept), atol=1e-5
    )


def test_hf_normalisation_from_preprocessor_config(tmp_path):
    custom = save_tiny_hf_clip(tmp_path / "custom", image_mean=(0.5,) * 3, image_std=(0.25,) * 3)
    assert HFClipScorer.from_dir(custom).preprocess.mean == (0.5, 0.5, 0.5)
    assert HFClipScorer.from_dir(custom).preprocess.std == (0.25, 0.25, 0.25)
    config = json.loads((custom / "preprocessor_config.json").read_text())
    config.update(size={"height": 32, "width": 32}, resample=2)  # squash, bilinear
    (custom / "preprocessor_config.json").write_text(json.dumps(config))
    squash = HFClipScorer.from_dir(custom).preprocess
    assert (squash.resize_mode, squash.interpolation) == ("squash", "bilinear")
    config["resample"] = 0  # nearest: not what CLIP uses
    (custom / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="preprocessor_config.json: resample 0"):
        HFClipScorer.from_dir(custom)
    bare = save_tiny_hf_clip(tmp_path / "bare", preprocessor_config=False)
    scorer = HFClipScorer.from_dir(bare, name="hfclip_b")
    assert scorer.preprocess == Preprocess(IMAGE_SIZE, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    assert scorer.name == "hfclip_b"


def test_hf_missing_files_name_the_path(tmp_path, tiny_clip_dir):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        HFClipScorer.from_dir(tmp_path / "nowhere")
    for missing, message in [
        ("config.json", "no config.json"),
        ("model.safetensors", "no CLIP weights"),
        ("tokenizer.json", "no tokenizer files"),
    ]:
        broken = tmp_path / missing
        broken.mkdir()
        for f in tiny_clip_dir.iterdir():
            if f.name != missing:
                (broken / f.name).write_bytes(f.read_bytes())
        with pytest.raises(FileNotFoundError, match=message) as error:
            HFClipScorer.from_dir(broken)
        assert str(broken) in str(error.value)
    with pytest.raises(ValueError, match="metric suffix"):
        HFClipScorer.from_dir(tiny_clip_dir, name="HF CLIP")


def test_weights_sha256_of_a_directory(tmp_path):
    (tmp_path / "b.safetensors").write_bytes(b"second")
    (tmp_path / "a.bin").write_bytes(b"first")
    (tmp_path / "config.json").write_text("{}")  # not a weight file
    assert weights_sha256(tmp_path) == hashlib.sha256(b"firstsecond").hexdigest()
    assert weights_sha256(tmp_path / "a.bin") == hashlib.sha256(b"first").hexdigest()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no weight files"):
        weights_sha256(empty)


# --------------------------------------------------------------------------- torchmetrics


def torchmetrics_clip(path: Path):
    """torchmetrics' CLIPScore over the tiny CLIP, passed as a callable returning (model,
    processor): transformers' PIL image processor and the saved tokenizer.

    torchmetrics 1.9 expects ``get_image_features``/``get_text_features`` to return tensors;
    transformers 5 returns ``BaseModelOutputWithPooling`` (the projection in ``pooler_output``),
    so a thin wrapper unwraps it, as the upstream fix does (Lightning-AI/torchmetrics#3408).
    """
    no_torchvision.install()  # torchmetrics imports torch_fidelity, which imports torchvision
    from torchmetrics.multimodal import CLIPScore
    from transformers import AutoTokenizer, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    class Unwrapped(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model, self.config = model, model.config

        def get_image_features(self, pixel_values):
            return self.model.get_image_features(pixel_values=pixel_values).pooler_output

        def get_text_features(self, input_ids, attention_mask):
            out = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
            return out.pooler_output

    def load():
        processor = CLIPProcessor(
            # the PIL one: the default would be the torchvision backend (the placeholder here)
            image_processor=CLIPImageProcessorPil.from_pretrained(path, local_files_only=True),
            tokenizer=AutoTokenizer.from_pretrained(path, local_files_only=True),
        )
        return Unwrapped(CLIPModel.from_pretrained(path, local_files_only=True).eval()), processor

    return CLIPScore(model_name_or_path=load)


def chw(frame: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frame).permute(2, 0, 1)


def test_matches_torchmetrics_on_images(tiny_clip_dir, hf_scorer):
    """Single-frame videos already at the model's size: the same pixels reach both models
    (torchmetrics' processor rescales and normalises in NumPy, we in torch)."""
    videos = random_videos([1] * len(PROMPTS))
    ours = clip_score(hf_scorer, videos, PROMPTS)
    metric = torchmetrics_clip(tiny_clip_dir)
    with torch.no_grad():
        metric.update([chw(v[0]) for v in videos[:4]], PROMPTS[:4])  # two batches: the mean
        metric.update([chw(v[0]) for v in videos[4:]], PROMPTS[4:])  # is over all pairs
        theirs = float(metric.compute())
    assert 30 < theirs < 100  # positive, unclamped: a real comparison
    assert ours.torchmetrics == pytest.approx(theirs, rel=1e-4)
    assert ours.cosine * 100 == pytest.approx(theirs, rel=1e-4)
    # pair by pair, torchmetrics' unclamped 100 * cos
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update

    with torch.no_grad():
        pairs, n = _clip_score_update(
            [chw(v[0]) for v in videos], PROMPTS, metric.model, metric.processor
        )
    assert n == len(PROMPTS)
    np.testing.assert_allclose(np.array(ours.per_sample) * 100, pairs.numpy(), rtol=1e-4)


def test_matches_torchmetrics_fed_every_frame(tiny_clip_dir, hf_scorer):
    """Videos of different lengths, frames of another size (resized by both): torchmetrics
    fed every frame with its prompt gives the frame-weighted mean, to PIL's rounding."""
    lengths = [1, 4, 2, 3]
    videos = random_videos(lengths, size=48, seed=1)
    ours = clip_score(hf_scorer, videos, PROMPTS[:4])
    metric = torchmetrics_clip(tiny_clip_dir)
    with torch.no_grad():
        for video, prompt in zip(videos, PROMPTS, strict=False):
            metric.update([chw(f) for f in video], [prompt] * len(video))
    assert ours.n_frames == 10
    assert ours.torchmetrics == pytest.approx(float(metric.compute()), rel=1e-3)


def test_clamp_agrees_with_torchmetrics_when_every_cosine_is_negative(tmp_path):
    anti = save_tiny_hf_clip(tmp_path / "anti", alignment=-0.8)
    videos = random_videos([1] * 4)
    ours = clip_score(HFClipScorer.from_dir(anti), videos, PROMPTS[:4])
    metric = torchmetrics_clip(anti)
    with torch.no_grad():
        metric.update([chw(v[0]) for v in videos], PROMPTS[:4])
    assert ours.cosine < 0 and max(ours.per_sample) < 0
    assert ours.torchmetrics == float(metric.compute()) == 0.0 and ours.hessel == 0.0


def test_where_torchmetrics_differs_captions_past_the_context(tiny_clip_dir, hf_scorer):
    """torchmetrics slices input_ids to the context, which drops the end-of-text token the text
    tower pools at; the tokenizer's truncation (ours, as open_clip's) keeps it."""
    (video,) = random_videos([1])
    ids = hf_scorer.tokenizer(LONG)["input_ids"]
    image = hf_scorer.embed_video(video)[0]
    metric = torchmetrics_clip(tiny_clip_dir)
    with torch.no_grad(), pytest.warns(UserWarning, match="longer than"):
        metric.update(chw(video[0]), LONG)
    sliced = float(image @ text_tower(tiny_clip_dir, ids[:32])[0])
    assert float(metric.compute()) / 100 == pytest.approx(sliced, rel=1e-4)
    ours = clip_score(hf_scorer, [video], [LONG]).cosine
    assert ours == pytest.approx(float(image @ text_tower(tiny_clip_dir, [*ids[:31], ids[-1]])[0]))
    assert abs(ours - sliced) > 1e-3


# --------------------------------------------------------------------------- open_clip


def test_open_clip_scorer_matches_the_in_memory_model(tmp_path):
    weights, model_name = save_tiny_open_clip(tmp_path, seed=2)
    import open_clip

    torch.manual_seed(2)
    model = open_clip.create_model(model_name).eval()  # the same random init, in memory
    scorer = OpenClipScorer.from_file(weights, model_name, batch_size=2)
    assert isinstance(scorer, VideoTextScorer) and scorer.name == "openclip"
    assert scorer.sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert scorer.preprocess == Preprocess(
        IMAGE_SIZE, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, crop_offset="round"
    )
    (video,) = random_videos([3])
    frames = torch.from_numpy(video).permute(0, 3, 1, 2) / 255
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))
    tokenizer = open_clip.get_tokenizer(model_name)
    with torch.no_grad():
        image = model.encode_image((frames - mean) / std, normalize=True)
        text = model.encode_text(tokenizer(PROMPTS), normalize=True)
    np.testing.assert_allclose(scorer.embed_video(video), image, atol=1e-5)
    np.testing.assert_allclose(scorer.embed_text(PROMPTS), text, atol=1e-5)
    result = clip_score(scorer, [video], ["a red ball"])
    assert result.cosine == pytest.approx(float((image @ text[0]).mean()), abs=1e-5)
    assert "clip_score_openclip" in result.as_metrics()


def test_open_clip_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no open_clip weights file"):
        OpenClipScorer.from_file(tmp_path / "missing.pt", "ViT-B-32")
    (tmp_path / "w.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="weights come from weights_path"):
        OpenClipScorer.from_file(tmp_path / "w.pt", "hf-hub:org/repo")
    no_torchvision.install()
    with pytest.raises(ValueError, match="no model config 'no-such-model'"):
        OpenClipScorer.from_file(tmp_path / "w.pt", "no-such-model")


def test_open_clip_without_torchvision_says_so(tmp_path):
    """In a fresh interpreter (no placeholder): the real import failure, explained."""
    (tmp_path / "w.pt").write_bytes(b"")
    code = (
        "import importlib.util, sys\n"
        "if importlib.util.find_spec('torchvision'): sys.exit(3)\n"
        "from evaluation.clip_score import OpenClipScorer\n"
        f"OpenClipScorer.from_file({str(tmp_path / 'w.pt')!r}, 'ViT-B-32')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    if run.returncode == 3:
        pytest.skip("a real torchvision is installed")
    assert run.returncode == 1
    assert "ImportError: open_clip needs torchvision" in run.stderr
    assert "HFClipScorer.from_dir" in run.stderr


def test_result_is_a_frozen_record():
    result = clip_score(CosineStub(), [video_of(0.1)], ["a"])
    assert isinstance(result, ClipScoreResult)
    with pytest.raises(AttributeError):
        result.cosine = 1.0
