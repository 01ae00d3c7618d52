"""The captioner: the tokenizer round-trips the corpus grammar, any clip size and length encodes,
the tiny model overfits a handful of clips in both styles (greedy and beam agree), prompt
expansion samples deterministically by seed."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from components.core.demo_corpus import ClipSpec, ObjectSpec, describe
from model.captioner import (
    CAPTIONER_SIZES,
    STYLES,
    Captioner,
    CaptionerConfig,
    build_captioner,
    build_vocab,
    caption_loss,
    caption_videos,
    expand_prompts,
    generate,
    load_caption_tokenizer,
    prompt_batch,
    sample_frames,
    teacher_forcing,
)
from model.config import UnknownSizeError
from tests.testing_utils.model_tester import ModelTesterMixin
from tests.testing_utils.models import random_video

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer():
    return load_caption_tokenizer()


# --------------------------------------------------------------------------- the corpus grammar


def _spec(kind: str = "video", **changes) -> ClipSpec:
    obj = ObjectSpec("circle", "red", "medium", "solid", "slide_left", 0.3, 0.7, 0.0)
    base = ClipSpec(
        path="x.mp4",
        kind=kind,
        width=128,
        height=72,
        aspect="16:9",
        fps=24 if kind == "video" else 0,
        num_frames=29 if kind == "video" else 1,
        speed="fast" if kind == "video" else "none",
        camera="static",
        background="solid",
        background_colors=("navy",),
        gradient_axis="vertical",
        objects=(obj,),
        captioned=True,
        seed=0,
    )
    return dataclasses.replace(base, **changes)


def _grammar_forms() -> list[ClipSpec]:
    """Every branch of ``describe``: media, framings, objects, textures, motions, cameras,
    backdrops."""
    obj = ObjectSpec("circle", "red", "medium", "solid", "slide_left", 0.3, 0.7, 0.0)
    forms = [_spec(), _spec("image", objects=(dataclasses.replace(obj, motion="still"),))]
    forms += [_spec(width=72, height=128, aspect="9:16"), _spec(width=96, height=96, aspect="1:1")]
    for motion in ("still", "bounce", "slide_left", "slide_right", "orbit", "zoom_in", "zoom_out"):
        for speed in ("slow", "fast"):
            forms.append(_spec(objects=(dataclasses.replace(obj, motion=motion),), speed=speed))
    for texture, size in (("striped", "small"), ("checkered", "large")):
        forms.append(_spec(objects=(dataclasses.replace(obj, texture=texture, size=size),)))
    for camera in ("pan_left", "pan_right"):
        forms.append(_spec(camera=camera))
    forms.append(_spec(background="gradient", background_colors=("sky blue", "charcoal grey")))
    forms.append(
        _spec(background="gradient", background_colors=("beige", "maroon"), gradient_axis="x")
    )
    forms.append(_spec(background="noise", background_colors=("dark green",)))
    second = dataclasses.replace(obj, shape="star", color="yellow", x=0.5, y=0.5)
    third = dataclasses.replace(obj, shape="ring", color="pink", x=0.8, y=0.2, motion="still")
    forms.append(_spec(objects=(obj, second)))
    still = dataclasses.replace(second, motion="still")
    forms.append(_spec("image", objects=(still, third, dataclasses.replace(third, x=0.2))))
    return forms


def test_tokenizer_round_trips_every_caption_form(tokenizer):
    for spec in _grammar_forms():
        for text in describe(spec):
            ids = tokenizer.encode(text, 256)
            assert ids[-1] == tokenizer.end_id and len(ids) <= 256
            assert tokenizer.decode(ids) == text
            assert tokenizer.decode([tokenizer.task_ids["short"], *ids, 0, 0]) == text
    assert tokenizer.decode(tokenizer.encode("The shot lasts 1.2 seconds.", 64)).endswith(
        "1.2 seconds."
    )
    cut = tokenizer.encode(describe(_spec())[0], 10)
    assert len(cut) == 10 and cut[-1] == tokenizer.end_id


def test_sizes_and_config_errors():
    assert {"captioner-tiny", "captioner-xs", "captioner-s"} <= set(CAPTIONER_SIZES)
    tiny = CAPTIONER_SIZES["captioner-tiny"]
    assert tiny.dim == 32 and tiny.decoder_layers == tiny.encoder_layers == 1
    with pytest.raises(UnknownSizeError, match="unknown captioner size 'captioner-huge'"):
        build_captioner("captioner-huge")
    with pytest.raises(ValueError, match="divisible by heads"):
        CaptionerConfig(dim=30, heads=4)
    with pytest.raises(ValueError, match="must hold unk_id"):
        CaptionerConfig(vocab=(0, 1, 2))
    with pytest.raises(ValueError, match="unknown CaptionerConfig key"):
        CaptionerConfig.from_dict({"widthz": [8]})


# --------------------------------------------------------------------------- the model


def _texts() -> list[str]:
    return [t for spec in _grammar_forms() for t in describe(spec)]


@pytest.fixture(scope="module")
def vocab(tokenizer):
    return build_vocab(tokenizer, _texts())


class TestCaptioner(ModelTesterMixin):
    model_class = Captioner

    @pytest.fixture(autouse=True)
    def _vocab(self, vocab, tokenizer):
        self.vocab, self.tokenizer = vocab, tokenizer

    def init_config(self):
        return CAPTIONER_SIZES.config("captioner-tiny", vocab=self.vocab)

    def inputs(self, seed: int = 0):
        videos = [random_video(3, 1, 20, 36, seed=seed), random_video(3, 7, 30, 22, seed=seed + 1)]
        ids, mask = prompt_batch(self.tokenizer, ["red ball sliding left"], 32)
        tasks, texts = ["descriptive", "short", "expand"], _texts()[:3]
        tokens, _ = teacher_forcing(self.tokenizer, tasks, texts, 64)
        return {"videos": videos, "ids": ids, "mask": mask, "tokens": tokens}

    def output(self, model, inputs):  # both memories, so every check sees both encoders
        video_memory, video_mask = model.encode_videos(inputs["videos"])
        prompt_memory, prompt_mask = model.encode_prompts(inputs["ids"], inputs["mask"])
        width = max(video_memory.shape[1], prompt_memory.shape[1])
        pad = width - prompt_memory.shape[1]
        memory = torch.cat([video_memory, torch.nn.functional.pad(prompt_memory, (0, 0, 0, pad))])
        mask = torch.cat([video_mask, torch.nn.functional.pad(prompt_mask, (0, pad))])
        return model(inputs["tokens"], memory, mask)

    def test_logits_are_over_the_sub_vocabulary(self):
        model = self.build()
        with torch.no_grad():
            logits = self.output(model, self.inputs())
        assert logits.shape[:2] == self.inputs()["tokens"].shape
        assert logits.shape[-1] == len(self.vocab) == model.vocab_ids.numel()
        unknown = torch.tensor([[self.tokenizer.backend.convert_tokens_to_ids("zebra")]])
        assert (
            model.model_index(unknown).item()
            == model.model_index(torch.tensor([[self.tokenizer.unk_id]])).item()
        )

    def test_every_position_sees_the_memory_summary(self):
        # the pooled memory reaches the first decoded position even with cross-attention off
        model = self.build().eval()
        for block in model.blocks:
            torch.nn.init.zeros_(block.cross_attn.out.weight)
            torch.nn.init.zeros_(block.cross_attn.out.bias)
        tokens = self.inputs()["tokens"][:1, :1]  # (1, 1): the task token alone
        memory = torch.randn(2, 5, model.config.dim)
        mask = torch.ones(2, 5, dtype=torch.bool)
        with torch.no_grad():
            logits = model(tokens.expand(2, 1), memory, mask)  # (2, 1, V)
        assert not torch.allclose(logits[0], logits[1])


def test_any_clip_size_and_length_encodes(vocab):
    model = build_captioner("captioner-tiny", vocab=vocab).eval()
    g = model.config.grid**2
    clips = [
        random_video(3, 1, 17, 31, seed=1),  # odd-sized still
        random_video(3, 2, 9, 50, seed=2),  # 2 frames, very wide
        random_video(3, 13, 41, 23, seed=3),  # tall, odd length
        random_video(3, 1, 17, 31, seed=4),  # same shape as the first: one trunk pass
    ]
    with torch.no_grad():
        memory, mask = model.encode_videos(clips)
        alone = model.encode_videos(clips[2:3])[0]
    frames = model.config.frames
    assert memory.shape == (4, frames * g + 1, model.config.dim)
    assert mask.sum(1).tolist() == [g + 1, frames * g + 1, frames * g + 1, g + 1]
    assert torch.allclose(memory[2], alone[0], atol=1e-5)  # batching changes nothing
    assert sample_frames(clips[2], frames).shape[1] == frames
    assert sample_frames(clips[0], frames).shape[1] == 1


# --------------------------------------------------------------------------- training, decoding


def _clips() -> list[tuple[torch.Tensor, str, str]]:
    """4 tiny synthetic clips (colour, motion) with a descriptive and a short caption each."""
    out = []
    for rgb, colour, direction in [
        ((1, -1, -1), "red", 1),
        ((-1, 1, -1), "green", -1),
        ((-1, -1, 1), "blue", 1),
        ((1, 1, -1), "yellow", 0),
    ]:
        t = 1 if direction == 0 else 6
        video = torch.full((3, t, 20, 28), -0.6)
        for f in range(t):
            x = 4 + 3 * f if direction > 0 else 20 - 3 * f
            x = 12 if direction == 0 else x
            video[:, f, 7:13, x : x + 6] = torch.tensor(rgb, dtype=torch.float)[:, None, None]
        motion = {1: "slides from left to right", -1: "slides from right to left", 0: "sits still"}
        long = f"A video of one object. A small {colour} square {motion[direction]}."
        out.append((video, long, f"{colour} square"))
    return out


@pytest.fixture(scope="module")
def overfit(tokenizer):
    data = _clips()
    texts = [t for _, long, short in data for t in (long, short)]
    torch.manual_seed(0)
    model = build_captioner("captioner-tiny", vocab=build_vocab(tokenizer, texts), dim=64)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    videos = [v for v, _, _ in data] * 2
    tasks = ["descriptive"] * 4 + ["short"] * 4
    inputs, targets = teacher_forcing(
        tokenizer, tasks, [d[1] for d in data] + [d[2] for d in data], 64
    )
    for _ in range(250):
        memory, mask = model.encode_videos(videos)
        loss = caption_loss(model, model(inputs, memory, mask), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), data, loss.item()


def test_the_tiny_captioner_overfits_a_handful_of_clips(overfit, tokenizer):
    model, data, loss = overfit
    assert loss < 0.05, loss
    videos = [v for v, _, _ in data]
    for style, column in zip(STYLES, (2, 1), strict=True):
        greedy = caption_videos(model, tokenizer, videos, style, num_beams=1)
        beam = caption_videos(model, tokenizer, videos, style, num_beams=3)
        assert [c for c, _ in greedy] == [d[column] for d in data]
        assert [c for c, _ in beam] == [c for c, _ in greedy]
        assert all(-0.1 < lp <= 0 for _, lp in greedy + beam)  # confident: mean log-prob ~ 0


def test_sampling_is_deterministic_by_seed(tokenizer, vocab):
    torch.manual_seed(1)
    model = build_captioner("captioner-tiny", vocab=vocab).eval()
    prompts = ["red ball sliding left", "blue star"]
    first = expand_prompts(model, tokenizer, prompts, seed=7, num_return=3, max_new_tokens=12)
    again = expand_prompts(model, tokenizer, prompts, seed=7, num_return=3, max_new_tokens=12)
    other = expand_prompts(model, tokenizer, prompts, seed=8, num_return=3, max_new_tokens=12)
    assert first == again and first != other
    assert len(first) == 2 and all(len(p) == 3 for p in first)
    assert len({text for text, _ in first[0]}) > 1  # a random model: the samples differ
    alone = expand_prompts(model, tokenizer, prompts[1:], seed=7, num_return=3, max_new_tokens=12)
    # a prompt's samples do not depend on the other prompts (log-probs: up to batching's rounding)
    assert [t for t, _ in alone[0]] == [t for t, _ in first[1]]
    assert [lp for _, lp in alone[0]] == pytest.approx([lp for _, lp in first[1]], abs=1e-5)
    assert all(lp <= 0 for p in first for _, lp in p)


def test_decoding_stops_at_the_end_token_and_the_length_limit(tokenizer, vocab):
    torch.manual_seed(2)
    model = build_captioner("captioner-tiny", vocab=vocab).eval()
    memory, mask = model.encode_videos([random_video(3, 1, 16, 16)])
    start = tokenizer.task_ids["descriptive"]
    ((ids, logp),) = generate(model, memory, mask, start, tokenizer.end_id, max_new_tokens=5)
    assert 1 <= len(ids) <= 5 and logp <= 0
    ((beam_ids, _),) = generate(
        model, memory, mask, start, tokenizer.end_id, num_beams=2, max_new_tokens=5
    )
    assert 1 <= len(beam_ids) <= 5
