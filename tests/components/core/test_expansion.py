"""Prompt expansion: attributes and stems, the expander's guarantees (seeded, within max_words,
every attribute kept), and each backend against the real thing: a chat-completions server on a
loopback socket, a tiny causal LM saved to disk, the captioner's decoder call."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest

from components.core.config import ExpandConfig, TesseraConfig
from components.core.expansion import (
    BuiltinBackend,
    ChatBackend,
    ExpansionError,
    HFBackend,
    added_attributes,
    choose_examples,
    cut_words,
    display_url,
    expand,
    missing_attributes,
    prompt_attributes,
    stem,
)
from tests.conftest import free_port
from tests.testing_utils.chat_server import ChatServer, raw, reply, sleep, status

PROMPT = "red ball bouncing"
EXAMPLES = [
    ("blue cube sliding", "A wide video of one object on plain grey. A blue cube slides left."),
    ("green star", "A square still image of one object on plain white. A green star."),
    ("red disc circling", "A tall video of one object on a gradient. A red disc circles."),
    ("pink square", "A wide still image of one object on plain black. A pink square."),
    ("white ball spinning", "A wide video of one object on plain blue. A white ball spins."),
]
KEY = "sk-test-0123456789"


def config(**expand: object) -> TesseraConfig:
    return dataclasses.replace(TesseraConfig(), expand=ExpandConfig(**expand))


class ScriptedBackend:
    """Candidates from a function of the seed; records its calls."""

    name = "scripted"
    model = "scripted-v1"

    def __init__(self, make=None, fail: str | None = None) -> None:
        self.make = make or (
            lambda seed, n: [f"A red ball bouncing, take {seed}-{i}." for i in range(n)]
        )
        self.fail, self.calls = fail, []

    def candidates(self, prompt, *, seed, n, examples=()):
        self.calls.append({"prompt": prompt, "seed": seed, "n": n, "examples": list(examples)})
        if self.fail:
            raise ExpansionError(self.fail)
        return self.make(seed, n)


# --------------------------------------------------------------------------- attributes


@pytest.mark.parametrize(
    "forms",
    [
        ("bounce", "bounces", "bouncing", "bounced"),
        ("slide", "slides", "sliding"),
        ("circle", "circles", "circling", "circled"),
        ("run", "runs", "running"),
        ("spin", "spins", "spinning"),
        ("ball", "balls", "Ball", "ball's"),
        ("box", "boxes"),
        ("glass", "glasses"),
        ("sky", "skies"),
        ("tree", "trees"),
        ("speed", "speeding", "speeds"),
    ],
)
def test_stem_joins_the_forms_of_a_word(forms):
    assert len({stem(f) for f in forms}) == 1, {f: stem(f) for f in forms}


def test_stem_keeps_different_words_apart_and_short_words_whole():
    words = ["ball", "bounce", "red", "green", "string", "sing", "bus", "blue", "slide", "slow"]
    assert len({stem(w) for w in words}) == len(words)
    assert [stem(w) for w in ("red", "sing", "string", "bus")] == ["red", "sing", "string", "bus"]


def test_prompt_attributes_are_content_words_once_each():
    assert prompt_attributes("A red ball bouncing on the grass") == [
        "red",
        "ball",
        "bouncing",
        "grass",
    ]
    assert prompt_attributes("Two RED balls, one red ball!") == ["two", "red", "balls"]
    assert prompt_attributes("the of and") == []


def test_missing_and_added_attributes_compare_stems():
    attributes = prompt_attributes(PROMPT)
    assert missing_attributes(attributes, "A red ball bounces on grey.") == []
    assert missing_attributes(attributes, "A red sphere bounces.") == ["ball"]
    # "grey", "sphere" added; "bounces" is an attribute's form, not an addition
    assert added_attributes(PROMPT, "A red sphere bounces on grey, a ball.") == 2


def test_cut_words_stops_at_a_sentence_end_and_never_inside_a_word():
    text = "One two three. Four five six seven. Eight nine ten eleven twelve."
    assert cut_words(text, 100) == text
    assert cut_words(text, 9) == "One two three. Four five six seven."
    assert cut_words("Alpha beta gamma, delta epsilon zeta", 4) == "Alpha beta gamma, delta."
    assert cut_words("  spaced\n out   text ", 5) == "spaced out text"
    cut = cut_words("supercalifragilistic " * 10, 3)
    assert cut.split() == ["supercalifragilistic"] * 2 + ["supercalifragilistic."]


# --------------------------------------------------------------------------- the expander


def test_expand_is_deterministic_by_seed():
    cfg = config(candidates=2)
    first = expand(PROMPT, cfg, seed=3, backend=ScriptedBackend())
    assert first == expand(PROMPT, cfg, seed=3, backend=ScriptedBackend())
    assert expand(PROMPT, cfg, seed=4, backend=ScriptedBackend()).text != first.text
    assert first.prompt == PROMPT and first.text == "A red ball bouncing, take 3-0."
    meta = first.metadata
    assert meta["backend"] == "scripted" and meta["model"] == "scripted-v1" and meta["seed"] == 3
    assert meta["attributes"] == ["red", "ball", "bouncing"]
    assert meta["kept"] is True and meta["kept_by"] == "candidate" and meta["chosen"] == 0
    assert meta["added"] == 3 and meta["words"] == 6  # take, 3, 0 and meta["candidates"] == 2
    assert meta["fallback"] is None


def test_expand_takes_the_first_candidate_that_keeps_every_attribute():
    texts = ["A blue ball bouncing.", "A red ball resting.", "A red ball bounces on grey."]
    backend = ScriptedBackend(lambda seed, n: texts[:n])
    out = expand(PROMPT, config(candidates=3), backend=backend)
    assert out.text == texts[2] and out.metadata["chosen"] == 2
    assert backend.calls[0]["n"] == 3


def test_expand_prefixes_the_prompt_when_every_candidate_drops_an_attribute():
    texts = ["A blue sphere bounces on grey.", "A large red ball rests on a plain grey floor."]
    out = expand(PROMPT, config(candidates=2), backend=ScriptedBackend(lambda s, n: texts))
    # the best candidate (one attribute missing, not two) follows the user's own words
    assert out.text == "red ball bouncing. A large red ball rests on a plain grey floor."
    assert out.metadata["kept_by"] == "prefix" and out.metadata["chosen"] is None
    assert out.metadata["kept"] is True


def test_expand_respects_max_words_including_the_prefix():
    long = " ".join(["A red ball bouncing on a plain grey floor."] * 20)
    out = expand(PROMPT, config(max_words=12), backend=ScriptedBackend(lambda s, n: [long]))
    assert out.text == "A red ball bouncing on a plain grey floor."
    dropped = "The sphere moves on grey. " * 20
    out = expand(PROMPT, config(max_words=8), backend=ScriptedBackend(lambda s, n: [dropped]))
    assert out.metadata["kept_by"] == "prefix" and out.metadata["words"] <= 8
    assert out.text.startswith("red ball bouncing. The sphere")
    assert not missing_attributes(out.metadata["attributes"], out.text)


def test_cut_happens_before_the_attribute_check():
    # "bouncing" only appears past the limit: the candidate does not keep it
    text = "A red ball on grey. " * 3 + "It is bouncing."
    out = expand(PROMPT, config(max_words=10), backend=ScriptedBackend(lambda s, n: [text]))
    assert out.metadata["kept_by"] == "prefix" and out.metadata["words"] <= 10


def test_few_shot_examples_are_chosen_by_seed():
    assert choose_examples(EXAMPLES, 2, seed=1) == choose_examples(EXAMPLES, 2, seed=1)
    assert choose_examples(EXAMPLES, 9, seed=1) == EXAMPLES
    picks = {tuple(choose_examples(EXAMPLES, 2, seed=s)) for s in range(10)}
    assert len(picks) > 1 and all(len(p) == 2 for p in picks)
    backend = ScriptedBackend()
    out = expand(PROMPT, config(few_shot=2), seed=5, examples=EXAMPLES, backend=backend)
    assert backend.calls[0]["examples"] == choose_examples(EXAMPLES, 2, seed=5)
    assert out.metadata["examples"] == 2


def test_examples_load_from_the_config_file(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([{"short": s, "long": t} for s, t in EXAMPLES]))
    backend = ScriptedBackend()
    expand(PROMPT, config(examples=str(path), few_shot=9), backend=backend)
    assert backend.calls[0]["examples"] == EXAMPLES
    path.write_text('{"not": "a list"}')
    with pytest.raises(ExpansionError, match="not a JSON list"):  # a config error: no fallback
        expand(PROMPT, config(examples=str(path), fallback=True), backend=backend)
    with pytest.raises(ExpansionError, match="not a JSON list"):
        expand(PROMPT, config(examples='[["only a short one"]]'), backend=backend)
    inline = json.dumps([list(pair) for pair in EXAMPLES[:1]])
    expand(PROMPT, config(examples=inline), backend=backend)
    assert backend.calls[-1]["examples"] == EXAMPLES[:1]


def test_failure_raises_unless_fallback_and_the_fallback_is_recorded(caplog):
    failing = ScriptedBackend(fail="scripted endpoint is down; start it")
    with pytest.raises(ExpansionError, match="start it"):
        expand(PROMPT, config(), backend=failing)
    out = expand(PROMPT, config(fallback=True), seed=2, backend=failing)
    assert out.text == PROMPT
    assert out.metadata["fallback"] == "scripted endpoint is down; start it"
    assert out.metadata["kept_by"] == "prompt" and out.metadata["added"] == 0
    assert "prompt expansion failed" in caplog.text


def test_a_backend_that_returns_no_text_is_a_failure():
    with pytest.raises(ExpansionError, match="returned no text"):
        expand(PROMPT, config(), backend=ScriptedBackend(lambda s, n: ["", "  "]))
    with pytest.raises(ValueError, match="non-empty prompt"):
        expand("  ", config(), backend=ScriptedBackend())


def test_builtin_without_a_captioner_says_how_to_give_one():
    with pytest.raises(ExpansionError, match="BuiltinBackend"):
        expand(PROMPT, config())


# --------------------------------------------------------------------------- builtin


@pytest.fixture(scope="module")
def tiny_captioner():
    """A randomly initialised ``captioner-tiny`` and its (offline, bundled) tokenizer."""
    import torch

    from model.captioner import CAPTIONER_SIZES, Captioner, load_caption_tokenizer

    torch.manual_seed(0)
    model = Captioner(CAPTIONER_SIZES.config("captioner-tiny")).eval()
    return model, load_caption_tokenizer(model.config.tokenizer)


@pytest.mark.slow  # the bundled tokenizer imports transformers: several seconds on CPU
def test_builtin_backend_samples_the_captioner_by_seed_most_likely_first(tiny_captioner):
    from model.captioner import expand_prompts

    model, tokenizer = tiny_captioner
    backend = BuiltinBackend(model, tokenizer, temperature=0.7, max_new_tokens=12)
    texts = backend.candidates(PROMPT, seed=7, n=3)
    assert texts == backend.candidates(PROMPT, seed=7, n=3)
    assert texts != backend.candidates(PROMPT, seed=8, n=3)
    scored = expand_prompts(model, tokenizer, [PROMPT], seed=7, num_return=3, max_new_tokens=12)[0]
    assert texts == [t for t, _ in sorted(scored, key=lambda pair: -pair[1])]
    out = expand(PROMPT, config(candidates=3), seed=7, backend=backend)
    assert out == expand(PROMPT, config(candidates=3), seed=7, backend=backend)
    # a random decoder drops the user's words: the prefix keeps them
    assert out.metadata["backend"] == "builtin" and out.metadata["model"] == "Captioner"
    assert out.metadata["kept_by"] == "prefix" and out.text.startswith("red ball bouncing. ")
    assert out.metadata["kept"] and out.metadata["words"] <= 80


@pytest.mark.slow
def test_builtin_backend_loads_a_saved_captioner_from_the_config(tiny_captioner, tmp_path):
    model, _ = tiny_captioner
    model.save_pretrained(tmp_path / "captioner")
    cfg = config(model=str(tmp_path / "captioner"), candidates=2, max_words=20)
    out = expand(PROMPT, cfg, seed=1)
    assert out.metadata["model"] == str(tmp_path / "captioner") and out.metadata["words"] <= 20
    with pytest.raises(ExpansionError, match="no captioner in"):
        expand(PROMPT, config(model=str(tmp_path)))


@pytest.mark.slow
def test_the_latest_trained_captioner_and_its_pairs_expand_from_the_store(
    tiny_captioner, tessera_home
):
    """What ``tessera expand`` and ``generate.expand`` do: the latest train_captioner outputs
    give the builtin backend and the few-shot pool; a missing one is a clear error, or a
    recorded fallback when asked for."""

    from components.core import expansion, storage
    from components.core.config import load_config

    cfg = load_config("tiny")
    with pytest.raises(ExpansionError, match="has no trained captioner; run the train_captioner"):
        expansion.load_backend(cfg)
    fallback = load_config("tiny", ["expand.fallback=true"])
    out = expansion.expand_with_config(PROMPT, fallback, seed=0)
    assert out.text == PROMPT and "no trained captioner" in out.metadata["fallback"]

    step = Path(storage.local_path(cfg.store_uri())) / "runs" / "r1" / "train_captioner"
    tiny_captioner[0].save_pretrained(step / "captioner")
    (step / "pairs.json").write_text(json.dumps([{"short": a, "long": b} for a, b in EXAMPLES]))
    latest = Path(storage.local_path(cfg.store_uri())) / "latest"
    latest.mkdir(parents=True, exist_ok=True)
    outputs = {"captioner": str(step / "captioner"), "pairs": str(step / "pairs.json")}
    (latest / "train_captioner.json").write_text(json.dumps(outputs))
    backend, examples = expansion.load_backend(cfg)
    assert backend.name == "builtin" and backend.model == outputs["captioner"]
    assert examples == [tuple(e) for e in EXAMPLES]
    out = expansion.expand_with_config(PROMPT, cfg, seed=2)
    assert out == expansion.expand_with_config(PROMPT, cfg, seed=2) and out.metadata["kept"]
    # --model names another captioner: its pairs.json beside it is the pool
    named = load_config("tiny", [f"expand.model={outputs['captioner']}"])
    assert expansion.load_backend(named)[1] == examples


def test_builtin_backend_needs_a_sampling_temperature():
    with pytest.raises(ExpansionError, match="temperature must be > 0"):
        BuiltinBackend(object(), object(), temperature=0.0)


# --------------------------------------------------------------------------- chat


def chat_backend(server: ChatServer | str, **kwargs) -> ChatBackend:
    base_url = server if isinstance(server, str) else server.base_url
    return ChatBackend(base_url, "tiny-chat", **{"backoff_s": 0.01, "timeout_s": 2.0, **kwargs})


def test_chat_request_carries_model_few_shot_seed_and_key(monkeypatch):
    monkeypatch.setenv("TESSERA_EXPAND_API_KEY", KEY)
    with ChatServer() as server:
        cfg = config(
            backend="chat",
            base_url=server.base_url,
            model_name="tiny-chat",
            candidates=2,
            few_shot=2,
        )
        out = expand(PROMPT, cfg, seed=11, examples=EXAMPLES)
    assert out.text.startswith("A wide shot of red ball bouncing") and "Variation 11-0" in out.text
    assert out.metadata["backend"] == "chat" and out.metadata["kept_by"] == "candidate"
    assert out.metadata["model"] == f"tiny-chat @ {server.base_url}"
    assert KEY not in repr(out)
    (request,) = server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {KEY}"
    body = request["body"]
    assert body["model"] == "tiny-chat" and body["seed"] == 11 and body["n"] == 2
    assert body["temperature"] == 0.7 and body["max_tokens"] > 80
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user"]
    shots = choose_examples(EXAMPLES, 2, seed=11)
    assert [m["content"] for m in body["messages"][1:5]] == [x for pair in shots for x in pair]
    assert body["messages"][-1]["content"] == PROMPT
    assert "descriptive caption" in body["messages"][0]["content"]


def test_chat_without_a_key_sends_no_authorization(monkeypatch):
    monkeypatch.delenv("TESSERA_EXPAND_API_KEY", raising=False)
    with ChatServer() as server:
        expand(PROMPT, config(backend="chat", base_url=server.base_url, model_name="m"))
    assert "Authorization" not in server.requests[0]["headers"]


def test_chat_asks_again_when_the_server_returns_fewer_choices():
    with ChatServer([reply("red ball bouncing, one.")]) as server:
        texts = chat_backend(server).candidates(PROMPT, seed=4, n=3)
    assert texts[0] == "red ball bouncing, one." and len(texts) == 3
    assert [(r["body"]["seed"], r["body"]["n"]) for r in server.requests] == [(4, 3), (5, 2)]


def test_chat_timeout_is_retried_then_named():
    with ChatServer([sleep(2.0), sleep(2.0)]) as server:
        backend = chat_backend(server, timeout_s=0.2, retries=1)
        with pytest.raises(ExpansionError, match="timed out after 2 tries") as error:
            backend.candidates(PROMPT, seed=0, n=1)
        assert len(server.requests) == 2
    assert f"{server.base_url}/chat/completions" in str(error.value)
    assert "expand.timeout_s=0.2" in str(error.value)


def test_chat_timeout_then_success():
    with ChatServer([sleep(2.0)]) as server:
        texts = chat_backend(server, timeout_s=0.2, retries=1).candidates(PROMPT, seed=0, n=1)
    assert texts and len(server.requests) == 2


def test_chat_retries_a_server_error_then_succeeds():
    with ChatServer([status(500, "boom")]) as server:
        texts = chat_backend(server, retries=2).candidates(PROMPT, seed=0, n=1)
    assert len(texts) == 1 and len(server.requests) == 2


def test_chat_gives_up_after_the_retries_with_the_status_and_body():
    with (
        ChatServer([status(503, "overloaded " + "x" * 500)] * 3) as server,
        pytest.raises(ExpansionError, match="HTTP 503 after 3 tries: 'overloaded x") as error,
    ):
        chat_backend(server, retries=2).candidates(PROMPT, seed=0, n=1)
    assert len(server.requests) == 3 and "x" * 201 not in str(error.value)


def test_chat_honours_retry_after_on_429():
    with ChatServer([status(429, "slow down", {"Retry-After": "0"})]) as server:
        start = time.perf_counter()
        # a backoff of 30 s would blow the test's time: Retry-After (0 s) wins
        texts = chat_backend(server, backoff_s=30.0).candidates(PROMPT, seed=0, n=1)
    assert time.perf_counter() - start < 3 and texts and len(server.requests) == 2


def test_chat_does_not_retry_a_client_error_and_hides_the_key():
    with ChatServer([status(401, f"invalid key {KEY}")]) as server:
        backend = chat_backend(server, api_key=KEY)
        with pytest.raises(ExpansionError, match="HTTP 401") as error:
            backend.candidates(PROMPT, seed=0, n=1)
    assert len(server.requests) == 1
    assert "TESSERA_EXPAND_API_KEY" in str(error.value) and KEY not in str(error.value)
    assert KEY not in repr(backend)


@pytest.mark.parametrize("body", ["not json {", '{"choices": []}', '{"choices": [{"text": "x"}]}'])
def test_chat_malformed_answer_names_the_missing_field(body):
    with (
        ChatServer([raw(body)]) as server,
        pytest.raises(ExpansionError, match=r"choices\[0\]\.message\.content") as error,
    ):
        chat_backend(server).candidates(PROMPT, seed=0, n=1)
    assert server.base_url in str(error.value) and len(server.requests) == 1


def test_chat_unreachable_names_the_url_and_falls_back_when_asked():
    base_url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    with pytest.raises(ExpansionError, match="unreachable after 2 tries") as error:
        chat_backend(base_url, retries=1).candidates(PROMPT, seed=0, n=1)
    assert f"{base_url}/chat/completions" in str(error.value)
    assert "expand.base_url" in str(error.value)
    cfg = config(backend="chat", base_url=base_url, model_name="m", retries=0, fallback=True)
    out = expand(PROMPT, cfg, seed=1)
    assert out.text == PROMPT and "unreachable" in out.metadata["fallback"]
    assert out.metadata["model"] == f"m @ {base_url}"


def test_chat_needs_a_base_url_and_never_shows_url_credentials():
    with pytest.raises(ExpansionError, match="expand.base_url is empty"):
        expand(PROMPT, config(backend="chat"))
    assert display_url("http://user:pw@vllm:8000/v1") == "http://vllm:8000/v1"
    assert display_url("https://api.example/v1") == "https://api.example/v1"


# --------------------------------------------------------------------------- hf


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from tests.testing_utils.causal_lm import save_tiny_causal_lm

    root = tmp_path_factory.mktemp("lm")
    return {
        "plain": save_tiny_causal_lm(root / "plain", seed=0),
        "chat": save_tiny_causal_lm(root / "chat", seed=0, chat_template=True),
    }


@pytest.mark.slow  # importing transformers alone takes several seconds on CPU
@pytest.mark.parametrize("kind", ["plain", "chat"])
def test_hf_backend_is_seeded_and_leaves_the_global_rng_alone(tiny_lm, kind):
    import torch

    backend = HFBackend(tiny_lm[kind], max_words=20, max_new_tokens=12)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = backend.candidates(PROMPT, seed=1, n=3, examples=EXAMPLES[:2])
    assert torch.equal(torch.rand(3), expected)  # the call forked the RNG
    assert first == backend.candidates(PROMPT, seed=1, n=3, examples=EXAMPLES[:2])
    assert first != backend.candidates(PROMPT, seed=2, n=3, examples=EXAMPLES[:2])
    # only the generated tokens come back (one word per token here), never the prompt
    assert len(first) == 3 and all(len(t.split()) <= 12 for t in first)


@pytest.mark.slow
def test_hf_expand_from_the_config_keeps_the_attributes(tiny_lm):
    cfg = config(backend="hf", model=str(tiny_lm["plain"]), max_words=15, candidates=2)
    out = expand(PROMPT, cfg, seed=0, examples=EXAMPLES)
    assert out == expand(PROMPT, cfg, seed=0, examples=EXAMPLES)
    assert out.metadata["backend"] == "hf" and out.metadata["model"] == str(tiny_lm["plain"])
    assert out.metadata["kept"] and out.metadata["words"] <= 15


def test_hf_missing_or_incomplete_directory_says_what_is_expected(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ExpansionError, match="is not a directory") as error:
        expand(PROMPT, config(backend="hf", model=str(missing)))
    assert str(missing) in str(error.value) and "config.json" in str(error.value)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ExpansionError, match="tokenizer.json") as error:
        HFBackend(tmp_path)
    assert str(tmp_path) in str(error.value)
    out = expand(PROMPT, config(backend="hf", model=str(missing), fallback=True))
    assert out.text == PROMPT and str(missing) in out.metadata["fallback"]
    assert out.metadata["model"] == str(missing) and out.metadata["backend"] == "hf"
    with pytest.raises(ExpansionError, match="download it first"):
        HFBackend("s3://bucket/lm")


@pytest.mark.slow
def test_hf_corrupt_directory_is_a_clear_error(tmp_path):
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (tmp_path / name).write_text("garbage")
    with pytest.raises(ExpansionError, match="cannot load the causal LM") as error:
        HFBackend(tmp_path)
    assert str(tmp_path) in str(error.value)
