"""Prompt expansion: a short prompt becomes a long caption in the style of the training captions.

Sora and DALL-E 3 train on long, descriptive (re)captions, so a short user prompt ("red ball
bouncing") is first rewritten into that style. :func:`expand` asks a :class:`Backend` for up to
``expand.candidates`` sampled expansions, cuts each to ``expand.max_words`` and keeps the first
that still names every attribute the user gave (see :func:`prompt_attributes`); when none does,
the prompt is put in front of the best one, so the guarantee always holds.

Backends (``expand.backend``):

- ``builtin``: the captioner's text decoder, trained on (short, long) caption pairs
  (:class:`BuiltinBackend`, from ``model.captioner``);
- ``chat``: an OpenAI-compatible chat-completions endpoint, e.g. a team's vLLM
  (:class:`ChatBackend`; the key comes from ``TESSERA_EXPAND_API_KEY``);
- ``hf``: a Hugging Face causal LM in a local directory (:class:`HFBackend`; the caller
  downloads an ``s3://`` model first).

Every result is reproducible from its seed, and every failure is loud: an
:class:`ExpansionError`, or with ``expand.fallback`` the user's own prompt with the reason in
``metadata["fallback"]`` (and a warning in the log).
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from components.core import storage
from components.core.config import Environment, ExpandConfig, TesseraConfig

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

Example = tuple[str, str]  # (short prompt, long caption)


class ExpansionError(RuntimeError):
    """A backend could not expand a prompt; the message names the backend or endpoint and the
    fix (never a credential)."""


# --------------------------------------------------------------------------- attributes

# Function words: articles, pronouns, prepositions, conjunctions, auxiliaries and determiners.
# Everything else the user typed (nouns, colours, verbs, numbers, ...) is an attribute.
STOP_WORDS = frozenset(
    """
    a an the this that these those there here it its it's they them their he she him her his
    we us our you your i me my one ones some any each every all both either neither no not nor
    and or but so yet if then than as of in on at to from by for with without into onto over
    under above below about across along around through between among within upon off up down
    out near behind beside against toward towards while during before after until via per
    is are was were be been being am do does did doing has have had having will would shall
    should can could may might must very too also just quite rather really much many more most
    such own same other another which who whom whose what when where why how
    """.split()  # noqa: SIM905 (a word list reads better as text)
)

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")  # letters and digits, inner apostrophes kept
_VOWEL = re.compile(r"[aeiouy]")
_SENTENCE_END = (".", "!", "?", '."', '!"', '?"')


def stem(word: str) -> str:
    """A small suffix-stripping stemmer: the word's forms share one stem
    (bounce / bounces / bouncing / bounced -> ``bounc``, slide / sliding -> ``slid``,
    run / running -> ``run``, sky / skies -> ``sky``, glass / glasses -> ``glass``).

    Suffixes (``-ies``/``-ied`` -> ``y``, ``-ing``, ``-ed``, ``-es`` after s/x/z/ch/sh, ``-s``)
    come off only when a stem of three letters with a vowel remains; a doubled final consonant
    left by ``-ing``/``-ed`` is undoubled (except l, s, z), and a final silent ``e`` is dropped.
    """
    w = word.lower()
    if w.endswith("'s"):
        w = w[:-2]
    if len(w) > 4 and w.endswith(("ies", "ied")):
        return w[:-3] + "y"
    for suffix in ("ing", "ed", "es", "s"):
        if not w.endswith(suffix):
            continue
        base = w[: -len(suffix)]
        if suffix == "s" and base.endswith(("s", "u", "i")):  # glass, bus, axis
            break
        if suffix == "ed" and base.endswith("e"):  # speed, need
            break
        if suffix == "es" and not base.endswith(("s", "x", "z", "ch", "sh")):
            continue  # trees, bounces: only the "s" comes off (then the silent "e")
        if len(base) >= 3 and _VOWEL.search(base):
            if suffix in ("ing", "ed") and base[-1] == base[-2] and base[-1] not in "aeiouylsz":
                base = base[:-1]  # running -> run, stopped -> stop
            w = base
            break
    if len(w) > 3 and w.endswith("e") and not w.endswith("ee"):
        w = w[:-1]
    return w


def words(text: str) -> list[str]:
    """The lower-cased words of ``text`` (punctuation dropped)."""
    return _WORD.findall(text.lower())


def prompt_attributes(prompt: str) -> list[str]:
    """The attributes a user named: the prompt's content words, lower-cased, stop words
    removed, each once (first spelling of each stem), in prompt order."""
    seen: set[str] = set()
    attributes = []
    for word in words(prompt):
        if word in STOP_WORDS or stem(word) in seen:
            continue
        seen.add(stem(word))
        attributes.append(word)
    return attributes


def _stems(text: str) -> set[str]:
    return {stem(w) for w in words(text) if w not in STOP_WORDS}


def missing_attributes(attributes: Sequence[str], text: str) -> list[str]:
    """The attributes with no word of the same stem in ``text``."""
    present = _stems(text)
    return [a for a in attributes if stem(a) not in present]


def added_attributes(prompt: str, text: str) -> int:
    """How many content words (distinct stems) ``text`` adds to those of ``prompt``."""
    return len(_stems(text) - _stems(prompt))


def cut_words(text: str, max_words: int) -> str:
    """``text`` with whitespace normalised, cut to at most ``max_words`` words: at the last
    sentence end within the limit if that keeps at least half of them, else after a whole word
    (trailing ``,;:`` dropped and a full stop added). Never cuts inside a word."""
    tokens = text.split()
    if len(tokens) <= max_words:
        return " ".join(tokens)
    head = tokens[:max_words]
    ends = [i for i, t in enumerate(head) if t.endswith(_SENTENCE_END)]
    if ends and ends[-1] + 1 >= max(1, max_words // 2):
        return " ".join(head[: ends[-1] + 1])
    return " ".join(head).rstrip(",;:-") + "."


# --------------------------------------------------------------------------- prompts

SYSTEM_PROMPT = (
    "You rewrite short prompts for a text-to-video model into one long, descriptive caption in "
    "the style of its training captions: plain sentences that describe the subjects (count, "
    "colour, shape, size, texture), how each one moves, the background, the camera and the "
    "lighting. Keep every word of detail the user gave. Add only plausible visual detail; no "
    "lists, no titles, no quotes, no preamble. At most {max_words} words."
)


def system_prompt(max_words: int) -> str:
    return SYSTEM_PROMPT.format(max_words=max_words)


def chat_messages(prompt: str, examples: Sequence[Example], max_words: int) -> list[dict]:
    """The chat turns: the style description, one user/assistant pair per few-shot example,
    then the user's prompt."""
    messages = [{"role": "system", "content": system_prompt(max_words)}]
    for short, long in examples:
        messages += [{"role": "user", "content": short}, {"role": "assistant", "content": long}]
    return [*messages, {"role": "user", "content": prompt}]


def plain_prompt(prompt: str, examples: Sequence[Example], max_words: int) -> str:
    """A few-shot text prompt for a causal LM without a chat template; the completion follows
    the last ``Long:``."""
    shots = "".join(f"Short: {short}\nLong: {long}\n\n" for short, long in examples)
    return f"{system_prompt(max_words)}\n\n{shots}Short: {prompt}\nLong:"


def token_budget(max_words: int) -> int:
    """New tokens to allow for ``max_words`` words: ~1.3 tokens per English word, with room
    to finish the sentence that the cut then ends at."""
    return 2 * max_words + 16


def choose_examples(examples: Sequence[Example], k: int, seed: int) -> list[Example]:
    """``k`` of the few-shot ``examples`` chosen by ``seed`` (all of them when there are no
    more), in their original order."""
    if k >= len(examples):
        return list(examples)
    picked = sorted(random.Random(seed).sample(range(len(examples)), k))
    return [examples[i] for i in picked]


def load_examples(uri: str) -> list[Example]:
    """(short, long) pairs from a JSON file (local path or ``s3://``) or inline JSON: a list of
    ``[short, long]`` pairs or of ``{"short": ..., "long": ...}`` objects."""
    try:
        text = uri if uri.lstrip().startswith("[") else storage.read_text(uri)
    except (storage.StorageError, OSError) as e:
        raise ExpansionError(f"cannot read expand.examples {uri!r}: {e}") from e
    try:
        rows = json.loads(text)
        if not isinstance(rows, list):
            raise TypeError(f"a {type(rows).__name__}, not a list")
        pairs = [(r["short"], r["long"]) if isinstance(r, dict) else tuple(r) for r in rows]
        if not all(len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs):
            raise TypeError("an entry is not two strings")
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise ExpansionError(
            f"expand.examples {uri[:80]!r} is not a JSON list of [short, long] pairs or "
            f'{{"short": ..., "long": ...}} objects ({e})'
        ) from e
    return pairs


# --------------------------------------------------------------------------- backends


class Backend(Protocol):
    """Something that samples expansions of a prompt."""

    name: str  # builtin | chat | hf
    model: str  # what produced the text: a directory, URI or served model name (never a key)

    def candidates(
        self, prompt: str, *, seed: int, n: int, examples: Sequence[Example] = ()
    ) -> list[str]:
        """Up to ``n`` expansions of ``prompt``, the same for the same ``seed``; ``examples``
        are few-shot (short, long) pairs for backends that take them. Raises ExpansionError."""
        ...


class BuiltinBackend:
    """The captioner's text decoder, conditioned on the short prompt (it learned the short ->
    long mapping from the training pairs). Candidates come most likely first."""

    name = "builtin"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        temperature: float = 0.7,
        max_new_tokens: int = 128,
        *,
        source: str = "",
    ) -> None:
        if temperature <= 0:
            raise ExpansionError(
                f"builtin expander samples its candidates: expand.temperature must be > 0, got "
                f"{temperature}"
            )
        self.captioner, self.tokenizer = model, tokenizer
        self.temperature, self.max_new_tokens = temperature, max_new_tokens
        self.model = source or type(model).__name__

    @classmethod
    def from_dir(
        cls, directory: str | Path, temperature: float = 0.7, max_new_tokens: int = 128
    ) -> BuiltinBackend:
        """Load a trained captioner (``Captioner.save_pretrained``) from a local directory."""
        from model.captioner import Captioner, load_caption_tokenizer

        path = Path(directory)
        if not (path / "config.json").is_file():
            raise ExpansionError(
                f"builtin expander: no captioner in {path} (expected config.json + "
                "model.safetensors from train_captioner); set expand.model to the "
                "train_captioner step's output"
            )
        try:
            model = Captioner.from_pretrained(path).eval()
            tokenizer = load_caption_tokenizer(model.config.tokenizer)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            raise ExpansionError(
                f"builtin expander: cannot load the captioner in {path} ({type(e).__name__}: "
                f"{str(e)[:300]}); expected config.json + model.safetensors from "
                "train_captioner"
            ) from e
        return cls(
            model,
            tokenizer,
            temperature,
            max_new_tokens,
            source=str(path),
        )

    def candidates(
        self, prompt: str, *, seed: int, n: int, examples: Sequence[Example] = ()
    ) -> list[str]:
        from model.captioner import expand_prompts

        try:
            (scored,) = expand_prompts(
                self.captioner,
                self.tokenizer,
                [prompt],
                seed=seed,
                num_return=n,
                temperature=self.temperature,
                max_new_tokens=self.max_new_tokens,
            )
        except (RuntimeError, ValueError) as e:
            raise ExpansionError(f"builtin expander ({self.model}) failed: {e}") from e
        ranked = sorted(scored, key=lambda pair: -pair[1])  # stable: ties keep their order
        return [text for text, _ in ranked[:n]]


@dataclass
class ChatBackend:
    """An OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp, TGI, ...).

    One POST ``{base_url}/chat/completions`` asks for ``n`` choices with the request's
    ``seed``; a server that returns fewer is asked again (seed + 1, ...) for the rest. Timeouts,
    connection errors, 429 (``Retry-After`` honoured, capped) and 5xx are retried ``retries``
    times with exponential backoff; other 4xx are not.
    """

    base_url: str
    model_name: str
    api_key: str | None = field(default=None, repr=False)
    max_words: int = 80
    temperature: float = 0.7
    timeout_s: float = 30.0
    retries: int = 3
    backoff_s: float = 0.5  # first wait; doubled per try
    max_wait_s: float = 30.0  # cap on a wait, Retry-After included
    name: str = field(default="chat", init=False)
    requests: int = field(default=0, init=False)  # sent so far (for logs and tests)

    def __post_init__(self) -> None:
        if not self.base_url:
            raise ExpansionError(
                "chat expander: expand.base_url is empty; set it to the server's OpenAI "
                "API root, e.g. --set expand.base_url=http://vllm:8000/v1"
            )
        self.url = self.base_url.rstrip("/") + "/chat/completions"
        self.model = f"{self.model_name} @ {display_url(self.base_url)}"

    @property
    def max_tokens(self) -> int:
        return token_budget(self.max_words)

    def candidates(
        self, prompt: str, *, seed: int, n: int, examples: Sequence[Example] = ()
    ) -> list[str]:
        messages = chat_messages(prompt, examples, self.max_words)
        texts: list[str] = []
        for extra in range(n):  # at most n requests, even from a server that ignores n
            texts += self._complete(messages, seed=seed + extra, n=n - len(texts))
            if len(texts) >= n:
                break
        return texts[:n]

    def _complete(self, messages: list[dict], *, seed: int, n: int) -> list[str]:
        body = {
            "model": self.model_name,
            "messages": messages,
            "temperature": self.temperature,
            "seed": seed,
            "max_tokens": self.max_tokens,
            "n": n,
        }
        reply = self._post(json.dumps(body).encode())
        try:
            data = json.loads(reply)
            texts = [choice["message"]["content"] for choice in data["choices"]]
            if not texts or not all(isinstance(t, str) for t in texts):
                raise TypeError("no text content")
        except (ValueError, TypeError, KeyError, IndexError) as e:
            raise ExpansionError(
                f"chat endpoint {display_url(self.url)} answered without "
                f"choices[0].message.content ({type(e).__name__}: {e}); body starts "
                f"{self._scrub(reply.decode(errors='replace')[:200])!r}. Is expand.base_url an "
                "OpenAI-compatible API root (usually ending in /v1)?"
            ) from e
        return texts

    def _post(self, payload: bytes) -> bytes:
        url = display_url(self.url)
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        tries = self.retries + 1
        for attempt in range(tries):
            last = attempt == tries - 1
            request = urllib.request.Request(self.url, data=payload, headers=headers)
            self.requests += 1
            wait = min(self.max_wait_s, self.backoff_s * 2**attempt)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return response.read()
            except urllib.error.HTTPError as e:
                status, text = e.code, self._scrub(e.read().decode(errors="replace")[:200])
                if status != 429 and status < 500:
                    raise ExpansionError(
                        f"chat endpoint {url} answered HTTP {status}: {text!r}; "
                        f"{_fix_for_status(status)}"
                    ) from None
                if last:
                    raise ExpansionError(
                        f"chat endpoint {url} answered HTTP {status} after {tries} tries: "
                        f"{text!r}; the server is overloaded or failing: retry later, raise "
                        "expand.retries, or set expand.fallback=true"
                    ) from None
                wait = _retry_after(e.headers.get("Retry-After"), wait, self.max_wait_s)
                reason = f"HTTP {status}"
            except TimeoutError as e:
                if last:
                    raise ExpansionError(
                        f"chat endpoint {url} timed out after {tries} tries "
                        f"(expand.timeout_s={self.timeout_s} each): raise expand.timeout_s or "
                        "expand.retries, or check the server's load"
                    ) from e
                reason = "timeout"
            except urllib.error.URLError as e:
                if isinstance(e.reason, TimeoutError):
                    if last:
                        raise ExpansionError(
                            f"chat endpoint {url} timed out after {tries} tries "
                            f"(expand.timeout_s={self.timeout_s} each): raise expand.timeout_s "
                            "or expand.retries, or check the server's load"
                        ) from e
                    reason = "timeout"
                else:
                    if last:
                        raise ExpansionError(
                            f"chat endpoint {url} is unreachable after {tries} tries "
                            f"({e.reason}): start the server or fix expand.base_url"
                        ) from e
                    reason = f"unreachable ({e.reason})"
            except (OSError, http.client.HTTPException) as e:  # reset mid-answer, bad status line
                if last:
                    raise ExpansionError(
                        f"chat endpoint {url} is unreachable after {tries} tries ({e}): start "
                        "the server or fix expand.base_url"
                    ) from e
                reason = f"connection error ({e})"
            log.warning(
                "chat endpoint %s: %s (try %d of %d); retrying in %.2f s",
                url,
                reason,
                attempt + 1,
                tries,
                wait,
            )
            time.sleep(wait)
        raise AssertionError("unreachable")  # the last try returns or raises

    def _scrub(self, text: str) -> str:
        return text.replace(self.api_key, "***") if self.api_key else text


def display_url(url: str) -> str:
    """``url`` without any user:password part, for messages and metadata."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _retry_after(header: str | None, default: float, cap: float) -> float:
    """The wait a 429's ``Retry-After`` asks for, in seconds (HTTP dates: ``default``)."""
    try:
        return min(cap, max(0.0, float(header))) if header is not None else default
    except ValueError:
        return default


def _fix_for_status(status: int) -> str:
    if status in (401, 403):
        return "set TESSERA_EXPAND_API_KEY to a key this server accepts"
    if status == 404:
        return (
            "check expand.base_url (the OpenAI API root, usually ending in /v1) and that "
            "expand.model_name is served there"
        )
    return "check expand.model_name and the server's accepted request parameters"


class HFBackend:
    """A Hugging Face causal LM saved in a local directory (``save_pretrained``): its chat
    template when the tokenizer has one, else a plain few-shot text prompt; seeded sampling."""

    name = "hf"
    EXPECTED = (
        "config.json, the weights (model.safetensors, or shards + model.safetensors.index.json) "
        "and the tokenizer (tokenizer.json or tokenizer_config.json), as save_pretrained writes "
        "them"
    )

    def __init__(
        self,
        directory: str | Path,
        *,
        max_words: int = 80,
        temperature: float = 0.7,
        max_new_tokens: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        path = Path(directory)
        self.model, self.max_words, self.temperature = str(path), max_words, temperature
        self.max_new_tokens = max_new_tokens or token_budget(max_words)
        if storage.is_s3(str(directory)):
            raise ExpansionError(
                f"hf expander: {directory} is on S3; download it first "
                "(components.core.artifacts.local_tree) and pass the local directory"
            )
        if not path.is_dir():
            raise ExpansionError(
                f"hf expander: expand.model={str(path)!r} is not a directory; expected a "
                f"causal LM directory with {self.EXPECTED}"
            )
        found = {p.name for p in path.iterdir()}
        weights = any(n.endswith((".safetensors", ".bin")) for n in found)
        tokenizer = bool(found & {"tokenizer.json", "tokenizer_config.json", "vocab.json"})
        if "config.json" not in found or not weights or not tokenizer:
            raise ExpansionError(
                f"hf expander: {path} holds {sorted(found)[:10]}; expected {self.EXPECTED}"
            )
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.lm = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise ExpansionError(
                f"hf expander: cannot load the causal LM in {path} ({type(e).__name__}: "
                f"{str(e)[:300]}); expected {self.EXPECTED}"
            ) from e
        self.lm.to(device).eval()

    def _inputs(self, prompt: str, examples: Sequence[Example]) -> tuple[dict, bool]:
        """Tokenised model inputs and whether they follow the chat template."""
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                chat_messages(prompt, examples, self.max_words),
                tokenize=False,
                add_generation_prompt=True,
            )
            chat = True
        else:
            text, chat = plain_prompt(prompt, examples, self.max_words), False
        encoded = self.tokenizer(text, return_tensors="pt", add_special_tokens=not chat)
        return {k: v.to(self.lm.device) for k, v in encoded.items()}, chat

    def candidates(
        self, prompt: str, *, seed: int, n: int, examples: Sequence[Example] = ()
    ) -> list[str]:
        import torch

        inputs, chat = self._inputs(prompt, examples)
        sample = self.temperature > 0
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        devices = [self.lm.device.index or 0] if self.lm.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                torch.manual_seed(seed)  # this call's sampling only; the caller's RNG is restored
                out = self.lm.generate(
                    **inputs,
                    do_sample=sample,
                    temperature=self.temperature if sample else None,
                    max_new_tokens=self.max_new_tokens,
                    num_return_sequences=n if sample else 1,
                    pad_token_id=pad,
                )
        except (RuntimeError, ValueError, IndexError) as e:
            raise ExpansionError(f"hf expander ({self.model}) failed to generate: {e}") from e
        new = out[:, inputs["input_ids"].shape[1] :]  # the prompt is not part of the expansion
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        if not chat:  # a plain LM runs on into the next "Short:" example
            texts = [re.split(r"\n\s*\n|\nShort:", t, maxsplit=1)[0] for t in texts]
        return [t.strip() for t in texts]


def make_backend(cfg: ExpandConfig, env: Environment | None = None) -> Backend:
    """The backend ``cfg`` names, loaded (builtin and hf need ``cfg.model``: a local dir)."""
    if cfg.backend == "chat":
        return ChatBackend(
            cfg.base_url,
            cfg.model_name,
            api_key=(env or Environment.read()).expand_api_key,
            max_words=cfg.max_words,
            temperature=cfg.temperature,
            timeout_s=cfg.timeout_s,
            retries=cfg.retries,
        )
    if cfg.backend == "hf":
        if not cfg.model:
            raise ExpansionError(
                "hf expander: expand.model is empty; set it to a causal LM directory"
            )
        return HFBackend(cfg.model, max_words=cfg.max_words, temperature=cfg.temperature)
    if not cfg.model or storage.is_s3(cfg.model):
        raise ExpansionError(
            "builtin expander: no captioner given; pass backend=BuiltinBackend(model, tokenizer) "
            "or set expand.model to a local train_captioner output directory "
            f"(got {cfg.model!r})"
        )
    return BuiltinBackend.from_dir(cfg.model, cfg.temperature, token_budget(cfg.max_words))


# --------------------------------------------------------------------------- expansion


@dataclass(frozen=True)
class Expansion:
    """A prompt, its expansion and how it was made.

    ``metadata``: backend, model (directory / URI / served name, never a key), seed,
    attributes (the user's), kept (every attribute is in ``text``), kept_by (``candidate`` |
    ``prefix`` | ``prompt``), added (distinct content stems the expansion adds), words,
    candidates (how many the backend returned), chosen (its index, None when prefixed),
    examples (few-shot pairs used), fallback (None or the reason the prompt was used).
    """

    prompt: str
    text: str
    metadata: dict = field(default_factory=dict)


def expand(
    prompt: str,
    cfg: TesseraConfig,
    *,
    seed: int = 0,
    examples: Sequence[Example] | None = None,
    backend: Backend | None = None,
) -> Expansion:
    """Expand ``prompt`` with ``cfg.expand``'s backend (or ``backend``), deterministically by
    ``seed``, within ``expand.max_words`` words, keeping every attribute of the prompt.

    ``examples``: the few-shot (short, long) pool (default: ``expand.examples``, else none);
    ``expand.few_shot`` of them are chosen by ``seed``. Raises :class:`ExpansionError` when the
    backend fails, unless ``expand.fallback`` is set: then the prompt itself comes back with the
    reason in ``metadata["fallback"]``.
    """
    xc = cfg.expand
    if not prompt.strip():
        raise ValueError("expand needs a non-empty prompt")
    attributes = prompt_attributes(prompt)
    meta: dict[str, Any] = {
        "backend": backend.name if backend else xc.backend,
        "model": backend.model if backend else _configured_model(xc),
        "seed": seed,
        "attributes": attributes,
    }
    if examples is None:  # a bad examples file is a configuration error: never a fallback
        examples = load_examples(xc.examples) if xc.examples else []
    shots = choose_examples(examples, xc.few_shot, seed)
    meta["examples"] = len(shots)
    try:
        if backend is None:
            backend = make_backend(xc)
            meta["model"] = backend.model
        texts = backend.candidates(prompt, seed=seed, n=xc.candidates, examples=shots)
        texts = [cut_words(t, xc.max_words) for t in texts if t and t.strip()]
        if not texts:
            raise ExpansionError(
                f"{meta['backend']} expander ({meta['model']}) returned no text for {prompt!r}"
            )
    except ExpansionError as e:
        if not xc.fallback:
            raise
        log.warning("prompt expansion failed, using the prompt as given: %s", e)
        return Expansion(prompt, prompt, _finish(meta, prompt, prompt, [], None, "prompt", str(e)))

    missing = [missing_attributes(attributes, t) for t in texts]
    chosen = next((i for i, m in enumerate(missing) if not m), None)
    if chosen is not None:
        text, kept_by = texts[chosen], "candidate"
    else:  # the guarantee: the user's own words lead the best candidate
        best = min(range(len(texts)), key=lambda i: len(missing[i]))
        text, kept_by = _prefix(prompt, texts[best], xc.max_words), "prefix"
    return Expansion(prompt, text, _finish(meta, prompt, text, texts, chosen, kept_by, None))


def _configured_model(cfg: ExpandConfig) -> str:
    """What ``cfg`` names as the model, before any backend is built (for the metadata)."""
    if cfg.backend == "chat":
        return f"{cfg.model_name} @ {display_url(cfg.base_url)}" if cfg.base_url else ""
    return cfg.model


def _prefix(prompt: str, candidate: str, max_words: int) -> str:
    """``"<prompt>. <candidate>"`` within ``max_words`` (the prompt whole even when longer)."""
    head = " ".join(prompt.split()).rstrip(".!?,;: ") + "."
    budget = max_words - len(head.split())
    return f"{head} {cut_words(candidate, budget)}" if budget > 0 else head


def _finish(
    meta: dict,
    prompt: str,
    text: str,
    texts: list[str],
    chosen: int | None,
    kept_by: str,
    fallback: str | None,
) -> dict:
    return {
        **meta,
        "kept": not missing_attributes(meta["attributes"], text),
        "kept_by": kept_by,
        "added": added_attributes(prompt, text),
        "words": len(text.split()),
        "candidates": len(texts),
        "chosen": chosen,
        "fallback": fallback,
    }


# --------------------------------------------------------------------------- from the config

CAPTIONER_STEP = "train_captioner"  # whose outputs the builtin expander and its examples are


class _Unavailable:
    """A backend that could not be loaded, kept so that :func:`expand` records the fallback
    (only used when ``expand.fallback`` is set)."""

    def __init__(self, name: str, model: str, error: ExpansionError):
        self.name, self.model, self.error = name, model, error

    def candidates(self, prompt: str, *, seed: int, n: int, examples: Sequence = ()) -> list:
        raise self.error


def load_backend(cfg: TesseraConfig) -> tuple[Backend, list[Example]]:
    """The backend ``cfg.expand`` names, loaded once, and its few-shot pool.

    builtin: ``expand.model`` (a train_captioner output, local or ``s3://``), else the latest
    trained captioner in the store; hf: ``expand.model`` (downloaded from ``s3://`` first);
    chat: the endpoint. Examples: ``expand.examples``, else the captioner's training pairs
    (``pairs.json`` beside ``captioner/``), else none.
    """
    from components.core import artifacts, runner

    xc = cfg.expand
    model = xc.model
    latest = runner.latest_outputs(cfg, CAPTIONER_STEP) if not model else None
    try:
        if xc.backend == "builtin" and not model:
            if not latest:
                raise ExpansionError(
                    f"builtin expander: the store {cfg.store_uri()} has no trained captioner; "
                    "run the train_captioner step (make demo, or tessera train-captioner "
                    "MANIFEST) or set expand.model (tessera expand --model DIR)"
                )
            model = latest["captioner"]
        if xc.backend == "builtin":
            captioner, tokenizer = artifacts.load_captioner(model)
            backend: Backend = BuiltinBackend(
                captioner, tokenizer, xc.temperature, token_budget(xc.max_words), source=model
            )
        elif xc.backend == "hf" and model:
            with artifacts.local_tree(model) as path:
                backend = HFBackend(path, max_words=xc.max_words, temperature=xc.temperature)
            backend.model = model
        else:
            backend = make_backend(xc)
    except (ExpansionError, FileNotFoundError, ValueError, OSError) as e:
        error = e if isinstance(e, ExpansionError) else ExpansionError(f"{xc.backend}: {e}")
        if not xc.fallback:
            raise error from e
        backend = _Unavailable(xc.backend, model, error)
    if xc.examples:
        return backend, load_examples(xc.examples)
    pairs = (latest or {}).get("pairs")
    if not pairs and xc.backend == "builtin" and model:
        beside = storage.join(model.rstrip("/").rsplit("/", 1)[0], "pairs.json")
        pairs = beside if storage.exists(beside) else None
    return backend, load_examples(pairs) if pairs else []


def expand_with_config(prompt: str, cfg: TesseraConfig, *, seed: int = 0) -> Expansion:
    """:func:`expand` with the backend and examples :func:`load_backend` finds."""
    backend, examples = load_backend(cfg)
    return expand(prompt, cfg, seed=seed, examples=examples, backend=backend)
