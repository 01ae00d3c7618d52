"""The loader of pretrained transformers captioners, on a tiny random VisionEncoderDecoderModel
(ViT encoder + GPT-2 decoder) the test builds and saves: nothing is downloaded."""

from __future__ import annotations

import json

import pytest
import torch

from model.pretrained_captioner import PretrainedCaptioner, is_pretrained_dir
from tests.testing_utils.causal_lm import tiny_word_tokenizer

pytestmark = pytest.mark.slow  # importing transformers' vision models takes seconds on CPU


def save_tiny_vision_captioner(path, seed: int = 0):
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    torch.manual_seed(seed)
    tokenizer = tiny_word_tokenizer()
    encoder = ViTModel(
        ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        )
    )
    decoder = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=64,
            n_embd=16,
            n_layer=1,
            n_head=2,
            add_cross_attention=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    model = VisionEncoderDecoderModel(encoder=encoder, decoder=decoder)
    model.config.decoder_start_token_id = tokenizer.bos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.decoder_start_token_id = tokenizer.bos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def torchvision_placeholder():
    """Make ``torchvision`` resolve to the failing placeholder, as it does in a worker that ran
    the cross-check tests first: transformers then believes torchvision is there, and the loader
    must still keep to the PIL backend."""
    import sys

    from transformers.utils import import_utils

    from tests.testing_utils import no_torchvision

    before = list(sys.meta_path)
    no_torchvision.install()
    checks = (import_utils.is_torchvision_available, import_utils.is_torchvision_v2_available)
    for check in checks:
        check.cache_clear()
    yield
    sys.meta_path[:] = before
    for check in checks:
        check.cache_clear()


def test_a_saved_transformers_captioner_captions_clips_in_both_styles(
    tmp_path, torchvision_placeholder
):
    path = save_tiny_vision_captioner(tmp_path / "vlm")
    assert is_pretrained_dir(path) and not is_pretrained_dir(tmp_path)
    captioner = PretrainedCaptioner.from_dir(path)
    assert captioner.config.model_type == "vision-encoder-decoder"
    assert captioner.config.short_side == 32
    clips = [torch.rand(3, 5, 24, 40) * 2 - 1, torch.rand(3, 1, 30, 30) * 2 - 1]
    for style, limit in (("short", 12), ("descriptive", 20)):
        found = captioner.caption(clips, style=style, num_beams=2, max_new_tokens=20)
        assert len(found) == 2
        for text, logp in found:
            assert isinstance(text, str) and len(text.split()) <= limit
            assert logp <= 0.0
        assert found == captioner.caption(clips, style=style, num_beams=2, max_new_tokens=20)


def test_a_missing_or_broken_directory_says_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected config.json, the weights"):
        PretrainedCaptioner.from_dir(tmp_path)
    path = save_tiny_vision_captioner(tmp_path / "vlm")
    (path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises((ValueError, OSError), match="vlm"):
        PretrainedCaptioner.from_dir(path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"dim": 32}))
    assert not is_pretrained_dir(tmp_path / "other")  # one of ours, not a transformers model
